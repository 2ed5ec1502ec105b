"""One distillation stage's model: a student, a frozen teacher and per-level feature losses.

As in the paper's released code (MMDetection + MGD): the teacher runs only its backbone+FPN, in eval mode
and without gradients, on the *same* transformed batch as the student, and a feature loss is added for each
FPN level. A teacher trained at another input size (a torchvision COCO teacher at 800 px, a student at
512 px) sees that batch rescaled to its own size, and its FPN maps are resized to the student's
(`pkdkit.features.features_at`). For the first stage the student may inherit the teacher's neck and head
weights; classifier rows are matched by category name.

The loss's hyper-parameters and levels default to what the authors used for the student's detector family
(`pkdkit.losses.loss_defaults`); `calibrate_loss_weight` measures how large the distillation term starts
compared with the detection loss, and can set the weight from that.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from pkdkit.data import LabelMap
from pkdkit.features import FeatureTap, common_levels, feature_levels, features_at, input_scale
from pkdkit.losses import HEAD_LOSSES, build_loss, loss_defaults
from pkdkit.models import detector_arch
from pkdkit.errors import ConfigError


class Distiller(nn.Module):
    """`forward(images, targets)` -> the student's detection losses plus ``distill_<level>`` losses.

    The teacher is held outside the module tree (`self._teacher`): it is not trained, not in
    `parameters()` or `state_dict()`, and stays in eval mode. Loss modules (1x1 adapters, MGD's
    generation block) are trained together with the student. `weight` multiplies every level's loss
    (on top of the loss's own weights, e.g. MGD's alpha): 0 turns feature distillation off.

    Random draws of the losses (MGD's masks: the losses with a `generator` attribute) come from the distiller's
    own CPU generator, in level order, which `seed_step` re-seeds before each training step: the masks depend on
    the run's seed and the step alone, not on what else draws from torch's global RNG (the data loader, the
    detector's samplers), so they are the same with any loader and when a run resumes.

    `head` (optional, `build_head_distill`): response distillation of a dense head, ``distill_head`` =
    its weight x its loss on the classification logits of the classes both models know; the student's
    logits come from a forward hook on ``student.head.classification_head`` (removed after each forward),
    the teacher's from its classification head on its FPN maps.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, nn.Module], weight: float = 1.0,
                 head: "HeadDistill | None" = None):
        super().__init__()
        _check_same_input(student, teacher)
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weight = float(weight)
        self.generator = torch.Generator()
        for loss in self.losses.values():
            if hasattr(loss, "generator"):
                loss.generator = self.generator
        self.head_kd = head
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)  # a tuple keeps nn.Module from registering it
        # A teacher with another input size sees the batch at its own size; its maps come back at the student's.
        self.teacher_scale = input_scale(teacher, student)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def seed_step(self, seed: int) -> None:
        """Seed the draws of the next forward (MGD's masks) with `seed`; `pkdkit.engine` calls it before each
        training step with `pkdkit.engine.step_seed` (the run's seed, the global step and the rank)."""
        self.generator.manual_seed(seed)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        logits: list[torch.Tensor] = []
        hook = (self.student.head.classification_head.register_forward_hook(lambda _m, _i, out: logits.append(out))
                if self.head_kd is not None else None)
        try:
            with FeatureTap(self.student) as tap:
                losses = dict(self.student(images, targets))
        finally:
            if hook is not None:
                hook.remove()
        student_feats = tap.features
        batch = tap.images.tensors  # (N, 3, H, W): what the student's backbone saw
        teacher = self.teacher
        if next(teacher.parameters()).device != batch.device:
            teacher.to(batch.device)
        with torch.no_grad():
            teacher_feats = features_at(teacher, batch, self.teacher_scale,
                                        {k: tuple(student_feats[k].shape[-2:]) for k in self.losses})
            teacher_logits = (teacher.head.classification_head(list(teacher_feats.values()))
                              if self.head_kd is not None else None)
        boxes = [t["boxes"] for t in tap.targets]
        for level, loss in self.losses.items():
            s, t = student_feats[level], teacher_feats[level]
            losses[f"distill_{level}"] = self.weight * loss(s, t, boxes=boxes, image_size=tuple(batch.shape[-2:]))
        if self.head_kd is not None:
            losses[HEAD_KEY] = self.head_kd(logits[-1], teacher_logits)
        return losses


