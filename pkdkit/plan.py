"""Distillation plans: a student, data, and a sequence of stages (one teacher each), and `run_plan`.

A plan file (YAML or JSON) looks like::

    name: progressive
    out_dir: runs/tiny/progressive        # relative paths are relative to the plan file
    student: {arch: retinanet, backbone: resnet18, num_classes: 6, fpn_channels: 32, min_size: 96, max_size: 96}
    data: {train_images: data/train, train_json: data/annotations/instances_train.json,
           val_images: data/val, val_json: data/annotations/instances_val.json}
    train: {epochs: 12, lr: 0.005, batch_size: 8}  # defaults for every stage
    stages:
      - {name: r34, teacher: runs/tiny/teachers/retinanet_resnet34/model.pt, loss: mgd, loss_weight: auto}
      - {name: r50, teacher: runs/tiny/teachers/retinanet_resnet50/model.pt, loss: mgd, train: {epochs: 6}}

**Stage 1 follows the paper's protocol by default** (the released code's ``init_student=True``): the student
starts from its *initial* weights, the same initialisation a baseline trained with the same spec and seed
starts from (ImageNet backbone weights when the spec names them, else the seeded random init), and inherits
the first teacher's neck and head wherever names and shapes match (`inherit_teacher_head`; the report of
what was copied and skipped is kept in the stage's metrics). Each stage then trains its own schedule, so a
plan of S stages of E epochs gives the student S x E epochs in all. ``student_init: <checkpoint>`` fine-tunes
a trained student instead (no inheritance unless a stage asks for it); tables name such runs "fine-tune".

Stage k > 1 starts from stage k-1's `student.pt` (student-only weights, as the paper's released code hands
them over). ``loss_weight`` multiplies the stage's distillation term; ``auto`` measures the detection and
distillation losses on a few batches before training and sets it so that distillation starts at
``loss_ratio`` (default 1) times the detection loss (`pkdkit.distill.calibrate_loss_weight`); the measured
start ratio is recorded for every stage. Loss hyper-parameters and levels default to the authors' values for
the student's detector family (`pkdkit.losses.loss_defaults`).

The run directory holds ``plan.yaml``, ``stage_<k>_<name>/{calibration.json, last.pt, student.pt,
history.json, eval.json, TensorBoard events (global steps continuing the stage before)}``, ``summary.json`` and, when fine-tuning, ``baseline/eval.json`` (the checkpoint
the plan started from). Every record carries its `budget`: the initialisation and the student's total epochs.
Running a plan again skips finished stages and resumes an interrupted one exactly. Leading stages that an
earlier plan already trained identically are taken from it rather than trained again (`reuse_stages`).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pkdkit.config import check_fields, check_types, check_value
from pkdkit.data import CocoDetection, DataConfig, LabelMap, make_loader
from pkdkit.distill import (DENSE_ARCHS, Distiller, build_distiller, build_head_distill, calibrate_loss_weight,
                            inherit_teacher_head)
from pkdkit.engine import (DistInfo, TrainConfig, barrier, history_file, init_distributed, note_evaluation, ran_on,
                           resolve_device, seed_everything, train, training_files)
from pkdkit.errors import ConfigError, reason
from pkdkit.evaluate import EvalRecord, budget_of, comparison_table, evaluate_detector, evaluation_files
from pkdkit.features import common_levels, feature_levels
from pkdkit.files import check_name, link_files, write_json, write_text
from pkdkit.losses import HEAD_LOSSES, build_loss, loss_hparams
from pkdkit.models import (CheckpointError, DetectorSpec, build_detector, initial_weights_label, is_torchvision_weight,
                           load_checkpoint, load_model, model_meta, save_detector, state_fingerprint)
from pkdkit.ordering import Selection
from pkdkit.progress import step
from pkdkit.runid import RAN_ON, mismatch, run_diff


PLAN_FILE = "plan.yaml"  # in a plan's out_dir: the plan that ran there


class PlanError(ConfigError):
    """A plan that cannot run; the message names the stage and the field."""


@dataclass
class Stage:
    """One teacher. `teacher`: a pkdkit checkpoint path or a torchvision COCO weight name
    (``"FCOS_ResNet50_FPN_Weights.COCO_V1"``). `train` overrides the plan's training settings.

    loss_params / levels: None or empty takes the authors' values for the student's detector family.
    inherit_teacher_head: stage 1 only; None follows the protocol (True when the plan starts from the initial
    weights, False when it fine-tunes a checkpoint). loss_weight: a number >= 0, or "auto" (see the module
    docstring) with loss_ratio the target start ratio of distillation to detection loss.
    `teacher_size`: the teacher's input size; when it differs from the student's, the teacher sees the
    student's batch rescaled to its own size and its FPN maps are resized to the student's
    (`pkdkit.features.features_at`).
    head_loss: response distillation of a dense head besides the feature loss ("kd": `pkdkit.losses.HeadKDLoss`
    at `head_temperature`, times `head_loss_weight`; RetinaNet/FCOS student and teacher at the same input size);
    ``loss_weight: 0`` with a head_loss distils the responses alone."""

    name: str
    teacher: str
    loss: str = "mgd"
    loss_params: dict[str, Any] = field(default_factory=dict)
    levels: list[str] | None = None
    inherit_teacher_head: bool | None = None
    loss_weight: float | str = 1.0
    loss_ratio: float = 1.0
    train: dict[str, Any] = field(default_factory=dict)
    teacher_size: list[int] | None = None  # [min_size, max_size] the teacher runs at; None: its own
    head_loss: str | None = None  # "kd": response distillation of a dense head (None: features only)
    head_loss_weight: float = 1.0
    head_temperature: float = 1.0

    def __post_init__(self) -> None:
        """Every field's type, the loss and its parameters (`_check_loss_params`), the distillation weight:
        ConfigError naming the field (a plan adds the stage)."""
        check_types(self, f"stage {self.name!r}")
        check_name(self.name, "stage name")  # the stage's folder is stage_<k>_<name> inside the plan's out_dir
        if self.loss_weight != "auto":
            if isinstance(self.loss_weight, str):
                raise ConfigError(f"stage {self.name!r}: loss_weight must be a number >= 0 or 'auto', "
                                  f"not {self.loss_weight!r}")
            if not self.loss_weight >= 0 or self.loss_weight == float("inf"):
                raise ConfigError(f"stage {self.name!r}: loss_weight must be a finite number >= 0, "
                                  f"not {self.loss_weight}")
        if not 0 < self.loss_ratio < float("inf"):
            raise ConfigError(f"stage {self.name!r}: loss_ratio must be a finite number > 0, not {self.loss_ratio}")
        self.loss_params = _check_loss_params(self)
        if self.head_loss is not None and self.head_loss not in HEAD_LOSSES:
            raise ConfigError(f"unknown head_loss {self.head_loss!r}; available: "
                              f"{sorted(HEAD_LOSSES)}")
        if not 0 <= self.head_loss_weight < float("inf") or not 0 < self.head_temperature < float("inf"):
            raise ConfigError(f"head_loss_weight must be a finite number >= 0 and "
                              f"head_temperature one > 0, not {self.head_loss_weight} and {self.head_temperature}")


@dataclass
class Plan:
    name: str
    student: DetectorSpec
    data: DataConfig
    stages: list[Stage]
    out_dir: str
    student_init: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """The plan name (one path component: the notebooks name its folder after it, `RunDir.plan_dir`) and each
        stage's training settings over the plan's (PlanError naming the stage)."""
        check_name(self.name, "plan name")
        for k, stage in enumerate(self.stages):
            try:
                self.stage_train(k)
            except ConfigError as e:
                raise PlanError(f"stage {k + 1} ({stage.name}): {e}") from None

    # The run's layout under out_dir (see the module docstring)
    @property
    def plan_file(self) -> Path:
        return Path(self.out_dir) / PLAN_FILE

    @property
    def summary_file(self) -> Path:
        return Path(self.out_dir) / "summary.json"

    def stage_dir(self, k: int) -> Path:
        return Path(self.out_dir) / f"stage_{k + 1}_{self.stages[k].name}"

    def stage_student(self, k: int) -> Path:
        """Stage k's student-only checkpoint, the hand-over to stage k + 1."""
        return self.stage_dir(k) / "student.pt"

    def stage_record(self, k: int) -> Path:
        """Stage k's evaluation record of its student."""
        return evaluation_files(self.stage_dir(k))[0]

    def stage_checkpoint(self, k: int) -> Path:
        """Stage k's training checkpoint (`last.pt`: the student and the trained loss modules)."""
        return training_files(self.stage_dir(k))[0]

    def stage_history(self, k: int) -> Path:
        """Stage k's per-epoch metrics (`pkdkit.engine.history_file`)."""
        return history_file(self.stage_dir(k))

    def stage_finished(self, k: int) -> bool:
        """Stage k has its student and its evaluation record: a run of the plan skips it."""
        return self.stage_student(k).exists() and self.stage_record(k).exists()

    def stage_calibration(self, k: int) -> Path:
        """Stage k's distillation-weight calibration (`_calibrate`)."""
        return self.stage_dir(k) / "calibration.json"

    def stage_train(self, k: int) -> TrainConfig:
        return self.train.replace(**self.stages[k].train)

    @property
    def fine_tunes(self) -> bool:
        """True when stage 1 starts from a trained checkpoint rather than the initial weights."""
        return self.student_init is not None

    def inherits(self, k: int) -> bool:
        """Whether stage k (0-based) starts by copying its teacher's neck and head (stage 1 only)."""
        flag = self.stages[k].inherit_teacher_head
        return k == 0 and (not self.fine_tunes if flag is None else flag)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out_dir": self.out_dir, "student": self.student.to_dict(),
                "student_init": self.student_init, "data": asdict(self.data), "train": self.train.to_dict(),
                "stages": [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | os.PathLike = ".") -> "Plan":
        """Build a plan from a dict; relative paths are taken relative to `base_dir`.

        Every field is type-checked (PlanError naming the stage and the field), numbers written as strings
        (YAML reads ``lr: 1e-3`` as a string) are read as numbers, and each stage's loss parameters (`Stage`) and
        training settings (`Plan`) are checked, so a bad plan fails before anything runs or is written."""
        where = "plan"
        try:
            for key in ("name", "student", "data", "out_dir"):
                if key not in d:
                    raise PlanError(f"plan: missing {key!r}")
            d = _check_fields(cls, {**d, "stages": d.get("stages") or []}, "plan")
            base = Path(base_dir)

            def path(p: str | None) -> str | None:
                if p is None or is_torchvision_weight(p):
                    return p
                return str((base / p).resolve())

            where = "train"
            tcfg = TrainConfig.from_dict(d.get("train") or {})
            stages = []
            for i, s in enumerate(d["stages"]):
                where = f"stage {i + 1}"
                if not isinstance(s, dict):
                    raise PlanError(f"stage {i + 1}: expected a mapping, found {s!r}")
                where = f"stage {i + 1} ({s.get('name', '?')})"
                s = _check_fields(Stage, s, where)
                for key in ("name", "teacher"):
                    if key not in s:
                        raise PlanError(f"{where}: missing {key!r}")
                stages.append(Stage(**{**s, "teacher": path(s["teacher"])}))
            where = "student"
            student = DetectorSpec(**_check_fields(DetectorSpec, d["student"], "student"))
            where = "data"
            data_d = _check_fields(DataConfig, d["data"], "data")
            data = DataConfig(**{k: (path(v) if k not in ("masks", "labels") else v) for k, v in data_d.items()})
            where = "plan"
            return cls(name=d["name"], student=student, data=data, stages=stages, out_dir=path(d["out_dir"]),
                       student_init=path(d.get("student_init")), train=tcfg)
        except PlanError:
            raise
        except (TypeError, ValueError) as e:
            raise PlanError(f"{where}: {e}") from e


