"""`pkdkit doctor PLAN`: the checks that answer "AP stays 0" and "the loss does not fall" before a plan runs.

The usual causes, across the issue trackers of distillation code (MMRazor, the MGD/FGD repositories, YOLO
distillers), are a teacher that did not load or does not detect on the user's data, a class mismatch, a
distillation term that swamps the detection loss, one FPN level that carries nearly all of it, and a learning
rate not scaled to the batch. Each check gives one `Finding` (OK / WARN / FAIL, with the likely cause and the
fix):

- ``load``: the student and every teacher load with no missing or unexpected weights;
- ``teacher_ap``: each teacher's AP on the first `DoctorSettings.images` validation images, its classes matched
  to the data's by name, is above 0 (a teacher that detects nothing is a FAIL naming the stage and the teacher);
- ``levels``: the distilled FPN levels are in both models (levels are named by stride, ``p3`` = 1/8), with
  their channels (an adapter where they differ) and the teacher's input scale;
- ``loss_ratio`` / ``level_share``: the distillation / detection ratio at the start (the weight the stage will
  use: its ``calibration.json`` when it ran before, else the calibrated or given ``loss_weight``), and each
  level's share of the distillation term (WARN when one level carries more than `MAX_LEVEL_SHARE` or a level
  is 0);
- ``smoke_run``: `DoctorSettings.steps` training steps of stage 1 at the stage's peak learning rate, on one fixed
  batch, in which the detection loss must fall (an optimiser that cannot fit one batch will not fit the data);
- ``lr``: the learning rate against the batch (`suggested_lr`, the linear scaling rule);
- ``teacher_frozen``: the teacher as the `Distiller` holds it: no parameter requires a gradient, every module in
  eval mode, its weights unchanged by the smoke run.

Everything runs on the doctor's own models in memory, built as `pkdkit.plan.run_plan` builds them; the one file
written is the report, `doctor.json` in the plan's out_dir (records {check, status, stage, message}). Stage 1
starts from a student that exists before the plan runs; a later stage starts from the previous stage's
`student.pt`, so its ratio and level shares are measured on it when that stage has finished, else on stage 1's
starting student (the message says which). Checks shared by several plans (the same teacher, the same stage)
run once (`run_doctor` on a list of plans, as notebook 3 calls it).
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from pycocotools.coco import COCO
from torch import nn

from pkdkit.alarms import level_shares
from pkdkit.config import check_range, check_types
from pkdkit.data import CocoDetection, LabelMap, make_loader
from pkdkit.distill import Distiller, build_distiller, calibrate_loss_weight, inherit_teacher_head
from pkdkit.engine import (FiniteChecks, NonFiniteLossError, StepAt, TrainConfig, build_optimizer, resolve_device,
                           seed_everything, train_step)
from pkdkit.errors import PkdkitError
from pkdkit.evaluate import coco_evaluate, predict
from pkdkit.features import input_scale
from pkdkit.files import write_json
from pkdkit.models import (CheckpointError, DetectorSpec, build_detector, is_torchvision_weight, load_checkpoint,
                           load_model, state_fingerprint)
from pkdkit.plan import Plan
from pkdkit.progress import bar as progress_bar, step as progress_step

REPORT = "doctor.json"  # the doctor's report in a plan's out_dir
STATUSES = ("OK", "WARN", "FAIL")
# The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): the 1x detection schedule of
# torchvision/MMDetection uses SGD at 0.01 for 16 images per step; lr scales with the batch.
REFERENCE_LR, REFERENCE_BATCH = 0.01, 16
LR_TOLERANCE = 2.0  # WARN when the learning rate is off the rule by more than this factor
MAX_LEVEL_SHARE = 0.8  # WARN when one FPN level carries more of the distillation term than this
ZERO_SHARE = 1e-3  # a level whose share is below this counts as 0
RATIO_RANGE = (0.01, 10.0)  # distillation / detection at the start: WARN outside (negligible / swamping)


@dataclass
class Finding:
    """One check's outcome: `status` OK / WARN / FAIL, `stage` the plan and stage it is about (None: the whole
    plan), `message` what was found and, for WARN and FAIL, the likely cause and the fix."""

    check: str
    status: str
    stage: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.status:<4} {self.check}: " + (f"{self.stage}: " if self.stage else "") + self.message


class Findings(list):
    """The doctor's findings in order (a list of `Finding`); printed one line each, shown as a table in a
    notebook."""

    @property
    def failed(self) -> bool:
        return any(f.status == "FAIL" for f in self)

    def records(self) -> list[dict[str, Any]]:
        """{check, status, stage, message} per finding: what `doctor.json` holds."""
        return [asdict(f) for f in self]

    def counts(self) -> dict[str, int]:
        return {s: sum(f.status == s for f in self) for s in STATUSES}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        return "\n".join([*map(str, self), f"doctor: {counts}"])

    def _repr_markdown_(self) -> str:
        def cell(text: str | None) -> str:
            return (text or "").replace("|", "\\|")

        rows = [f"| {f.status} | {f.check} | {cell(f.stage)} | {cell(f.message)} |" for f in self]
        return "\n".join(["| status | check | stage | finding |", "|---|---|---|---|", *rows, "",
                          ", ".join(f"**{n} {s}**" for s, n in self.counts().items())])


@dataclass
class DoctorSettings:
    """How much work each check does. Notebook 3's quick look (steps=5, batches=1) on its four tiny plans (two
    teachers, 64 px) took 4.2 s on 2 quiet CPU cores (a smoke step 0.2 s; the defaults run 4x the steps on 2x
    the batches); tests use fewer steps still (on one batch of a 16-image dataset a few steps show the fall).

    images: validation images each teacher is evaluated on; batches: training batches the loss ratio and the
    level shares are measured on; steps: smoke-run steps; batch_size: images per batch (None: the stage's);
    gpus: processes the plan runs on, so the effective batch of the learning-rate rule is batch_size x gpus."""

    images: int = 8
    batches: int = 2
    steps: int = 20
    batch_size: int | None = None
    gpus: int = 1

    def __post_init__(self) -> None:
        check_types(self, "doctor setting")
        for name in ("images", "batches", "gpus"):
            check_range(name, getattr(self, name), 1)
        check_range("steps", self.steps, 2)  # a fall needs a first and a last step
        check_range("batch_size", self.batch_size, 1)


# ----------------------------------------------------------------------------------------------------
# The rules, on numbers
def suggested_lr(batch_size: int) -> float:
    """The linear scaling rule: `REFERENCE_LR` at `REFERENCE_BATCH` images per step, scaled with the batch."""
    return REFERENCE_LR * batch_size / REFERENCE_BATCH


def lr_finding(lr: float, batch_size: int, optimizer: str = "sgd", stage: str | None = None) -> Finding:
    """The learning rate `lr` at an effective batch of `batch_size` images (all processes) against
    `suggested_lr`: WARN when off by more than `LR_TOLERANCE` times either way. The rule is SGD's; for AdamW it
    is not checked (OK, said so)."""
    good = suggested_lr(batch_size)
    if optimizer != "sgd":
        return Finding("lr", "OK", stage, f"lr {lr:g} with {optimizer} at batch {batch_size}: the linear scaling "
                                          f"rule (SGD {REFERENCE_LR:g} at batch {REFERENCE_BATCH}) is for SGD, not "
                                          f"checked")
    factor = lr / good
    where = f"lr {lr:g} at batch {batch_size} is {factor:.3g}x the linear scaling rule's {good:.3g}"
    if factor > LR_TOLERANCE:
        return Finding("lr", "WARN", stage, f"{where} ({REFERENCE_LR:g} at batch {REFERENCE_BATCH}): too high, the "
                                            f"loss may diverge or stay flat; try lr {good:.3g}")
    if factor < 1 / LR_TOLERANCE:
        return Finding("lr", "WARN", stage, f"{where} ({REFERENCE_LR:g} at batch {REFERENCE_BATCH}): too low, the "
                                            f"schedule may end before the model learns; try lr {good:.3g}")
    return Finding("lr", "OK", stage, where)


def ratio_finding(ratio: float, weight: float, stage: str | None = None, note: str = "") -> Finding:
    """The distillation / detection ratio at the start of a stage (with its distillation `weight`): WARN outside
    `RATIO_RANGE`."""
    where = f"at the start distillation / detection = {ratio:.3g} (weight {weight:.4g}){note}"
    if weight == 0:
        return Finding("loss_ratio", "OK", stage, f"loss_weight 0: distillation is off{note}")
    lo, hi = RATIO_RANGE
    if not ratio <= hi:
        return Finding("loss_ratio", "WARN", stage, f"{where}: distillation swamps the detection loss, which then "
                                                    f"hardly falls; set loss_weight: auto (loss_ratio 1) or divide "
                                                    f"loss_weight by {ratio:.3g}")
    if ratio < lo:
        return Finding("loss_ratio", "WARN", stage, f"{where}: distillation barely counts, the stage trains like the "
                                                    f"baseline; set loss_weight: auto (loss_ratio 1) or raise "
                                                    f"loss_weight")
    return Finding("loss_ratio", "OK", stage, where)


def level_share_finding(terms: dict[str, float], stage: str | None = None, note: str = "") -> Finding:
    """Each level's share of the distillation term `terms` ({level: term}): WARN when one level carries more
    than `MAX_LEVEL_SHARE` or a level's share is below `ZERO_SHARE` (it is not distilled at all)."""
    shares = level_shares(terms) or dict.fromkeys(terms, 0.0)
    text = ", ".join(f"{level} {100 * s:.1f}%" for level, s in shares.items())
    big = [level for level, s in shares.items() if s > MAX_LEVEL_SHARE]
    zero = [level for level, s in shares.items() if s < ZERO_SHARE]
    problems = []
    if big:
        problems.append(f"{big[0]} carries more than {MAX_LEVEL_SHARE:.0%} of the distillation term")
    if zero:
        problems.append(f"{', '.join(zero)} {'is' if len(zero) == 1 else 'are'} 0 (not distilled)")
    if not problems:
        return Finding("level_share", "OK", stage, f"shares of the distillation term: {text}{note}")
    return Finding("level_share", "WARN", stage,
                   f"shares of the distillation term: {text}{note}: {'; '.join(problems)}. Likely cause: feature "
                   f"magnitudes differ by level (from-scratch maps, a level without objects of its size); fix: "
                   f"distil the levels that matter (stage `levels`), or a loss that normalises per level "
                   f"(pkd, cwd)")


def frozen_finding(distiller: Distiller, stage: str | None = None, before: str | None = None) -> Finding:
    """The teacher as `distiller` holds it: no parameter requires a gradient, no module in train mode, none of
    its parameters among the distiller's (the optimiser's), and, with `before` (its `state_fingerprint` before
    training steps), its weights unchanged."""
    teacher = distiller.teacher
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    training = [n or "(the model)" for n, m in teacher.named_modules() if m.training]
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in distiller.parameters()}
    changed = before is not None and state_fingerprint(teacher) != before
    problems = ([f"{len(trainable)} parameters require gradients (e.g. {trainable[0]})"] if trainable else []) + \
               ([f"{len(training)} modules are in train mode (e.g. {training[0]}): BatchNorm statistics move"]
                if training else []) + \
               ([f"{len(shared)} of its parameters are trained with the student"] if shared else []) + \
               (["its weights changed during the smoke run"] if changed else [])
    if problems:
        return Finding("teacher_frozen", "FAIL", stage, "the teacher is not frozen: " + "; ".join(problems) +
                       ". Fix: hold it as pkdkit.distill.Distiller does (teacher.eval().requires_grad_(False), kept "
                       "outside the module tree) and do not call .train() on it")
    return Finding("teacher_frozen", "OK", stage, "no parameter requires a gradient, every module in eval mode"
                                                  + (", weights unchanged by the smoke run" if before else ""))


