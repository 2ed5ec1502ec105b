"""The pipeline steps the notebooks walk through, as plain functions over one run directory.

Every path comes from `pkdkit.rundir.RunDir` (the layout is described there); the functions take the run
directory as a path. Every step skips work whose outputs already exist, so re-running a notebook (or the
whole pipeline) resumes instead of starting over.

Each notebook starts with one set-up call, `start_run` (notebook 01: records the run's settings) or `open_run`
(02-05), which returns a `Run` (settings, preset, data; `show` a figure, add a `report` section) and sets up
IPython explicitly (figure display, pkdkit's errors as one line). The notebooks only call the library: the
readers (`candidate_records`, `load_run_selection`, `load_comparison`) load what an earlier notebook made,
and the texts they show (`orders_note`, `order_check_text`, `plan_tables`, ...) are made here.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from matplotlib.figure import Figure

from pkdkit.config import check_fields, check_range
from pkdkit.distill import Distiller, build_distiller
from pkdkit.engine import TrainConfig, resolve_device, train_detector
from pkdkit.errors import ConfigError, PkdkitError
from pkdkit.evaluate import EvalRecord, evaluate_detector, evaluation_files
from pkdkit.files import write_json
from pkdkit.launch import run_plan_distributed, train_detector_distributed
from pkdkit.models import DetectorSpec, is_torchvision_weight, load_checkpoint, load_model, model_meta
from pkdkit.data import CocoDetection, DataConfig
from pkdkit.plan import PLAN_FILE, Plan, Stage, load_plan, reuse_stages, run_plan
from pkdkit.ordering import DEFAULT_STRATEGY, SUPPORTED, CostMatrix, Selection, load_selection
from pkdkit.presets import PRESETS, Preset, get_preset
from pkdkit.progress import step
from pkdkit.runid import check_same_run, run_diff
from pkdkit.rundir import RunDir
from pkdkit.selection import run_selection
from pkdkit.spread import AP_NOISE, AP_NOISE_SOURCE, judge_order_check, seed_noise
from pkdkit.synthetic import make_synthetic_coco
from pkdkit import viz

STUDENT = "student"
BASELINE_LONG = "baseline_long"


@dataclass(frozen=True)
class RunSettings:
    """What a run is made with, chosen once (notebook 01's parameters) and read by every later notebook from
    `RunDir.settings`, so that the notebooks cannot disagree on the preset, the data, the seed or the epochs."""

    preset: str = "tiny"
    data_root: str | None = None  # None: the preset's synthetic data
    seed: int = 0
    epochs: int | None = None  # None: the preset's, for teachers and baseline
    distill_epochs: int | None = None  # None: the preset's, per distillation stage
    image_size: int | None = None  # None: the preset's input size
    device: str = "auto"
    gpus: int = 1  # device and gpus may change between sessions of one run (`pkdkit.runid.MAY_CHANGE_NUMERICS`)

    def __post_init__(self) -> None:
        """Each setting of its field's type and in range (ConfigError naming it), so that settings are written
        (`save_settings`) and a run started only with valid ones."""
        check_fields(RunSettings, asdict(self), "run settings")
        if self.preset not in PRESETS:
            raise ConfigError(f"run settings: unknown preset {self.preset!r}; available: {sorted(PRESETS)}")
        for name, low in (("seed", 0), ("epochs", 1), ("distill_epochs", 1), ("image_size", 32), ("gpus", 1)):
            check_range(f"run settings: {name}", getattr(self, name), low)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))


class RunNotStartedError(PkdkitError, FileNotFoundError):
    """A step needs what an earlier notebook writes into the run directory, and that notebook has not run
    there (notebook 01's settings, notebook 03's plans and comparison); the message says which to run first."""


def save_settings(run_dir: str | os.PathLike, settings: RunSettings) -> RunSettings:
    """Record `settings` in the run directory (notebook 01). A run directory holds one run: settings that
    change what is trained (preset, data, seed, epochs, image size) must equal those it was made with, else
    RunMismatchError says which differ and what to do; `device` and `gpus` may change (`pkdkit.runid`). A
    relative `data_root` is recorded absolute, so that notebooks run from another folder find the same data."""
    if settings.data_root:
        settings = replace(settings, data_root=str(Path(settings.data_root).resolve()))
    path = RunDir(run_dir).settings
    if path.exists():
        check_same_run(json.loads(path.read_text()), asdict(settings),
                       f"{Path(run_dir)} was made with other settings",
                       f"its models would not match them. Set run_dir to a new folder for the new settings, or "
                       f"delete {Path(run_dir)} to start over.")
    write_json(asdict(settings), path)
    return settings


def load_settings(run_dir: str | os.PathLike) -> RunSettings:
    """The settings notebook 01 recorded in the run directory."""
    path = RunDir(run_dir).settings
    if not path.exists():
        raise RunNotStartedError(f"no run in {Path(run_dir).resolve()} ({path.name} is missing): run notebook 01 "
                                 "with this run_dir first; it chooses the preset, data, seed and epochs of the run")
    return RunSettings(**json.loads(path.read_text()))


@dataclass(frozen=True)
class Run:
    """What a notebook works on, from its one set-up call (`start_run` in notebook 01, `open_run` in 02-05): the
    run directory (as given, so that reports keep relative paths), its settings, the preset (at the settings'
    image size), the data, the folder figures are saved in and the report's metrics file (None: not saved)."""

    run_dir: str | os.PathLike
    settings: RunSettings
    preset: Preset
    data: DataConfig
    figures_dir: str | os.PathLike | None = None
    report_metrics: str | os.PathLike | None = None

    def __str__(self) -> str:
        return f"run {self.run_dir}: {self.settings.describe()}\npreset {self.preset.name}: {self.preset.notes}"

    @property
    def distill_epochs(self) -> int:
        """E: the student's epochs per distillation stage (the settings', else the preset's)."""
        return self.settings.distill_epochs or self.preset.distill.epochs

    def show(self, fig: Figure | None, name: str) -> None:
        """Display `fig` once (in a notebook) and save it as `figures_dir/name` (`viz.show`); None: nothing to
        show (e.g. no image that distillation fixed)."""
        if fig is not None:
            viz.show(fig, None if self.figures_dir is None else Path(self.figures_dir) / name)

    def show_all(self, figures: dict[str, Figure]) -> None:
        """`show` each of {file name: figure}, in order."""
        for name, fig in figures.items():
            self.show(fig, name)

    def report(self, **sections: Any) -> None:
        """Add `sections` to the report's metrics file (`write_report_metrics`); nothing without one."""
        if self.report_metrics is not None:
            write_report_metrics(self.report_metrics, self.preset, self.run_dir, **sections)


def start_run(run_dir: str | os.PathLike, settings: RunSettings, *, figures_dir: str | os.PathLike | None = None,
              report_metrics: str | os.PathLike | None = None) -> Run:
    """Notebook 01's set-up: record `settings` in the run directory (`save_settings`: a run directory holds one
    run) and open it (`open_run`)."""
    _notebook_setup()
    return _open(run_dir, save_settings(run_dir, settings), figures_dir, report_metrics)


def open_run(run_dir: str | os.PathLike, *, figures_dir: str | os.PathLike | None = None,
             report_metrics: str | os.PathLike | None = None) -> Run:
    """The set-up of notebooks 02-05: the run notebook 01 made in `run_dir` (its settings, `load_settings`), its
    preset and data (synthetic data is generated once). In IPython it also shows returned figures
    (`viz.enable_notebook_display`) and pkdkit's own errors as one line instead of a traceback (the cell still
    fails, so a papermill run stops there)."""
    _notebook_setup()
    return _open(run_dir, load_settings(run_dir), figures_dir, report_metrics)


def _open(run_dir: str | os.PathLike, settings: RunSettings, figures_dir: str | os.PathLike | None,
          report_metrics: str | os.PathLike | None) -> Run:
    preset = get_preset(settings.preset, image_size=settings.image_size)
    return Run(run_dir, settings, preset, prepare_data(preset, run_dir, settings.data_root), figures_dir,
               report_metrics)


def _notebook_setup() -> None:
    """In IPython (a notebook, papermill): figures display (`viz.enable_notebook_display`), and a `PkdkitError`
    (bad input, a missing step: the message says what to do) shows as its one-line message, not a traceback
    into pkdkit. IPython still marks the cell as failed, so a papermill run stops at it."""
    viz.enable_notebook_display()
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((PkdkitError,), _show_one_line)


def _show_one_line(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> None:
    """IPython's handler of a `PkdkitError`: show the error's type and message alone (`%tb` shows the rest)."""
    shell.showtraceback((etype, value, tb), exception_only=True)


def prepare_data(preset: Preset, run_dir: str | os.PathLike, data_root: str | None = None) -> DataConfig:
    """The preset's synthetic data under `RunDir.data` (generated once), or COCO-format data at
    `data_root` (train/val or train2017/val2017 folders and annotations/instances_*.json). Models are
    trained on the dataset's own labels (1..K over its categories); torchvision teachers' classes are
    matched to them by name."""
    if data_root:
        cfg = DataConfig.from_root(Path(data_root).resolve())
    elif preset.synth is None:
        raise ConfigError(f"preset {preset.name!r} has no synthetic data: give data_root (e.g. the COCO 2017 folder)")
    else:
        cfg = _synthetic_data(RunDir(run_dir).data, **preset.synth)
    return cfg


def _synthetic_data(root: Path, **synth: Any) -> DataConfig:
    """Synthetic COCO-format data at `root`, generated unless complete (the val JSON is written last, so a set
    without it is partial and made again)."""
    if not (root / "annotations" / "instances_val.json").exists():
        make_synthetic_coco(root, **synth, overwrite=True)
    return DataConfig.from_root(root)


def data_summary(data: DataConfig) -> str:
    """The data in words: its annotation files (relative to the working folder), the number of validation
    images and the categories ({COCO id: name})."""
    val = data.val_dataset()
    return (f"train: {os.path.relpath(data.train_json)}\nval:   {os.path.relpath(data.val_json)} ({len(val)} images)\n"
            f"categories: {dict(zip(val.label_map.cat_ids, val.label_map.names))}")


def teacher_data(preset: Preset, run_dir: str | os.PathLike, data: DataConfig) -> DataConfig:
    """Where the candidate teachers train: with `preset.teacher_train_images` (synthetic presets), a larger
    training set from the same generator under `RunDir.data_teachers` (its first images are the student's),
    as published teachers are trained on more data than a small student gets; else the student's data.
    Validation is always the student's."""
    rd = RunDir(run_dir)
    if not preset.teacher_train_images or preset.synth is None or Path(data.train_images).parent != rd.data:
        return data
    teachers = _synthetic_data(rd.data_teachers, **{**preset.synth, "n_train": preset.teacher_train_images, "n_val": 0})
    return replace(data, train_images=teachers.train_images, train_json=teachers.train_json)


def student_spec(preset: Preset, data: DataConfig) -> DetectorSpec:
    """The preset's student with the class count of the data."""
    return replace(preset.student, num_classes=data.val_dataset().label_map.num_classes)


def train_candidates(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, *, device: str = "auto",
                     epochs: int | None = None, seed: int = 0, progress: bool = True,
                     gpus: int = 1) -> dict[str, dict[str, Any]]:
    """Train (or load) the baseline student and every candidate teacher; returns {name: eval record}.
    With `gpus > 1` each one trains under ``torchrun --nproc_per_node gpus`` (`pkdkit.launch`).

    Teachers train for `preset.teacher_epochs` (a bigger schedule) when set, on `teacher_data`; `epochs`
    overrides both schedules. Teachers given as torchvision COCO weight names are not trained, only evaluated
    on the data (their classes matched to the data's categories by name).
    """
    train_ds, val_ds = data.train_dataset(), data.val_dataset()
    t_data = teacher_data(preset, run_dir, data)
    t_train_ds = t_data.train_dataset(train_ds.label_map) if t_data is not data else train_ds
    n_classes = val_ds.label_map.num_classes
    cfg = preset.train.replace(device=device, seed=seed, progress=progress, **({"epochs": epochs} if epochs else {}))
    teacher_cfg = cfg.replace(epochs=epochs or preset.teacher_epochs or cfg.epochs)
    records: dict[str, dict[str, Any]] = {}
    for name, spec in {STUDENT: preset.student, **preset.teachers}.items():
        out = RunDir(run_dir).model_dir(name)
        if isinstance(spec, str):  # a torchvision COCO detector
            records[name] = _evaluate_reference(spec, preset.reference_size, val_ds, out, device, progress)
            continue
        spec, step_cfg = replace(spec, num_classes=n_classes), cfg if name == STUDENT else teacher_cfg
        config = {"preset": preset.name, "role": "student" if name == STUDENT else "teacher"}
        if gpus > 1:
            records[name] = train_detector_distributed(spec, data if name == STUDENT else t_data, step_cfg, out,
                                                       gpus, config=config)
        else:
            records[name] = train_detector(spec, train_ds if name == STUDENT else t_train_ds, val_ds, step_cfg, out,
                                           config=config)
    return records


def train_equal_budget_control(preset: Preset, data: DataConfig, run_dir: str | os.PathLike,
                               orders: dict[str, dict[str, Any]], epochs: int, *, device: str = "auto", seed: int = 0,
                               progress: bool = True, gpus: int = 1) -> dict[str, Any] | None:
    """`train_baseline_long` for S x `epochs` epochs, S the most stages of any order (`stage_count`), on `gpus`
    processes as the plans are; None when every order has one stage (the baseline is then its own equal-budget
    control)."""
    stages = stage_count(orders)
    if stages < 2:
        return None
    return train_baseline_long(preset, data, run_dir, stages * epochs, device=device, seed=seed, progress=progress,
                               gpus=gpus)


def train_baseline_long(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, epochs: int, *,
                        device: str = "auto", seed: int = 0, progress: bool = True, gpus: int = 1) -> dict[str, Any]:
    """The equal-budget control: the baseline student trained `epochs` epochs (S x E, as long as an S-stage
    plan trains it) from the same initialisation and with the same recipe, into `models/baseline_long`."""
    cfg = preset.train.replace(device=device, seed=seed, progress=progress, epochs=epochs)
    spec, out = student_spec(preset, data), RunDir(run_dir).model_dir(BASELINE_LONG)
    config = {"preset": preset.name, "role": "equal-budget control"}
    if gpus > 1:
        return train_detector_distributed(spec, data, cfg, out, gpus, config=config)
    return train_detector(spec, data.train_dataset(), data.val_dataset(), cfg, out, config=config)


def _evaluate_reference(weights: str, size: tuple[int, int] | None, val_ds: CocoDetection, out: Path, device: str,
                        progress: bool) -> dict[str, Any]:
    """A torchvision COCO detector evaluated on `val_ds` (its classes matched to the data's by name). Its record
    in `out` is reused only when it was made with the same weights, input size and validation data
    (`pkdkit.runid.run_diff`); else the model is evaluated again: the evaluation depends on nothing else, and
    costs no training."""
    spec, label_map = model_meta(weights)  # without building the model: a record made alike is reused
    spec = replace(spec, min_size=int(size[0]), max_size=int(size[1])) if size is not None else spec
    matched = label_map.onto(val_ds.label_map)
    config = {"weights": weights, "spec": spec.to_dict(), "matched_categories": list(matched.names),
              "data": {"val": str(val_ds.ann_file.resolve()), "val_sha256": val_ds.fingerprint}}
    record_file = evaluation_files(out)[0]
    if record_file.exists():
        record = EvalRecord.read(record_file)
        diff = run_diff(record.config, config)
        if not diff:
            return record
        if progress:
            step(f"{weights}: evaluated again, {record_file} was made with other settings (changed: {'; '.join(diff)})")
    return evaluate_detector(load_model(weights, size=size)[0], val_ds, matched, out_dir=out, name="eval",
                             device=resolve_device(device), config=config, progress=progress)


def model_refs(preset: Preset, run_dir: str | os.PathLike) -> dict[str, str]:
    """{name: checkpoint path or torchvision weight name} of the student and every candidate teacher."""
    return {name: spec if isinstance(spec, str) else str(RunDir(run_dir).checkpoint(name))
            for name, spec in {STUDENT: preset.student, **preset.teachers}.items()}


def candidate_records(run_dir: str | os.PathLike) -> dict[str, EvalRecord]:
    """{name: evaluation record} of the baseline student and every candidate teacher that notebook 01 trained
    (or evaluated), read without training anything; RunNotStartedError when one is missing."""
    settings = load_settings(run_dir)
    preset = get_preset(settings.preset, image_size=settings.image_size)
    rd, records = RunDir(run_dir), {}
    for name in {STUDENT: preset.student, **preset.teachers}:
        if not rd.record(name).exists():
            raise RunNotStartedError(f"{name!r} has no evaluation record in {rd.root} ({rd.record(name)} is "
                                     "missing): run notebook 01 with this run_dir first; it trains the candidates")
        records[name] = EvalRecord.read(rd.record(name))
    return records


def load_run_selection(run_dir: str | os.PathLike) -> Selection:
    """The teacher order notebook 02 selected (`RunDir.selection_json`); RunNotStartedError when it has not run."""
    path = RunDir(run_dir).selection_json
    if not path.exists():
        raise RunNotStartedError(f"no teacher selection in {Path(run_dir).resolve()} ({path} is missing): run "
                                 "notebook 02 with this run_dir first")
    return load_selection(path)[0]


def record_stats(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{name: the 12 COCO box stats} of evaluation records (what the report's sections hold)."""
    return {name: EvalRecord(r).stats() for name, r in records.items()}


def candidate_aps(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: EvalRecord(r).ap for name, r in records.items() if name != STUDENT}


def select(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, aps: dict[str, float], *,
           strategy: str = DEFAULT_STRATEGY, method: str = "closed_form", device: str = "auto"
           ) -> tuple[Selection, CostMatrix]:
    """Adaptation costs between student and teachers (with their bootstrap intervals) and the chosen order
    (with its support), written to `RunDir.selection`; on all validation images unless
    `preset.calibration_images` caps them."""
    refs = model_refs(preset, run_dir)
    teachers = {k: v for k, v in refs.items() if k != STUDENT}
    val = data.val_dataset()
    n_images = len(val) if preset.calibration_images is None else min(preset.calibration_images, len(val))
    step(f"teacher selection: adaptation costs between the student and {len(teachers)} teachers "
         f"on {n_images} images")
    return run_selection(refs[STUDENT], teachers, val, RunDir(run_dir).selection,
                         n_images=n_images, strategy=strategy, method=method,
                         device=str(resolve_device(device)), aps=aps, sizes=_reference_sizes(preset, refs))


def _reference_sizes(preset: Preset, refs: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Input sizes of the teachers given as torchvision weight names, when the preset overrides them."""
    if preset.reference_size is None:
        return {}
    return {k: preset.reference_size for k, v in refs.items() if is_torchvision_weight(v)}


def make_plan(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, name: str, teachers: list[str], *,
              device: str = "auto", epochs: int | None = None, seed: int = 0, loss: str | None = None,
              loss_params: dict[str, Any] | None = None, loss_weight: float | str | None = None,
              fine_tune: bool = False) -> Plan:
    """A staged plan over `teachers` (in order); one teacher makes a one-shot distillation.

    By default the paper's protocol: stage 1 starts from the student's initial weights (the baseline's
    initialisation: same spec, same seed) and inherits the first teacher's neck and head. `fine_tune` starts
    from the trained baseline instead. `loss_weight`: the preset's (a number or "auto") unless given."""
    refs = model_refs(preset, run_dir)
    sizes = _reference_sizes(preset, refs)
    train: TrainConfig = preset.distill.replace(device=device, seed=seed, **({"epochs": epochs} if epochs else {}))
    weight = preset.loss_weight if loss_weight is None else loss_weight
    stages = [Stage(name=t, teacher=refs[t], loss=loss or preset.loss,
                    loss_params=dict(preset.loss_params if loss_params is None else loss_params),
                    loss_weight=weight, teacher_size=list(sizes[t]) if t in sizes else None) for t in teachers]
    return Plan(name=name, student=student_spec(preset, data), data=data, stages=stages,
                out_dir=str(RunDir(run_dir).plan_dir(name)),
                student_init=refs[STUDENT] if fine_tune else None, train=train)


# The runs of the comparison, in table order. Every run starts from the baseline's initialisation.
RUN_ORDER = ("baseline", BASELINE_LONG, "one_shot", "one_shot_long", "progressive", "by_ap", "reversed")


def comparison_orders(selection: Selection, aps: dict[str, float], *, run_reversed: bool = True
                      ) -> dict[str, dict[str, Any]]:
    """The teacher orders the walk-through compares: {run name: {"order", "source", "stages_x_epochs"}}.

    - progressive: exactly the selected order;
    - by_ap: when the selection chose a single teacher, the teachers up to it by ascending AP, run as an
      extra chain and labelled as such (it is not what the selection chose);
    - reversed: the multi-teacher order backwards (strong to weak), when there is one;
    - one_shot: the final teacher alone for one stage (E epochs, as in the paper); marked ``same_as`` the plan
      whose stage ``same_stage`` already trains it (same initialisation, teacher, epochs and seed): progressive
      when the selection chose that teacher alone, else stage 1 of reversed;
    - one_shot_long: the final teacher alone for S x E epochs, S the most stages of any order run (equal budget).
    """
    order = list(selection.order)
    final = order[-1]
    runs = {"progressive": {"order": order, "source": f"selection ({selection.strategy})", "stages_x_epochs": 1}}
    chain = order
    if len(order) == 1:
        weaker = sorted((t for t in aps if t != final and aps[t] <= aps[final]), key=aps.get)
        if weaker:
            chain = weaker + [final]
            runs["by_ap"] = {"order": chain, "source": "teachers by ascending AP, run because the selection chose "
                                                       "a single teacher (not the selected order)", "stages_x_epochs": 1}
    if run_reversed and len(chain) > 1:
        name = "progressive" if len(order) > 1 else "by_ap"
        runs["reversed"] = {"order": chain[::-1], "source": f"the {name} order reversed (strong to weak)",
                            "stages_x_epochs": 1}
    runs["one_shot"] = {"order": [final], "source": "the final teacher alone, one stage", "stages_x_epochs": 1}
    if order == [final]:  # the selected order is the one-shot run: train it once
        runs["one_shot"].update(same_as="progressive", same_stage=1,
                                source="the final teacher alone, one stage (the same run as progressive)")
    elif "reversed" in runs:  # reversed starts with the final teacher: its stage 1 is the one-shot run
        runs["one_shot"].update(same_as="reversed", same_stage=1,
                                source="the final teacher alone, one stage (stage 1 of reversed: the same run, "
                                       "trained once)")
    longest = max(len(r["order"]) for r in runs.values())
    if longest > 1:
        runs["one_shot_long"] = {"order": [final], "source": f"the final teacher alone for {longest} x the stage "
                                                             "epochs (equal budget)", "stages_x_epochs": longest}
    return {name: runs[name] for name in RUN_ORDER if name in runs}


def orders_note(selection: Selection, orders: dict[str, dict[str, Any]]) -> str:
    """Markdown: what `comparison_orders` did because the selection chose a single teacher (the selected order
    is then one-shot distillation; which extra orders are run and which stage is shared); empty otherwise."""
    if len(selection.order) != 1:
        return ""
    return (f"**The selection chose a single teacher, `{selection.order[0]}`**: the direct step is cheaper than "
            "every path through another teacher, so the selected order is one-shot distillation and `progressive` "
            "is the same run as `one_shot`."
            + (" The chain by ascending AP is run as `by_ap`: an extra order, *not* the one the selection chose."
               if "by_ap" in orders else "")
            + (" `reversed` starts with the same stage as `progressive` and takes it from there rather than "
               "training it again." if "reversed" in orders else ""))


def comparison_plans(preset: Preset, data: DataConfig, run_dir: str | os.PathLike,
                     orders: dict[str, dict[str, Any]], *, epochs: int | None = None, device: str = "auto",
                     seed: int = 0, loss: str | None = None) -> list[Plan]:
    """One plan per order of `comparison_orders`, E = `epochs` (default: the preset's) per stage."""
    per_stage = epochs or preset.distill.epochs
    return [make_plan(preset, data, run_dir, name, o["order"], epochs=per_stage * o["stages_x_epochs"],
                      device=device, seed=seed, loss=loss) for name, o in orders.items() if "same_as" not in o]


def orders_table(orders: dict[str, dict[str, Any]], epochs: int) -> str:
    """Markdown: each distillation run's teacher order, where the order came from, and its student epochs."""
    lines = ["| run | teachers | from | student epochs |", "|---|---|---|---:|"]
    for name, o in orders.items():
        stages = o["stages_x_epochs"] if len(o["order"]) == 1 else len(o["order"])
        lines.append(f"| {name} | {' → '.join(o['order'])} | {o['source']} | "
                     f"{stages} × {epochs} = {stages * epochs} |")
    return "\n".join(lines)


def stage_count(orders: dict[str, dict[str, Any]]) -> int:
    """S: the most stages of any order run (the budget of the long controls is S x E)."""
    return max(len(o["order"]) for o in orders.values())


def run_plans(plans: list[Plan], *, progress: bool = True, gpus: int = 1) -> dict[str, dict[str, Any]]:
    """Run each plan in turn (finished stages are skipped, and leading stages an earlier plan trained identically
    are taken from it: `pkdkit.plan.reuse_stages`); returns {plan name: summary}. With `gpus > 1` each plan runs
    under ``torchrun --nproc_per_node gpus`` (`pkdkit.launch`), its output streamed here."""
    summaries = {}
    for i, plan in enumerate(plans):
        reuse_stages(plan, plans[:i], progress=progress)
        summaries[plan.name] = (run_plan_distributed(plan, gpus, progress=progress) if gpus > 1
                                else run_plan(plan, progress=progress))
    return summaries


def stage_histories(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Per-stage epoch metrics of a plan, in stage order: {"1: r34": [...], "2: r50": [...]}."""
    out = {}
    for k, stage in enumerate(plan.stages):
        path = plan.stage_history(k)
        if path.exists():
            out[f"{k + 1}: {stage.name}"] = json.loads(path.read_text())["epochs"]
    return out


def comparison_records(run_dir: str | os.PathLike, plans: list[Plan],
                       orders: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{run name: evaluation record} in table order: the baseline, the equal-budget control (when trained)
    and the last stage of every finished plan (a run of `orders` marked ``same_as`` a plan takes the record of
    that plan's stage ``same_stage``). Each record's config carries its `budget`."""
    rd = RunDir(run_dir)
    records = {"baseline": EvalRecord.read(rd.record(STUDENT))}
    if rd.record(BASELINE_LONG).exists():
        records[BASELINE_LONG] = EvalRecord.read(rd.record(BASELINE_LONG))
    for plan in plans:
        last = plan.stage_record(len(plan.stages) - 1)
        if last.exists():
            records[plan.name] = EvalRecord.read(last)
    by_name = {plan.name: plan for plan in plans}
    for name, o in (orders or {}).items():
        if o.get("same_as") in by_name:
            stage = by_name[o["same_as"]].stage_record(o["same_stage"] - 1)
            if stage.exists():
                records[name] = EvalRecord.read(stage)
    return dict(sorted(records.items(), key=lambda kv: RUN_ORDER.index(kv[0]) if kv[0] in RUN_ORDER else len(RUN_ORDER)))


def write_comparison(run_dir: str | os.PathLike, records: dict[str, dict[str, Any]],
                     orders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write `RunDir.comparison`: each run's evaluation record file, budget (initialisation, student
    epochs) and teacher order with where it came from, plus `order_check`. Notebook 5 reads it back."""
    rd = RunDir(run_dir)
    runs = {name: {"record": str(Path(r["path"]).relative_to(rd.root)),
                   "budget": EvalRecord(r).budget,
                   "order": orders.get(name, {}).get("order", []),
                   "source": orders.get(name, {}).get("source", "no teacher")} for name, r in records.items()}
    comparison = {"runs": runs, "order_check": order_check(records, orders)}
    write_json(comparison, rd.comparison)
    return comparison


def load_comparison(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What notebook 3 wrote (`write_comparison`), with each run's record loaded under "records" and its COCO
    results file under "results"."""
    rd = RunDir(run_dir)
    if not rd.comparison.exists():
        raise RunNotStartedError(f"no comparison in {run_dir}: run notebook 03 (staged distillation) first")
    comparison = json.loads(rd.comparison.read_text())
    files = {n: evaluation_files((rd.root / r["record"]).parent) for n, r in comparison["runs"].items()}
    comparison["records"] = {n: EvalRecord.read(record) for n, (record, _) in files.items()}
    comparison["results"] = {n: results for n, (_, results) in files.items()}
    return comparison


def order_check(records: dict[str, dict[str, Any]], orders: dict[str, dict[str, Any]], stat: str = "AP",
                noise: float = AP_NOISE, noise_source: str = AP_NOISE_SOURCE) -> dict[str, Any]:
    """Was the selected order (the `progressive` run) the best of the teacher orders that were run, beyond the
    noise? The numbers, plus `pkdkit.spread.judge_order_check`'s "verdict" ("best", "no difference shown",
    "worse") and "sentence" against `noise` (default: the single-run noise `pkdkit.spread.AP_NOISE`)."""
    aps = {n: EvalRecord(records[n]).stat(stat) for n in orders if n in records}
    if "progressive" not in aps:
        return {}
    best = max(aps, key=aps.get)
    check = {"selected": orders["progressive"]["order"], "selected_ap": aps["progressive"], "best_run": best,
             "best_order": orders[best]["order"], "best_ap": aps[best],
             "selected_is_best": aps["progressive"] >= aps[best], "orders_run": {n: orders[n]["order"] for n in aps},
             "aps": aps, "same_run": [n for n in aps if orders[n].get("same_as") == "progressive"]}
    return {**check, **judge_order_check(check, noise, noise_source)}


def order_check_text(check: dict[str, Any]) -> str:
    """Markdown: the `order_check` in one sentence, judged against the noise (`pkdkit.spread.judge_order_check`);
    empty when no selected order was run."""
    return check.get("sentence", "")


def plan_tables(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: each plan's per-stage table (`run_plans`' summaries), under its name."""
    return "\n\n".join(f"**{name}**\n\n{summary['table']}" for name, summary in summaries.items())


def comparison_sections(summaries: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> dict[str, Any]:
    """Notebook 03's report sections: "distillation" ({plan: {stage: the 12 stats}}) and "comparison" (each
    run's record, budget and order, and the `order_check`)."""
    return {"distillation": {name: record_stats(s["rows"]) for name, s in summaries.items()},
            "comparison": {"runs": comparison["runs"], "order_check": comparison["order_check"]}}


def write_report_metrics(path: str | os.PathLike, preset: Preset, run_dir: str | os.PathLike, **sections: Any) -> None:
    """Merge `sections` into the report's metrics.json (each notebook adds its own section)."""
    path = Path(path)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update({"preset": preset.name, "run_dir": str(run_dir), **sections})
    write_json(current, path)


def load_stage(plan: Plan, k: int) -> Distiller:
    """Stage k's Distiller as it ended: the stage's student, its teacher, and the trained loss modules
    (adapters, MGD generation blocks) from the stage's `last.pt`."""
    stage = plan.stages[k]
    student, _, _ = load_model(plan.stage_student(k))
    teacher, _, _ = load_model(stage.teacher, size=stage.teacher_size)
    distiller = build_distiller(student, teacher, stage.loss, stage.loss_params, stage.levels)
    distiller.load_state_dict(load_checkpoint(plan.stage_checkpoint(k))["model"])
    calibration = plan.stage_calibration(k)
    if calibration.exists():
        distiller.weight = json.loads(calibration.read_text())["weight"]
    return distiller.eval()


def training_history(run_dir: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of a trained candidate (empty for torchvision reference models)."""
    path = RunDir(run_dir).history(name)
    return json.loads(path.read_text())["epochs"] if path.exists() else []


def training_histories(run_dir: str | os.PathLike, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """{name: per-epoch metrics} of the named candidates trained here (torchvision reference models are left out)."""
    histories = {name: training_history(run_dir, name) for name in names}
    return {name: epochs for name, epochs in histories.items() if epochs}


def load_run_plan(run_dir: str | os.PathLike, name: str) -> Plan:
    """A plan that notebook 03 wrote and ran (its `PLAN_FILE` in `RunDir.plan_dir(name)`)."""
    plan_dir = RunDir(run_dir).plan_dir(name)
    if not plan_dir.is_dir():
        raise RunNotStartedError(f"no plan {name!r} in {run_dir}: run notebook 03 (staged distillation) first")
    return load_plan(plan_dir / PLAN_FILE)


def stage_models(plan: Plan, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Models to compare in feature space: each stage's teacher, the trained baseline student, and the
    student after each stage, in eval mode."""
    models: dict[str, Any] = {}
    for stage in plan.stages:
        models[f"teacher {stage.name}"] = load_model(stage.teacher, size=stage.teacher_size)[0].eval()
    models["student (baseline)"] = load_model(RunDir(run_dir).checkpoint(STUDENT))[0].eval()
    for k, stage in enumerate(plan.stages):
        models[f"student after {stage.name}"] = load_model(plan.stage_student(k))[0].eval()
    return models


def plan_loss_curves(plans: list[Plan]) -> dict[str, Figure]:
    """{``03_losses_<plan>.png``: each plan's detection and distillation loss per epoch, one colour per stage
    (`viz.plot_loss_curves` of `stage_histories`)}."""
    return {f"03_losses_{plan.name}.png": viz.plot_loss_curves(stage_histories(plan)) for plan in plans}


class FinalModels(NamedTuple):
    """The names, in `stage_models`, of the plan's final teacher, the student before distillation (the trained
    baseline) and the student after the last stage: what notebook 04 compares."""

    teacher: str
    before: str
    after: str


def final_models(plan: Plan) -> FinalModels:
    last = plan.stages[-1].name
    return FinalModels(f"teacher {last}", "student (baseline)", f"student after {last}")


def model_features(models: dict[str, Any], image: Any) -> dict[str, dict[str, Any]]:
    """{model name: {FPN level: (1, C, H, W) features}} of one image (3, H, W) through each model's transform,
    backbone and FPN (`pkdkit.features.extract_features`), without gradients."""
    import torch

    from pkdkit.features import extract_features

    with torch.no_grad():
        return {name: extract_features(m, [image])[0] for name, m in models.items()}


def _common_init(labels: list[str | None]) -> str | None:
    """One initialisation label for a run over seeds: the label itself when every seed has it, the label with
    its seed number replaced by "the seed's" when only the seeds differ (each seed starts from its own random
    initialisation), else the labels joined."""
    if len(set(labels)) == 1:
        return labels[0]
    generic = {re.sub(r"\bseed \d+", "the seed's", label or "?") for label in labels}
    return generic.pop() if len(generic) == 1 else " / ".join(str(label) for label in labels)


def seed_study(reports: list[str | os.PathLike], stats: tuple[str, ...] = ("AP", "AP50", "AP75")) -> dict[str, Any]:
    """Aggregate the `evaluation` and `comparison` sections of several report folders (one per seed).

    Returns {"seeds", "runs": {run: {stat: {"values", "mean", "std"}}}, "budgets": {run: {"init", "epochs"}},
    "records": {run: [record, ...]}, "table": markdown (epochs and initialisation, mean ± sample std in %),
    "order_checks": [per seed: was the selected order the best of the orders run, its verdict against the
    seeds' spread (`pkdkit.spread`) and the support of the chosen order], "order_table": markdown,
    "selection_check": over seeds, how often a supported choice was the best run (`_seed_order_checks`),
    "parameters": each report's parameters}.
    """
    import numpy as np

    if not reports:
        raise ConfigError("seed_study: no report folders given")
    metrics = [json.loads((Path(r) / "metrics.json").read_text()) for r in reports]
    missing = [str(r) for r, m in zip(reports, metrics) if "evaluation" not in m]
    if missing:
        raise ConfigError(f"reports without an evaluation section (did notebook 05 run?): {missing}")
    names = [n for n in metrics[0]["evaluation"] if all(n in m["evaluation"] for m in metrics)]
    per_seed = {n: [m.get("comparison", {}).get("runs", {}).get(n, {}).get("budget", {}) for m in metrics] for n in names}
    budgets = {n: {**b[0], "init": _common_init([x.get("init") for x in b])} for n, b in per_seed.items()}
    # a run name may cost different epochs in different seeds (the selection chose 1 teacher in one, 2 in another)
    mixed = {n: [b.get("epochs") for b in bs] for n, bs in per_seed.items() if len({b.get("epochs") for b in bs}) > 1}
    for n, epochs in mixed.items():
        budgets[n] = {**budgets[n], "epochs": "/".join(str(e) for e in epochs)}
    runs, records = {}, {}
    for name in names:
        values = {s: [m["evaluation"][name][s] for m in metrics] for s in stats}
        runs[name] = {s: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                      for s, v in values.items()}
        records[name] = [EvalRecord.of_stats(m["evaluation"][name], {"budget": budgets[name]}) for m in metrics]
    header = "| run | epochs | init | " + " | ".join(stats) + " |\n|---|---:|---|" + "---:|" * len(stats)
    lines = [f"| {n} | {budgets[n].get('epochs', '?')} | {budgets[n].get('init', '?')} | "
             + " | ".join(f"{100 * r[s]['mean']:.1f} ± {100 * r[s]['std']:.1f}" for s in stats) + " |"
             for n, r in runs.items()]
    seeds = [m.get("parameters", {}).get("seed") for m in metrics]
    checks, order_table, selection_check = _seed_order_checks(reports, metrics, runs, seeds)
    return {"seeds": seeds, "runs": runs, "budgets": budgets, "records": records,
            "table": "\n".join([header, *lines]) + f"\n\n(mean ± sample std over {len(metrics)} seeds, AP in %; "
                     "epochs: the student's total training epochs; in each seed every run starts from that seed's initialisation)"
                     + "".join(f"\n\n**{n} is not one budget**: {'/'.join(str(e) for e in ep)} epochs in seeds "
                               f"{', '.join(str(s) for s in [m.get('parameters', {}).get('seed') for m in metrics])} "
                               "(the selection chose another number of teachers): do not read its mean as one run."
                               for n, ep in mixed.items()),
            "mixed_budgets": mixed,
            "order_checks": checks, "order_table": order_table, "selection_check": selection_check,
            "parameters": [m.get("parameters", {}) for m in metrics]}


def _seed_order_checks(reports: list[str | os.PathLike], metrics: list[dict[str, Any]], runs: dict[str, Any],
                       seeds: list[Any]) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Per seed, the order check judged against the spread of these seeds (`pkdkit.spread.seed_noise` over the
    order runs; the single-run `AP_NOISE` with one seed) and the support of the chosen order (the report's
    selection section, else the run directory's selection.json; None when neither has one). Returns (checks,
    markdown table, {"supported", "with_support", "supported_best", "supported_within_noise", "text"}): how
    often a supported choice (support >= `pkdkit.ordering.SUPPORTED`) was the best order run, or within the
    noise of it."""
    checks = [dict(m.get("comparison", {}).get("order_check", {})) for m in metrics]
    noise = seed_noise(runs, sorted({n for c in checks for n in c.get("orders_run", {})}))
    source = f"the spread over these {len(metrics)} seeds" if noise is not None else AP_NOISE_SOURCE
    for report, m, c in zip(reports, metrics, checks):
        if not c:
            continue
        aps = c.setdefault("aps", {n: m["evaluation"][n]["AP"] for n in c["orders_run"] if n in m["evaluation"]})
        c.setdefault("same_run", [n for n in aps if n != "progressive" and c["orders_run"][n] == c["selected"]
                                  and aps[n] == c["selected_ap"]])  # reports written before same_run existed
        c.update(judge_order_check(c, AP_NOISE if noise is None else noise, source))
        c["support"] = _selection_support(report, m)
    lines = ["| seed | selected order | AP | best order run | AP | selected was best | support | verdict |",
             "|---:|---|---:|---|---:|---|---:|---|"]
    lines += [f"| {seed} | {' → '.join(c['selected'])} | {100 * c['selected_ap']:.1f} | {c['best_run']}: "
              f"{' → '.join(c['best_order'])} | {100 * c['best_ap']:.1f} | "
              f"{'yes' if c['selected_is_best'] else 'no'} | "
              f"{'n/a' if not c['support'] else format(c['support']['share'], '.0%')} | {c['verdict']} |"
              for seed, c in zip(seeds, checks) if c]
    with_support = [c for c in checks if c and c["support"]]
    supported = [c for c in with_support if c["support"]["supported"]]
    summary = {"with_support": len(with_support), "supported": len(supported),
               "supported_best": sum(c["selected_is_best"] for c in supported),
               "supported_within_noise": sum(c["verdict"] != "worse" for c in supported)}
    summary["text"] = (
        f"Supported choices (chosen in at least {100 * SUPPORTED:.0f}% of resamples): {summary['supported']} of the "
        f"{summary['with_support']} seeds with a recorded support; the best order run in "
        f"{summary['supported_best']} of them, the best or within the noise of it in "
        f"{summary['supported_within_noise']}."
        if with_support else "No seed recorded the support of its chosen order (selections made before intervals).")
    noise_text = f"noise: {100 * (AP_NOISE if noise is None else noise):.1f} AP points, {source}"
    return checks, "\n".join(lines) + f"\n\n({noise_text})", summary


def _selection_support(report: str | os.PathLike, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The chosen order's support of one report: its selection section's, else that of the run directory's
    selection.json (the run directory as recorded, or relative to the report folder)."""
    support = metrics.get("selection", {}).get("order_support")
    if support or not metrics.get("run_dir"):
        return support
    for root in (Path(metrics["run_dir"]), Path(report) / metrics["run_dir"]):
        if RunDir(root).selection_json.exists():
            return load_selection(RunDir(root).selection_json)[0].order_support
    return None