def _check_fields(cls: type, values: Any, where: str) -> dict[str, Any]:
    try:
        return check_fields(cls, values, where)
    except ConfigError as e:  # the message names `where` and the field already
        raise PlanError(str(e)) from None


def _check_loss_params(stage: Stage) -> dict[str, Any]:
    """The stage's loss parameters of the type of their defaults and in range (ConfigError): the loss is built
    once, at a usual FPN width, to run its own checks (a known loss, known parameters, their ranges)."""
    accepted = loss_hparams(stage.loss)
    params = {}
    for key, value in stage.loss_params.items():
        default = accepted.get(key)
        kind = type(default) if isinstance(default, (bool, int, float, str)) else Any
        params[key] = check_value(value, kind, f"loss_params: {key}")
        if isinstance(params[key], float) and not math.isfinite(params[key]):
            raise ConfigError(f"loss_params: {key} must be a finite number, got {params[key]}")
    try:
        build_loss(stage.loss, 256, 256, **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss_params: {e}") from e
    return params


def selection_to_stages(selection: Selection, teacher_checkpoints: dict[str, str | os.PathLike],
                        **stage_fields: Any) -> list[Stage]:
    """One `Stage` per selected teacher, in the selected order: ``Stage(name=teacher name,
    teacher=its checkpoint, **stage_fields)`` (e.g. loss="mgd")."""
    missing = [t for t in selection.order if t not in teacher_checkpoints]
    if missing:
        raise PlanError(f"no checkpoint given for selected teachers {missing} "
                         f"(checkpoints given for {sorted(teacher_checkpoints)})")
    return [Stage(name=t, teacher=str(teacher_checkpoints[t]), **stage_fields) for t in selection.order]


def plan_from_selection(selection: Selection, teacher_checkpoints: dict[str, str], student_checkpoint: str,
                        data: DataConfig, out_dir: str | os.PathLike, *, name: str = "progressive",
                        loss: str = "mgd", loss_params: dict[str, Any] | None = None,
                        train: TrainConfig | None = None, fine_tune: bool = False) -> Plan:
    """A plan through the selected teacher order (`pkdkit.ordering.Selection`), one stage per teacher, for
    the student of `student_checkpoint`: by default the paper's protocol (its spec from the initial weights,
    seeded as the checkpoint's own training was, with the first teacher's neck and head); with `fine_tune`,
    starting from the checkpoint's trained weights."""
    payload = load_checkpoint(student_checkpoint)
    student = DetectorSpec.from_dict(payload["spec"])
    seed = payload.get("config", {}).get("train", {}).get("seed", 0)
    stages = selection_to_stages(selection, teacher_checkpoints, loss=loss, loss_params=dict(loss_params or {}))
    return Plan(name=name, student=student, data=data, stages=stages, out_dir=str(Path(out_dir).resolve()),
                student_init=str(Path(student_checkpoint).resolve()) if fine_tune else None,
                train=train or TrainConfig(seed=seed))


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan from YAML or JSON (chosen by extension; YAML also reads JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {reason(e)}") from e
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PlanError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(d, dict):
        raise PlanError(f"{path}: expected a mapping at the top level, found {type(d).__name__}")
    try:
        return Plan.from_dict(d, base_dir=path.parent)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from e


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    return write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False), path)