# ----------------------------------------------------------------------------------------------------
# Checks that need models
def _fix_weights(ref: str) -> str:
    return (f"the checkpoint is not a {'' if is_torchvision_weight(ref) else 'pkdkit '}detector of the spec it "
            f"names (another arch, backbone, class count or FPN width, or a damaged file); fix: point the plan "
            f"at the right checkpoint, or train it again")


def weight_mismatch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, list[str]]:
    """How a state dict fits `model`: {"missing": model tensors it lacks, "unexpected": its tensors the model
    lacks, "shape": tensors of both with another shape}."""
    mine = model.state_dict()
    return {"missing": [k for k in mine if k not in state],
            "unexpected": [k for k in state if k not in mine],
            "shape": [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]}


def _load(ref: str, what: str, stage: str | None, **kwargs: Any) -> tuple[nn.Module | None, Any, LabelMap | None,
                                                                         Finding]:
    """(model, spec, label map, the ``load`` finding) of a model reference, strictly; the model is None when it
    failed (the finding says how: missing, unexpected or reshaped tensors counted)."""
    try:
        model, spec, label_map = load_model(ref, **kwargs)
    except CheckpointError as e:
        detail = str(e)
        try:
            payload = load_checkpoint(ref)
            built = build_detector(replace(DetectorSpec.from_dict(payload["spec"]), weights=None, backbone_weights=None))
            diff = weight_mismatch(payload["model"], built)
            detail = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in diff.items() if v) or detail
        except (PkdkitError, KeyError, TypeError):
            pass
        return None, None, None, Finding("load", "FAIL", stage, f"{what} {ref}: {detail}; likely cause: "
                                                                f"{_fix_weights(ref)}")
    except PkdkitError as e:
        return None, None, None, Finding("load", "FAIL", stage, f"{what} {ref}: {e}")
    n = len(model.state_dict())
    return model, spec, label_map, Finding("load", "OK", stage, f"{what} {ref}: all {n} tensors loaded, none "
                                                                f"missing or unexpected")


