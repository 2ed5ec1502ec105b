"""The run directory: one folder shared by the notebooks (and `pkdkit.workflow`), so papermill can run them
in sequence and each picks up what the previous ones wrote. `RunDir` is the only place that knows its layout::

    <root>/data/                      synthetic COCO-format data (tiny/small presets)
    <root>/data_teachers/             the teachers' larger synthetic training set (when the preset has one)
    <root>/models/<name>/             baseline student and candidate teachers: model.pt, eval.json, history.json
    <root>/selection/                 selection.json, selection.png (`pkdkit.selection.run_selection`)
    <root>/distill/<plan name>/       one staged run per plan (`pkdkit.plan`: plan.yaml, stage folders, summary.json)
    <root>/distill/comparison.json    the runs compared, their records and budgets (notebook 03 -> 05)
    <root>/settings.json              what the run is made with: preset, data, seed, epochs (notebook 01, `workflow`)
    <root>/parameters.json            the notebook parameters the run was made with (`pkdkit.notebooks`)

A model's folder holds what `pkdkit.engine.train_detector` writes; evaluation files are named by
`pkdkit.evaluate.evaluation_files`, a plan's stage folders by `pkdkit.plan.Plan.stage_dir`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pkdkit.engine import detector_files, history_file
from pkdkit.evaluate import evaluation_files
from pkdkit.selection import selection_files


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory; `root` is made absolute, nothing is created."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_teachers(self) -> Path:
        return self.root / "data_teachers"

    def model_dir(self, name: str) -> Path:
        """The folder of a trained (or evaluated) candidate: the baseline student, a teacher, a control."""
        return self.root / "models" / name

    def checkpoint(self, name: str) -> Path:
        return detector_files(self.model_dir(name))[0]

    def record(self, name: str) -> Path:
        """The evaluation record (eval.json) of model `name`."""
        return evaluation_files(self.model_dir(name))[0]

    def history(self, name: str) -> Path:
        """Per-epoch training metrics of model `name` (`pkdkit.engine.history_file`: history.json, or metrics.json
        in runs written before the rename); absent for torchvision reference models."""
        return history_file(self.model_dir(name))

    @property
    def selection(self) -> Path:
        return self.root / "selection"

    @property
    def selection_json(self) -> Path:
        return selection_files(self.selection)[0]

    def plan_dir(self, name: str) -> Path:
        """The out_dir of distillation plan `name`."""
        return self.root / "distill" / name

    @property
    def comparison(self) -> Path:
        return self.root / "distill" / "comparison.json"