# ----------------------------------------------------------------------------------------------------
def validate_plan(plan: Plan, dataset_label_map: LabelMap) -> None:
    """Fail early and clearly, on what needs the data and the teachers (a plan's own settings are checked when
    it is made): no stages, missing teacher, class mismatch, unmatched levels."""
    if not plan.stages:
        raise PlanError(f"plan {plan.name!r} has no stages: give at least one teacher")
    try:
        dataset_label_map.check_num_classes(plan.student.num_classes, "student", plan.data.train_json)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    if plan.student_init and not Path(plan.student_init).is_file():
        raise PlanError(f"student_init checkpoint not found: {plan.student_init}")
    student_levels = feature_levels(build_detector(replace(plan.student, weights=None, backbone_weights=None)))
    names = [s.name for s in plan.stages]
    if len(set(names)) != len(names):
        raise PlanError(f"stage names must be unique, found {names}")
    for k, stage in enumerate(plan.stages):
        where = f"stage {k + 1} ({stage.name})"
        size = stage.teacher_size
        if size is not None and not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise PlanError(f"{where}: teacher_size must be [min_size, max_size] in pixels, found {size!r}")
        try:
            t_spec, t_map = model_meta(stage.teacher)
        except CheckpointError as e:
            raise PlanError(f"{where}: teacher {e}") from e
        # Feature distillation needs no common classes; head inheritance copies the rows of the categories
        # both know (by name), so it needs at least one.
        if stage.inherit_teacher_head and not t_map.match_by_name(dataset_label_map):
            raise PlanError(f"{where}: inherit_teacher_head: teacher {stage.teacher} shares no category (by name) "
                            f"with the data ({plan.data.train_json}: {list(dataset_label_map.names)[:8]}...; "
                            f"teacher: {list(t_map.names)[:8]}...); set inherit_teacher_head: false")
        if stage.head_loss is not None:
            two_stage = [f"{who} is a {spec.arch}" for who, spec in (("student", plan.student), ("teacher", t_spec))
                         if spec.arch not in DENSE_ARCHS]
            if two_stage:
                raise PlanError(f"{where}: head_loss {stage.head_loss!r} is for dense heads ({', '.join(DENSE_ARCHS)}); "
                                f"the {' and the '.join(two_stage)} (two-stage): remove head_loss")
            if not t_map.match_by_name(dataset_label_map):
                raise PlanError(f"{where}: head_loss: teacher {stage.teacher} shares no category (by name) with the "
                                f"data ({plan.data.train_json}); remove head_loss")
            t_size = list(size or (t_spec.min_size, t_spec.max_size))
            s_size = [plan.student.min_size, plan.student.max_size]
            same_boxes = plan.student.arch != "retinanet" or t_spec.anchor_sizes == plan.student.anchor_sizes
            if t_spec.arch != plan.student.arch or t_size != s_size or not same_boxes:
                raise PlanError(f"{where}: head_loss needs the student's anchors in the teacher: the same detector "
                                f"(student {plan.student.arch}, teacher {t_spec.arch}) at the same input size "
                                f"(student {s_size}, teacher {t_size}; see teacher_size) with the same anchor sizes "
                                f"(student {plan.student.anchor_sizes}, teacher {t_spec.anchor_sizes}); remove head_loss")
        t_levels = feature_levels(build_detector(replace(t_spec, weights=None, backbone_weights=None)))
        try:
            common_levels({"student": student_levels, "teacher": t_levels}, stage.levels)
        except ValueError as e:
            raise PlanError(f"{where}: {e}") from e