HEAD_KEY = "distill_head"  # the loss name of response distillation (a "distill" loss to the engine's bar)
DENSE_ARCHS = ("retinanet", "fcos")  # detectors whose `head.classification_head` scores every anchor/location


class HeadDistill(nn.Module):
    """Response distillation of a dense head: `weight` x `loss` on the classification logits (N, A, K) of the
    student's classes `student_cols` against the teacher's `teacher_cols` (the same categories, matched by name).
    `skipped`: the student's category names the teacher does not know (left out of the loss)."""

    def __init__(self, loss: nn.Module, weight: float, student_cols: list[int], teacher_cols: list[int],
                 skipped: list[str]):
        super().__init__()
        self.loss, self.weight, self.skipped = loss, float(weight), list(skipped)
        self.student_cols, self.teacher_cols = list(student_cols), list(teacher_cols)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape[:2] != teacher_logits.shape[:2]:
            raise ConfigError(f"head distillation needs the same anchors in student and teacher, found "
                              f"{student_logits.shape[1]} and {teacher_logits.shape[1]} per image; use the same "
                              "input size, FPN levels and anchors per location")
        s = student_logits[..., torch.tensor(self.student_cols, device=student_logits.device)]
        t = teacher_logits[..., torch.tensor(self.teacher_cols, device=teacher_logits.device)]
        return self.weight * self.loss(s, t)


def build_head_distill(student: nn.Module, teacher: nn.Module, loss: str = "kd", weight: float = 1.0,
                       temperature: float = 1.0, student_labels: LabelMap | None = None,
                       teacher_labels: LabelMap | None = None) -> HeadDistill:
    """Response distillation for a dense (RetinaNet/FCOS) student and teacher with the same anchors: the same
    input size, FPN levels and anchors per location (ConfigError otherwise). With both label maps the
    classes are matched by name, as `inherit_teacher_head` matches classifier rows; without, both must have
    the same classes."""
    for who, model in (("student", student), ("teacher", teacher)):
        if detector_arch(model) not in DENSE_ARCHS:
            raise ConfigError(f"head_loss {loss!r} is for dense heads ({', '.join(DENSE_ARCHS)}); the {who} is a "
                              f"{detector_arch(model)} (two-stage): distil its features only")
    if loss not in HEAD_LOSSES:
        raise ConfigError(f"unknown head_loss {loss!r}; available: {sorted(HEAD_LOSSES)}")
    s_head, t_head = student.head.classification_head, teacher.head.classification_head
    if input_scale(teacher, student) != 1.0 or list(feature_levels(student)) != list(feature_levels(teacher)) \
            or s_head.num_anchors != t_head.num_anchors:
        raise ConfigError(f"head distillation needs the same anchors/locations in student and teacher: input size "
                          f"{student.transform.min_size[-1]} vs {teacher.transform.min_size[-1]}, FPN levels "
                          f"{list(feature_levels(student))} vs {list(feature_levels(teacher))}, anchors per location "
                          f"{s_head.num_anchors} vs {t_head.num_anchors}")
    if student_labels is not None and teacher_labels is not None:
        pairs = student_labels.match_by_name(teacher_labels)  # {student label: teacher label}
        if not pairs:
            raise ConfigError("head distillation: the teacher knows none of the student's categories (by name)")
        skipped = [n for n, lab in zip(student_labels.names, student_labels.labels) if lab not in pairs]
    elif s_head.num_classes == t_head.num_classes:
        pairs, skipped = {k: k for k in range(1, s_head.num_classes)}, []
    else:
        raise ConfigError(f"head distillation between {s_head.num_classes} and {t_head.num_classes} classes needs "
                          "both label maps to match the classes by name")
    return HeadDistill(HEAD_LOSSES[loss](temperature=temperature), weight, list(pairs), list(pairs.values()), skipped)


