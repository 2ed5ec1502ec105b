"""One distillation stage's model: a student, a frozen teacher and per-level feature losses.

As in the paper's released code (MMDetection + MGD): the teacher runs only its backbone+FPN, in eval mode
and without gradients, on the *same* transformed batch as the student, and a feature loss is added for each
FPN level. A teacher trained at another input size (a torchvision COCO teacher at 800 px, a student at
512 px) sees that batch rescaled to its own size, and its FPN maps are resized to the student's
(`pkdkit.features.features_at`). For the first stage the student may inherit the teacher's neck and head
weights; classifier rows are matched by category name.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pkdkit.features import FeatureTap, common_levels, feature_levels, features_at, input_scale
from pkdkit.data import LabelMap
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
        # A teacher with another input size sees the batch at its own size; its maps come back at the student's.
        self.teacher_scale = input_scale(teacher, student)

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
            teacher_feats = features_at(teacher, batch, self.teacher_scale,
                                        {k: tuple(student_feats[k].shape[-2:]) for k in self.losses})
        boxes = [t["boxes"] for t in tap.targets]
        for level, loss in self.losses.items():
            s, t = student_feats[level], teacher_feats[level]
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