def _plan_diff(a: dict[str, Any], b: dict[str, Any], *, besides: frozenset[str] | set[str] = frozenset()
               ) -> tuple[list[str], list[list[str]]]:
    """How two plans (`Plan.to_dict()`) differ in what identifies a run (`pkdkit.runid.run_diff`), besides the
    plan-level keys `besides`: (the plan-level differences, [the differences of stage k] for each k both have)."""
    own = {"stages", *besides}
    settings = run_diff({k: v for k, v in a.items() if k not in own}, {k: v for k, v in b.items() if k not in own})
    return settings, [run_diff(s, t) for s, t in zip(a["stages"], b["stages"])]


def _check_same_plan(plan: Plan, saved_path: Path) -> None:
    """A run directory belongs to one plan: refuse to mix its finished stages with a changed plan.
    Appending stages, or changing settings that do not identify a run (`pkdkit.runid`), is allowed;
    RunMismatchError names each change."""
    if not saved_path.exists():
        return
    saved = load_plan(saved_path).to_dict()
    diff, stages = _plan_diff(saved, plan.to_dict())
    stages += [["removed"]] * (len(saved["stages"]) - len(stages))
    diff += [f"stage {i + 1} ({s['name']}) {c}" for i, s in enumerate(saved["stages"]) for c in stages[i]]
    if diff:
        raise mismatch(diff, f"{plan.out_dir} holds a run of a different plan",
                       f"see {saved_path}; use another out_dir, or delete it to start over")