def first_images(dataset: CocoDetection, n: int) -> CocoDetection:
    """`dataset` restricted to its first `n` images (its ground truth too, so COCOeval scores only those)."""
    sub = copy.copy(dataset)
    sub.ids = dataset.ids[:n]
    keep = set(sub.ids)
    coco = COCO()
    coco.dataset = {**dataset.coco.dataset, "images": [dataset.coco.imgs[i] for i in sub.ids],
                    "annotations": [a for a in dataset.coco.dataset["annotations"] if a["image_id"] in keep]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    sub.coco = coco
    return sub


def teacher_ap_finding(teacher: nn.Module, teacher_labels: LabelMap, val_ds: CocoDetection, stage: str, ref: str,
                       device: torch.device, progress: bool = False) -> Finding:
    """The teacher's box AP on `val_ds` (a few images, `first_images`), its categories matched to the data's by
    name (`LabelMap.onto`): FAIL when it is 0 or no category matches."""
    matched = teacher_labels.onto(val_ds.label_map)
    where = f"teacher {ref}"
    if not matched.labels:
        return Finding("teacher_ap", "FAIL", stage,
                       f"{where} shares no category (by name) with the data ({list(val_ds.label_map.names)[:6]}; "
                       f"teacher: {list(teacher_labels.names)[:6]}): it cannot detect these objects; fix: a teacher "
                       f"trained on these categories, or rename the categories to match")
    if not val_ds.coco.dataset["annotations"]:
        return Finding("teacher_ap", "WARN", stage, f"{where}: not checked, the first {len(val_ds)} validation images "
                                                    f"have no objects; fix: run the doctor with more images")
    results = predict(teacher, val_ds, matched, device=device, progress=progress)
    ap = coco_evaluate(val_ds.coco, results)["bbox"]["stats"]["AP"] if results else 0.0
    found = (f"AP {max(ap, 0.0):.3g} on the first {len(val_ds)} validation images ({len(results)} detections, "
             f"{len(matched.labels)} of the data's {len(val_ds.label_map.labels)} categories matched by name)")
    if not ap > 0:
        return Finding("teacher_ap", "FAIL", stage,
                       f"{where} has {found}: it detects nothing here. Likely cause: the teacher is untrained or "
                       f"trained too briefly, did not load its weights, or was trained on other data or classes; "
                       f"fix: check it with `pkdkit evaluate`, train it longer, or use another teacher")
    return Finding("teacher_ap", "OK", stage, f"{where}: {found}")


def levels_finding(distiller: Distiller, teacher_size: list[int] | None, stage: str) -> Finding:
    """Which levels the stage distils, their strides, the channels of both models there (a 1x1 adapter where
    they differ) and the teacher's input scale (its maps are resized to the student's)."""
    parts = []
    for level, loss in distiller.losses.items():  # each loss was built for both models' channels at its level
        s, t = loss.student_channels, loss.teacher_channels
        parts.append(f"{level} (stride {2 ** int(level[1:])}, channels {s}" + (f" -> {t}, adapter" if s != t else "")
                     + ")")
    scale = input_scale(distiller.teacher, distiller.student)
    size = (f"; the teacher sees the batch x{scale:.3g} (teacher_size {teacher_size}) and its maps are resized to "
            f"the student's" if scale != 1 else "")
    return Finding("levels", "OK", stage, f"distils {', '.join(parts)}{size}")


def smoke_finding(distiller: Distiller, batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]],
                  cfg: TrainConfig, steps: int, device: torch.device, stage: str, progress: bool = False) -> Finding:
    """Train `distiller` (in place: give it a copy) for `steps` steps on one fixed `batch` at `cfg`'s peak
    learning rate (no warm-up), as `pkdkit.engine.train_step` trains: the detection loss must fall (WARN when
    it does not), and the loss and weights stay finite (FAIL)."""
    distiller.to(device).train()
    optimizer = build_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    checks = FiniteChecks(distiller)
    detection = []
    bar = progress_bar(total=steps, desc=f"doctor: smoke run {stage}", disable=not progress, leave=False)
    try:
        for i in range(steps):
            losses = train_step(distiller, *batch, optimizer, scheduler, scaler, cfg, device, checks=checks,
                                at=StepAt(0, i, i))
            detection.append(sum(v.item() for k, v in losses.items() if k != "loss" and not k.startswith("distill")))
            bar.update()
    except NonFiniteLossError as e:
        return Finding("smoke_run", "FAIL", stage, f"{e}. Likely cause: the learning rate ({cfg.lr:g}) is too high "
                                                   f"or the distillation weight too large; lower them")
    finally:
        bar.close()
    k = max(1, steps // 5)
    first, last = sum(detection[:k]) / k, sum(detection[-k:]) / k
    where = (f"{steps} steps on one batch of {len(batch[0])} images at lr {cfg.lr:g}: detection loss "
             f"{first:.4g} -> {last:.4g}")
    if not last < first:
        return Finding("smoke_run", "WARN", stage, f"{where}, it does not fall. Likely cause: a learning rate far "
                                                   f"from the rule (see lr), distillation swamping detection (see "
                                                   f"loss_ratio), or frozen student layers; fix those first")
    return Finding("smoke_run", "OK", stage, f"{where} ({100 * (1 - last / first):.0f}% lower)")


# ----------------------------------------------------------------------------------------------------
# A plan
class _Doctor:
    """One doctor run over one or more plans: settings, progress, and each check's findings by what it depends
    on, so that a teacher or a stage several plans share is checked once."""

    def __init__(self, settings: DoctorSettings, progress: bool) -> None:
        self.settings, self.progress = settings, progress
        self.memo: dict[str, Any] = {}
        self.combined: dict[int, Finding] = {}  # each finding once, naming every stage it is about

    def add(self, into: list[Finding], shared: list[Finding], stage: str) -> None:
        """Append `shared` (findings, maybe made for another plan's stage) to `into` as findings about `stage`."""
        for f in shared:
            mine = replace(f, stage=stage) if f.stage is not None else f
            into.append(mine)
            first = self.combined.setdefault(id(f), replace(mine))
            if mine.stage is not None and mine.stage not in first.stage.split("; "):
                first.stage += f"; {mine.stage}"

    def once(self, key: Any, compute: Callable[[], Any]) -> Any:
        key = json.dumps(key, sort_keys=True, default=str)
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def say(self, message: str) -> None:
        if self.progress:
            progress_step(f"doctor: {message}")


def _stage_label(plan: Plan, k: int) -> str:
    return f"{plan.name} stage {k + 1} ({plan.stages[k].name})"


def _plan_findings(doc: _Doctor, plan: Plan) -> list[Finding]:
    settings = doc.settings
    device = resolve_device(plan.train.device)
    val_ds = doc.once(("val", asdict(plan.data)), lambda: first_images(plan.data.val_dataset(), settings.images))
    train_ds = doc.once(("train", asdict(plan.data)), lambda: plan.data.train_dataset(val_ds.label_map))
    findings: list[Finding] = []

    def student() -> tuple[nn.Module | None, Finding]:
        if plan.fine_tunes:
            model, _, _, finding = _load(plan.student_init, "student", None, expected=plan.student)
            return model, finding
        seed_everything(plan.train.seed)
        try:
            model = build_detector(plan.student)
        except PkdkitError as e:
            return None, Finding("load", "FAIL", None, f"student {plan.student.name}: {e}")
        return model, Finding("load", "OK", None, f"student {plan.student.name}: initial weights"
                                                  + (f" from {plan.student.weights}" if plan.student.weights else "")
                                                  + f" (seed {plan.train.seed}), {len(model.state_dict())} tensors")

    start, finding = doc.once(("student", plan.student.to_dict(), plan.student_init, plan.train.seed), student)
    doc.add(findings, [finding], None)
    for k, stage in enumerate(plan.stages):
        label = _stage_label(plan, k)

        def teacher() -> tuple[nn.Module | None, LabelMap | None, list[Finding]]:
            doc.say(f"teacher {stage.name}: loading, evaluating on {len(val_ds)} validation images")
            model, _, labels, loaded = _load(stage.teacher, "teacher", label, size=stage.teacher_size)
            if model is None:
                return None, None, [loaded]
            return model, labels, [loaded, teacher_ap_finding(model, labels, val_ds, label, stage.teacher, device,
                                                              doc.progress)]

        t_model, t_labels, t_findings = doc.once(("teacher", stage.teacher, stage.teacher_size), teacher)
        doc.add(findings, t_findings, label)
        cfg = plan.stage_train(k)
        batch_size = settings.batch_size or cfg.batch_size
        doc.add(findings, [doc.once(("lr", cfg.lr, cfg.batch_size, cfg.optimizer, settings.gpus),
                                    lambda: lr_finding(cfg.lr, cfg.batch_size * settings.gpus, cfg.optimizer, label))],
                label)
        if start is None or t_model is None:
            continue
        previous = plan.stage_student(k - 1) if k else None
        finished = previous is not None and previous.exists()
        calibration = plan.stage_calibration(k)
        # what the stage's checks depend on: not its name, its schedule's length or its folder
        key = ("stage", asdict(stage) | {"name": None}, cfg.to_dict() | {"epochs": None, "checkpoint_every": None},
               calibration.read_text() if calibration.exists() else None, plan.student.to_dict(), plan.student_init,
               str(previous) if finished else None, plan.inherits(k), k == 0)
        doc.add(findings, doc.once(key, lambda: _stage_findings(doc, plan, k, start, t_model, t_labels,
                                                                val_ds.label_map, train_ds, cfg, batch_size, device,
                                                                finished)), label)
    return findings


def _stage_findings(doc: _Doctor, plan: Plan, k: int, start: nn.Module, teacher: nn.Module, t_labels: LabelMap,
                    labels: LabelMap, train_ds: CocoDetection, cfg: TrainConfig, batch_size: int,
                    device: torch.device, finished: bool) -> list[Finding]:
    """levels, loss_ratio, level_share, smoke_run (stage 1) and teacher_frozen of stage k, on copies of the
    student (the smoke run trains it; the teacher, shared with other stages, only runs in eval mode)."""
    stage, label = plan.stages[k], _stage_label(plan, k)
    doc.say(f"{label}: levels, loss ratio and level shares on {doc.settings.batches} "
            f"batch{'es' if doc.settings.batches != 1 else ''}"
            + (f", a smoke run of {doc.settings.steps} steps" if k == 0 else ""))
    seed_everything(cfg.seed + 1000 * (k + 1))
    if finished:
        student = load_model(plan.stage_student(k - 1), expected=plan.student)[0]
        note = f" (on stage {k}'s student)"
    else:
        student = copy.deepcopy(start)
        note = f" (on stage 1's starting student: stage {k} has not run yet)" if k else ""
    if plan.inherits(k):
        inherit_teacher_head(student, teacher, labels, t_labels)
    try:
        distiller = build_distiller(student, teacher, stage.loss, stage.loss_params or None, stage.levels)
    except PkdkitError as e:
        return [Finding("levels", "FAIL", label, f"{e}; fix: give the stage `levels` that both models have, or a "
                                                 f"teacher whose normalisation and FPN match the student's")]
    findings = [levels_finding(distiller, stage.teacher_size, label)]
    loader = make_loader(train_ds, batch_size, shuffle=True, seed=cfg.seed)
    batches = list(itertools.islice(iter(loader), doc.settings.batches))
    calibration = plan.stage_calibration(k)
    try:
        measured = calibrate_loss_weight(distiller, batches, stage.loss_ratio if stage.loss_weight == "auto" else None,
                                         device)
    except PkdkitError as e:  # auto: a loss that starts at 0 leaves nothing to calibrate against
        return findings + [Finding("loss_ratio", "FAIL", label, str(e))]
    if calibration.exists():
        weight = json.loads(calibration.read_text())["weight"]
    else:
        weight = measured["weight"] if stage.loss_weight == "auto" else float(stage.loss_weight)
    det = measured["detection"]
    ratio = weight * measured["distillation"] / det if det > 0 else math.inf
    findings += [ratio_finding(ratio, weight, label, note), level_share_finding(measured["levels"], label, note)]
    before = None
    if k == 0:
        distiller.weight = weight
        before = state_fingerprint(distiller.teacher)
        findings.append(smoke_finding(distiller, batches[0], cfg, doc.settings.steps, device, label, doc.progress))
    return findings + [frozen_finding(distiller, label, before)]


def run_doctor(plans: Plan | Iterable[Plan], settings: DoctorSettings | None = None, *, progress: bool = True,
               write: bool = True) -> Findings:
    """Run every check on `plans` (one plan, or several that share teachers and stages: each is checked once)
    and return the findings in order, each once (its `stage` names every plan stage it is about, joined by "; ");
    with `write`, each plan's own findings go to `doctor.json` in its out_dir, the one file the doctor writes. It seeds the RNGs as the plan's stages do (`run_plan` seeds them
    again)."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    doc = _Doctor(settings or DoctorSettings(), progress)
    for plan in plans:
        mine = Findings(_plan_findings(doc, plan))
        if write:
            write_json(mine.records(), Path(plan.out_dir) / REPORT)
    return Findings(doc.combined.values())
