"""One distillation stage's model: a student, a frozen teacher and per-level feature losses.

As in the paper's released code (MMDetection + MGD): the teacher runs only its backbone+FPN, in eval mode
and without gradients, on the *same* transformed batch as the student, and a feature loss is added for each
FPN level. For the first stage the student may inherit the teacher's neck and head weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pkdkit.features import FeatureTap, backbone_features, common_levels, feature_levels
from pkdkit.losses import build_loss


class Distiller(nn.Module):
    """`forward(images, targets)` -> the student's detection losses plus ``distill_<level>`` losses.

    The teacher is held outside the module tree (`self._teacher`): it is not trained, not in
    `parameters()` or `state_dict()`, and stays in eval mode. Loss modules (1x1 adapters, MGD's
    generation block) are trained together with the student.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, nn.Module]):
        super().__init__()
        _check_same_input(student, teacher)
        self.student = student
        self.losses = nn.ModuleDict(losses)
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
            losses[f"distill_{level}"] = loss(s, t, boxes=boxes, image_size=tuple(batch.shape[-2:]))
        return losses


def _check_same_input(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.transform, teacher.transform
    if list(s.image_mean) != list(t.image_mean) or list(s.image_std) != list(t.image_std):
        raise ValueError(f"teacher normalises images with mean {t.image_mean}, std {t.image_std} but the student "
                         f"with mean {s.image_mean}, std {s.image_std}; the teacher must see the student's batch")


def build_distiller(student: nn.Module, teacher: nn.Module, loss: str = "mgd", loss_params: dict[str, Any] | None = None,
                    levels: list[str] | None = None) -> Distiller:
    """A Distiller with one `loss` per matched FPN level (all common levels when `levels` is None)."""
    s_levels, t_levels = feature_levels(student), feature_levels(teacher)
    chosen = common_levels({"student": s_levels, "teacher": t_levels}, levels)
    losses = {k: build_loss(loss, s_levels[k], t_levels[k], **(loss_params or {})) for k in chosen}
    return Distiller(student, teacher, losses)


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