def shared_stages(plan: Plan, other: Plan) -> int:
    """How many leading stages `plan` and `other` train identically: the same student, initialisation, data and
    training settings (up to those that do not identify a run, `pkdkit.runid`) and the same stages in the same order. Stage k's seed, starting
    weights and schedule depend on nothing else, so those stages of the two plans are one and the same run."""
    settings, stages = _plan_diff(plan.to_dict(), other.to_dict(), besides={"name", "out_dir"})
    if settings:
        return 0
    return next((k for k, changed in enumerate(stages) if changed), len(stages))


def reuse_stages(plan: Plan, others: list[Plan], *, progress: bool = True) -> int:
    """Give `plan` the finished leading stages it shares with one of `others` (`shared_stages`) instead of
    training them again: each such stage folder's files are linked into `plan`'s (`pkdkit.files.link_files`),
    so `run_plan` finds the stage finished and goes on from its student. Stages `plan` has finished itself are
    left as they are. When the selection chooses one teacher, `reversed` starts with the stage `progressive`
    is, and this trains it once. Returns how many stages `plan` now takes from another plan."""
    best, n = None, 0
    for other in others:
        shared = shared_stages(plan, other)
        shared = next((k for k in range(shared) if not other.stage_finished(k)), shared)
        if other.out_dir != plan.out_dir and shared > n:
            best, n = other, shared
    for k in range(n):
        if not plan.stage_finished(k):
            link_files(best.stage_dir(k), plan.stage_dir(k))
            if progress:
                step(f"{plan.name} stage {k + 1}/{len(plan.stages)} ({plan.stages[k].name}): the same run as "
                     f"{best.name}'s stage {k + 1} (same student, initialisation, teacher, settings and seed); "
                     f"its files are linked from {best.stage_dir(k)}, not trained again")
    return n


