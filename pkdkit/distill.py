"""One distillation stage's model: a student, a frozen teacher and per-level feature losses.

As in the paper's released code (MMDetection + MGD): the teacher runs only its backbone+FPN, in eval mode
and without gradients, on the *same* transformed batch as the student, and a feature loss is added for each
FPN level. For the first stage the student may inherit the teacher's neck and head weights.

The loss's hyper-parameters and levels default to what the authors used for the student's detector family
(`pkdkit.losses.loss_defaults`); `calibrate_loss_weight` measures how large the distillation term starts
compared with the detection loss, and can set the weight from that.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from pkdkit.features import FeatureTap, backbone_features, common_levels, feature_levels
from pkdkit.losses import build_loss, loss_defaults
from pkdkit.models import detector_arch


class Distiller(nn.Module):
    """`forward(images, targets)` -> the student's detection losses plus ``distill_<level>`` losses.

    The teacher is held outside the module tree (`self._teacher`): it is not trained, not in
    `parameters()` or `state_dict()`, and stays in eval mode. Loss modules (1x1 adapters, MGD's
    generation block) are trained together with the student. `weight` multiplies every level's loss
    (on top of the loss's own weights, e.g. MGD's alpha): 0 turns distillation off.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, nn.Module], weight: float = 1.0):
        super().__init__()
        _check_same_input(student, teacher)
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weight = float(weight)
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)  # a tuple keeps nn.Module from registering it

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        with FeatureTap(self.student) as tap:
            losses = dict(self.student(images, targets))
        student_feats = tap.features
        batch = tap.images.tensors  # (N, 3, H, W): what the student's backbone saw
        teacher = self.teacher
        if next(teacher.parameters()).device != batch.device:
            teacher.to(batch.device)
        with torch.no_grad():
            teacher_feats = backbone_features(teacher, batch)
        boxes = [t["boxes"] for t in tap.targets]
        for level, loss in self.losses.items():
            s, t = student_feats[level], teacher_feats[level]
            if s.shape[-2:] != t.shape[-2:]:
                raise ValueError(f"level {level}: student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                                 "differ in size")
            losses[f"distill_{level}"] = self.weight * loss(s, t, boxes=boxes, image_size=tuple(batch.shape[-2:]))
        return losses


def _check_same_input(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.transform, teacher.transform
    if list(s.image_mean) != list(t.image_mean) or list(s.image_std) != list(t.image_std):
        raise ValueError(f"teacher normalises images with mean {t.image_mean}, std {t.image_std} but the student "
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
        raise ValueError(f"the models share none of the levels {list(wanted)} that {loss} uses for a "
                         f"{detector_arch(student)} (common levels: {common}); give `levels` explicitly")
    return chosen


def distill_params(student: nn.Module, loss: str = "mgd", loss_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The loss's hyper-parameters for this student: the authors' values for its detector family
    (`pkdkit.losses.loss_defaults`), overridden by `loss_params`."""
    return {**loss_defaults(loss, detector_arch(student)).params, **(loss_params or {})}


def build_distiller(student: nn.Module, teacher: nn.Module, loss: str = "mgd", loss_params: dict[str, Any] | None = None,
                    levels: list[str] | None = None, weight: float = 1.0) -> Distiller:
    """A Distiller with one `loss` per distilled FPN level (`distill_levels`), its hyper-parameters from
    `distill_params`, and `weight` on the whole distillation term."""
    s_levels, t_levels = feature_levels(student), feature_levels(teacher)
    params = distill_params(student, loss, loss_params)
    losses = {k: build_loss(loss, s_levels[k], t_levels[k], **params)
              for k in distill_levels(student, teacher, loss, levels)}
    return Distiller(student, teacher, losses, weight)


def calibrate_loss_weight(distiller: Distiller, batches: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
                          ratio: float | None = None, device: str | torch.device = "cpu") -> dict[str, float]:
    """Measure the detection loss and the distillation term at the start of a stage, on a few training
    `batches` (``(images, targets)`` as the training loader yields them), without changing anything: weights,
    BatchNorm statistics and every RNG are restored afterwards.

    Returns {"detection", "distillation" (with weight 1), "start_ratio" (distillation * current weight /
    detection), "batches"}; with `ratio`, also "ratio" and "weight" = ratio * detection / distillation, the
    weight at which the distillation term starts at `ratio` times the detection loss (not applied here).
    """
    device = torch.device(device)
    state = copy.deepcopy(distiller.state_dict())
    weight, det, kd, n = distiller.weight, 0.0, 0.0, 0
    distiller.to(device).train()
    distiller.weight = 1.0
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.no_grad():
            for images, targets in batches:
                images = [im.to(device) for im in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                losses = distiller(images, targets)
                kd += sum(v.item() for k, v in losses.items() if k.startswith("distill"))
                det += sum(v.item() for k, v in losses.items() if not k.startswith("distill"))
                n += 1
    finally:
        distiller.weight = weight
        distiller.load_state_dict(state)
    if n == 0:
        raise ValueError("calibrate_loss_weight: no batches given")
    det, kd = det / n, kd / n
    out = {"detection": det, "distillation": kd, "start_ratio": weight * kd / det if det > 0 else float("nan"),
           "batches": n}
    if ratio is not None:
        if not ratio > 0:
            raise ValueError(f"loss ratio must be > 0, got {ratio}")
        if not (kd > 0 and det > 0):
            raise ValueError(f"cannot calibrate the distillation weight: at the start the detection loss is {det:.4g} "
                             f"and the distillation loss {kd:.4g}; give a numeric loss_weight instead")
        out.update(ratio=float(ratio), weight=ratio * det / kd)
    return out


def inherit_teacher_head(student: nn.Module, teacher: nn.Module) -> dict[str, list[str]]:
    """Copy the teacher's neck (FPN) and head weights into the student where names and shapes match.

    The paper's first stage initialises the student with the teacher's non-backbone weights and keeps its
    own backbone. Returns {"copied": [...], "skipped": [...]} (skipped: absent in the student or another
    shape, e.g. a classifier for another class count).
    """
    mine = student.state_dict()
    copied, skipped = [], []
    new = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("backbone.body."):
            continue
        if name in mine and mine[name].shape == value.shape:
            new[name] = value.detach().clone()
            copied.append(name)
        else:
            skipped.append(name)
    student.load_state_dict(new, strict=False)
    return {"copied": copied, "skipped": skipped}