def _check_same_input(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.transform, teacher.transform
    if list(s.image_mean) != list(t.image_mean) or list(s.image_std) != list(t.image_std):
        raise ConfigError(f"teacher normalises images with mean {t.image_mean}, std {t.image_std} but the student "
                         f"with mean {s.image_mean}, std {s.image_std}; the teacher must see the student's batch")


def distill_levels(student: nn.Module, teacher: nn.Module, loss: str = "mgd",
                   levels: list[str] | None = None) -> list[str]:
    """The FPN levels a stage distils: `levels` if given (each must be in both models), else the levels the
    authors used for `loss` on the student's detector family that both models have (all common levels when
    the authors' set is not given)."""
    found = {"student": feature_levels(student), "teacher": feature_levels(teacher)}
    if levels is not None:
        return common_levels(found, levels)
    common = common_levels(found)
    wanted = loss_defaults(loss, detector_arch(student)).levels
    chosen = [lvl for lvl in common if wanted is None or lvl in wanted]
    if not chosen:
        raise ConfigError(f"the models share none of the levels {list(wanted)} that {loss} uses for a "
                         f"{detector_arch(student)} (common levels: {common}); give `levels` explicitly")
    return chosen


def distill_params(student: nn.Module, loss: str = "mgd", loss_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The loss's hyper-parameters for this student: the authors' values for its detector family
    (`pkdkit.losses.loss_defaults`), overridden by `loss_params`."""
    return {**loss_defaults(loss, detector_arch(student)).params, **(loss_params or {})}


def build_distiller(student: nn.Module, teacher: nn.Module, loss: str = "mgd", loss_params: dict[str, Any] | None = None,
                    levels: list[str] | None = None, weight: float = 1.0, head: HeadDistill | None = None) -> Distiller:
    """A Distiller with one `loss` per distilled FPN level (`distill_levels`), its hyper-parameters from
    `distill_params`, and `weight` on the feature distillation term; `head`: response distillation
    (`build_head_distill`) or None."""
    s_levels, t_levels = feature_levels(student), feature_levels(teacher)
    params = distill_params(student, loss, loss_params)
    losses = {k: build_loss(loss, s_levels[k], t_levels[k], **params)
              for k in distill_levels(student, teacher, loss, levels)}
    return Distiller(student, teacher, losses, weight, head)


def calibrate_loss_weight(distiller: Distiller, batches: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
                          ratio: float | None = None, device: str | torch.device = "cpu") -> dict[str, float]:
    """Measure the detection loss and the distillation term at the start of a stage, on a few training
    `batches` (``(images, targets)`` as the training loader yields them), without changing anything: weights,
    BatchNorm statistics and every RNG (the distiller's own generator too) are restored afterwards; the
    masks of batch k are seeded by k, so every call measures the same.

    Returns {"detection", "distillation" (with weight 1), "levels" ({level: its part of the distillation
    term, with weight 1}), "start_ratio" (distillation * current weight / detection), "batches"}; with
    `ratio`, also "ratio" and "weight" = ratio * detection / distillation, the
    weight at which the distillation term starts at `ratio` times the detection loss (not applied here).
    """
    device = torch.device(device)
    state, generator = copy.deepcopy(distiller.state_dict()), distiller.generator.get_state()
    weight, det, kd, n = distiller.weight, 0.0, 0.0, 0
    levels = dict.fromkeys(distiller.losses, 0.0)
    distiller.to(device).train()
    distiller.weight = 1.0
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.no_grad():
            for images, targets in batches:
                images = [im.to(device) for im in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                distiller.seed_step(n)  # the same masks on every call, whatever ran before
                losses = distiller(images, targets)
                kd += sum(v.item() for k, v in losses.items() if k.startswith("distill") and k != HEAD_KEY)
                for level in levels:
                    levels[level] += losses[f"distill_{level}"].item()
                det += sum(v.item() for k, v in losses.items() if not k.startswith("distill"))
                n += 1
    finally:
        distiller.weight = weight
        distiller.load_state_dict(state)
        distiller.generator.set_state(generator)
    if n == 0:
        raise ValueError("calibrate_loss_weight: no batches given")
    det, kd, levels = det / n, kd / n, {level: v / n for level, v in levels.items()}
    out = {"detection": det, "distillation": kd, "start_ratio": weight * kd / det if det > 0 else float("nan"),
           "levels": levels, "batches": n}
    if ratio is not None:
        if not ratio > 0:
            raise ValueError(f"loss ratio must be > 0, got {ratio}")
        if not (kd > 0 and det > 0):
            raise ConfigError(f"cannot calibrate the distillation weight: at the start the detection loss is {det:.4g} "
                             f"and the distillation loss {kd:.4g}; give a numeric loss_weight instead")
        out.update(ratio=float(ratio), weight=ratio * det / kd)
    return out


# Class-indexed tensors of torchvision detectors and how their first dimension is laid out:
# "anchor_major": (A * K, ...) with row a * K + k (RetinaNet and FCOS classifiers, A anchors per position);
# "class_major": (K * m, ...) with rows k * m .. k * m + m - 1 (Faster/Mask R-CNN: scores, 4 box deltas, masks).
CLASS_ROWS = {
    "head.classification_head.cls_logits.": "anchor_major",
    "roi_heads.box_predictor.cls_score.": "class_major",
    "roi_heads.box_predictor.bbox_pred.": "class_major",
    "roi_heads.mask_predictor.mask_fcn_logits.": "class_major",
}


def _copy_class_rows(mine: torch.Tensor, theirs: torch.Tensor, layout: str, k_mine: int, k_theirs: int,
                     pairs: dict[int, int]) -> torch.Tensor | None:
    """`mine` with the rows of each matched class (student label <- teacher label) taken from `theirs`;
    None when the shapes do not follow `layout` for these class counts."""
    if mine.shape[1:] != theirs.shape[1:] or mine.shape[0] % k_mine or theirs.shape[0] % k_theirs:
        return None
    m = mine.shape[0] // k_mine
    if theirs.shape[0] // k_theirs != m:
        return None
    out = mine.detach().clone()
    for s, t in pairs.items():
        if layout == "anchor_major":
            out[s::k_mine] = theirs[t::k_theirs]
        else:
            out[s * m:(s + 1) * m] = theirs[t * m:(t + 1) * m]
    return out


def inherit_teacher_head(student: nn.Module, teacher: nn.Module, student_labels: LabelMap | None = None,
                         teacher_labels: LabelMap | None = None) -> dict[str, list[str]]:
    """Copy the teacher's neck (FPN) and head weights into the student where names and shapes match.

    The paper's first stage initialises the student with the teacher's non-backbone weights and keeps its
    own backbone. With both label maps, the classifier is matched class by class: the rows of the student's
    categories whose *name* the teacher knows are copied from the teacher's rows for that name (a 91-slot
    torchvision COCO teacher and a 5-category dataset share 5 rows, wherever their ids and labels are), the
    other rows keep the student's values. Without label maps, classifier tensors are copied only when their
    shapes match. Returns {"copied": tensor names, "skipped": tensor names (absent in the student or another
    shape), "matched_classes": category names copied, "skipped_classes": the student's category names the
    teacher does not know}.
    """
    mine = student.state_dict()
    by_name = student_labels is not None and teacher_labels is not None
    pairs = teacher_labels.match_by_name(student_labels) if by_name else {}
    pairs = {s: t for t, s in pairs.items()}
    if by_name:
        pairs[0] = 0  # background / "no object" slot
    k_mine = student_labels.num_classes if by_name else 0
    k_theirs = teacher_labels.num_classes if by_name else 0
    copied, skipped = [], []
    new = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("backbone.body."):
            continue
        layout = next((v for k, v in CLASS_ROWS.items() if name.startswith(k)), None)
        if by_name and layout and name in mine:
            rows = _copy_class_rows(mine[name], value, layout, k_mine, k_theirs, pairs)
            if rows is not None:
                new[name] = rows
                copied.append(name)
                continue
        if name in mine and mine[name].shape == value.shape and not (by_name and layout):
            new[name] = value.detach().clone()
            copied.append(name)
        else:
            skipped.append(name)
    student.load_state_dict(new, strict=False)
    matched = [student_labels.name_of_label(s) for s in sorted(pairs) if s] if by_name else []
    unmatched = [n for n in (student_labels.names if by_name else ()) if n not in matched]
    return {"copied": copied, "skipped": skipped, "matched_classes": matched, "skipped_classes": unmatched}