def run_plan(plan: Plan, *, progress: bool = True) -> dict[str, Any]:
    """Run every stage in order (skipping finished ones), evaluate after each, return the summary.

    Summary: {"plan", "rows": {["baseline": the fine-tuned checkpoint's record,] "<stage name>": eval record,
    ...}, "table": markdown}. Each stage's record config holds the stage (teacher, effective loss parameters
    and levels, what the student inherited, the loss-weight calibration) and the run's `budget`.
    """
    run = _PlanRun.open(plan, progress)
    student = _starting_student(run)
    for k, stage in enumerate(plan.stages):
        cfg = plan.stage_train(k)
        student.epochs += cfg.epochs
        if plan.stage_finished(k):
            record = EvalRecord.read(plan.stage_record(k))
            student.init = record.budget["init"]
        else:
            distiller, stage_config = _prepare_stage(run, student, k, cfg)
            record = _train_stage(run, k, cfg, distiller, stage_config)
        if run.info.is_main:
            run.rows[stage.name] = record
        student.ref = str(plan.stage_student(k))
    return run.summary()


@dataclass
class _PlanRun:
    """What the stages of one `run_plan` call share: the plan, this process, the data, and the rows of the
    summary (records on the main process only)."""

    plan: Plan
    progress: bool
    info: DistInfo
    val_ds: CocoDetection
    train_ds: CocoDetection
    device: torch.device
    rows: dict[str, EvalRecord] = field(default_factory=dict)

    @classmethod
    def open(cls, plan: Plan, progress: bool) -> "_PlanRun":
        """Read and check the data and the plan, refuse a run directory of another plan, save the plan there."""
        info = init_distributed(plan.train.device)
        val_ds = plan.data.val_dataset()
        validate_plan(plan, val_ds.label_map)
        run = cls(plan, progress, info, val_ds, plan.data.train_dataset(val_ds.label_map),
                  resolve_device(plan.train.device))
        _check_same_plan(plan, plan.plan_file)
        if info.is_main:
            save_plan(plan, plan.plan_file)
        return run

    @property
    def label_map(self) -> LabelMap:
        return self.val_ds.label_map

    def say(self, message: str) -> None:
        if self.progress and self.info.is_main:
            step(message)

    def evaluate(self, model: nn.Module, folder: Path, config: dict[str, Any]) -> EvalRecord:
        """Evaluate `model` on the validation set into `folder` (`eval.json`), its record carrying `config`."""
        return evaluate_detector(model, self.val_ds, self.label_map, out_dir=folder, name="eval", device=self.device,
                                 config=config, progress=self.progress)

    def summary(self) -> dict[str, Any]:
        """{"plan"[, "rows", "table"] (main process)}, written to `Plan.summary_file` and its table printed."""
        summary: dict[str, Any] = {"plan": self.plan.to_dict()}
        if self.info.is_main:
            summary["rows"] = self.rows
            summary["table"] = comparison_table(self.rows)
            write_json(summary, self.plan.summary_file)
            if self.progress:
                print(f"\n{self.plan.name}: student after each stage (val set)\n{summary['table']}")
        return summary


@dataclass
class _Student:
    """The plan's student between stages: where the next stage starts from and the budget so far."""

    model: nn.Module  # what stage 1 starts from; later stages load `ref`
    init: str  # the budget's initialisation label
    ref: str  # "initial", the fine-tuned checkpoint, or the last finished stage's student.pt
    epochs: int  # the student's total epochs so far


def _starting_student(run: _PlanRun) -> _Student:
    """The student before stage 1, seeded by the plan's seed: its initial weights, or the checkpoint a
    fine-tuning plan starts from (evaluated once, as the summary's "baseline" row)."""
    plan = run.plan
    seed_everything(plan.train.seed)
    if not plan.fine_tunes:
        return _Student(build_detector(plan.student), initial_weights_label(plan.student, plan.train.seed),
                        "initial", 0)
    model, _, _ = load_model(plan.student_init, expected=plan.student)
    start = Path(plan.student_init)
    student = _Student(model, f"fine-tune of {start.parent.name}/{start.name}", plan.student_init,
                       int(budget_of(load_checkpoint(start).get("config")).get("epochs", 0)))
    baseline = evaluation_files(Path(plan.out_dir) / "baseline")[0]
    if run.info.is_main:
        budget = {"init": student.init, "epochs": student.epochs}
        run.rows["baseline"] = (EvalRecord.read(baseline) if baseline.exists()
                                else run.evaluate(model, baseline.parent, {**plan.to_dict(), "budget": budget}))
    return student


def _prepare_stage(run: _PlanRun, student: _Student, k: int, cfg: TrainConfig) -> tuple[Distiller, dict[str, Any]]:
    """Stage k's Distiller, seeded by the stage: the student handed over from stage k-1 (stage 1: `student`,
    inheriting the teacher's neck and head where the plan says so), the teacher and the calibrated
    distillation weight; and the config its checkpoints and record carry."""
    plan, stage = run.plan, run.plan.stages[k]
    seed_everything(cfg.seed + 1000 * (k + 1))
    model = student.model if k == 0 else load_model(student.ref, expected=plan.student)[0]
    teacher, t_spec, t_map = load_model(stage.teacher, size=stage.teacher_size)
    fingerprint = state_fingerprint(model)
    inherited = inherit_teacher_head(model, teacher, run.label_map, t_map) if plan.inherits(k) else None
    if inherited is not None:
        student.init += f" + neck/head of {stage.name} ({len(inherited['copied'])} tensors)"
        run.say(_inheritance_message(stage, inherited))
    head = None
    if stage.head_loss is not None:
        try:
            head = build_head_distill(model, teacher, stage.head_loss, stage.head_loss_weight, stage.head_temperature,
                                      run.label_map, t_map)
        except ConfigError as e:
            raise PlanError(f"stage {k + 1} ({stage.name}): {e}") from None
        if head.skipped:
            run.say(f"stage {k + 1} ({stage.name}): head_loss {stage.head_loss}: the teacher does not know the "
                    f"categories {head.skipped}; they are left out of the response distillation")
    distiller = build_distiller(model, teacher, stage.loss, stage.loss_params or None, stage.levels, head=head)
    calibration = _calibrate(distiller, stage, run.train_ds, cfg, plan.stage_calibration(k), run.device,
                             run.info.is_main)
    distiller.weight = calibration["weight"]
    run.say(f"{plan.name} stage {k + 1}/{len(plan.stages)} ({stage.name}): distillation weight {distiller.weight:.4g}"
            + (f" (auto: distillation starts at {stage.loss_ratio:g}x the detection loss)"
               if stage.loss_weight == "auto" else "")
            + (f"; at the start distillation / detection = {calibration['start_ratio']:.3g}"
               if "start_ratio" in calibration else ""))
    first = next(iter(distiller.losses.values()))
    stage_config = {**plan.to_dict(), "budget": {"init": student.init, "epochs": student.epochs},
                    "stage": {**asdict(stage), "index": k + 1, "init_from": student.ref,
                              "init_fingerprint": fingerprint, "teacher_spec": t_spec.to_dict(), "inherited": inherited,
                              "levels_used": list(distiller.losses),
                              "loss_params_used": {n: getattr(first, n) for n in loss_hparams(stage.loss)},
                              "loss_weight_used": distiller.weight, "calibration": calibration,
                              **({"head_classes_skipped": head.skipped} if head is not None else {})}}
    return distiller, stage_config


def _inheritance_message(stage: Stage, inherited: dict[str, Any]) -> str:
    skipped = inherited["skipped_classes"]
    return (f"stage 1 ({stage.name}): the student inherits {len(inherited['copied'])} neck/head tensors from the "
            f"teacher (classifier rows of {len(inherited['matched_classes'])} categories matched by name); skipped "
            f"{len(inherited['skipped'])} tensors (absent or another shape)"
            + (f" and the categories {skipped[:5]}{'...' if len(skipped) > 5 else ''}" if skipped else ""))


def _train_stage(run: _PlanRun, k: int, cfg: TrainConfig, distiller: Distiller,
                 stage_config: dict[str, Any]) -> EvalRecord | None:
    """Train stage k, then (main process) save its student (`Plan.stage_student`, the hand-over) and evaluate
    it; returns the record (None on the other processes)."""
    plan, stage = run.plan, run.plan.stages[k]
    where = f"{plan.name} stage {k + 1}/{len(plan.stages)}"
    cfg = cfg.replace(progress=run.progress and cfg.progress)
    history = train(distiller, run.train_ds, cfg, plan.stage_dir(k), desc=f"{where} {stage.name}",
                    config=stage_config, step_offset=_step_offset(plan, k))
    record = None
    if run.info.is_main:
        done = {**stage_config, RAN_ON: ran_on(cfg, run.info)}  # where it was trained: in its student and record
        save_detector(plan.stage_student(k), distiller.student, plan.student, run.label_map, config=done)
        record = note_evaluation(plan.stage_dir(k), run.evaluate(distiller.student, plan.stage_dir(k), done),
                                 history, cfg, where)
        run.say(f"{where} ({stage.name}): evaluated, AP {record.ap:.3f}")
    barrier(run.info)
    return record


def _step_offset(plan: Plan, k: int) -> int:
    """The global step stage k's TensorBoard curves start after: where stage k - 1's history ended (its last
    epoch's "step"), so a plan's stages read as one set of curves; 0 for stage 1 (or a history without steps)."""
    if k == 0 or not plan.stage_history(k - 1).exists():
        return 0
    epochs = json.loads(plan.stage_history(k - 1).read_text())["epochs"]
    return int(epochs[-1].get("step", 0)) if epochs else 0


CALIBRATION_BATCHES = 4


def _calibrate(distiller: nn.Module, stage: Stage, train_ds: Any, cfg: TrainConfig, path: Path,
               device: Any, is_main: bool) -> dict[str, Any]:
    """The stage's distillation weight, and how large distillation starts relative to detection, measured
    on the first `CALIBRATION_BATCHES` training batches (`pkdkit.distill.calibrate_loss_weight`). Written to
    `path` (`Plan.stage_calibration`) once, so a resumed stage uses the same weight."""
    if path.exists():
        return json.loads(path.read_text())
    if stage.loss_weight == 0:
        return {"weight": 0.0}
    loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed)
    batches = itertools.islice(iter(loader), CALIBRATION_BATCHES)
    auto = stage.loss_weight == "auto"
    result = calibrate_loss_weight(distiller, batches, stage.loss_ratio if auto else None, device)
    result["weight"] = result["weight"] if auto else float(stage.loss_weight)
    result["start_ratio"] = result["weight"] * result["distillation"] / result["detection"]
    if is_main:
        write_json(result, path)
    return result
