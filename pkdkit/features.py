"""FPN feature taps with the same level names for every architecture.

torchvision detectors name their FPN outputs differently ('0', '1', '2', 'p6', 'p7' for RetinaNet/FCOS;
'0'..'3', 'pool' for Faster/Mask R-CNN). pkdkit names a level by its stride: ``"p3"`` is the map at 1/8 of
the (padded) input, so a RetinaNet student (P3-P7) and a Faster R-CNN teacher (P2-P6) share P3-P6.

Two ways in:
- `extract_features(model, images)`: run the model's transform and backbone+FPN only (teachers,
  calibration for teacher selection).
- `FeatureTap(model)`: a context manager that captures the transformed batch and the FPN outputs during
  a normal forward (the student's training forward), with forward hooks removed on exit, also on error.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

from pkdkit.models import eval_mode
from pkdkit.errors import ConfigError


def name_levels(feats: "OrderedDict[str, torch.Tensor]", input_hw: tuple[int, int]) -> "OrderedDict[str, torch.Tensor]":
    """Rename FPN outputs `{name: (N, C, H_l, W_l)}` to ``p<log2 stride>`` given the batch size `(H, W)`.

    The first level's stride is rounded from the size ratio; each next level must be half as large
    (rounded up, as strided convs and max-pooling do), which the check below enforces.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    maps = list(feats.values())
    if not maps:
        raise ValueError("backbone returned no feature maps")
    level = round(math.log2(input_hw[0] / maps[0].shape[-2]))
    prev = None
    for f in maps:
        if prev is not None:
            level += 1
            if f.shape[-2] != math.ceil(prev.shape[-2] / 2) and f.shape[-2] != prev.shape[-2] // 2:
                raise ValueError(f"FPN level sizes {[tuple(m.shape[-2:]) for m in maps]} do not halve level "
                                 "by level; cannot name them by stride")
        out[f"p{level}"] = f
        prev = f
    return out


def extract_features(model: nn.Module, images: list[torch.Tensor]) -> tuple["OrderedDict[str, torch.Tensor]", ImageList]:
    """Transform `images` (list of (3, H, W) in [0, 1]) as the detector does, run backbone+FPN.

    Returns ({"p3": (N, C, H/8, W/8), ...}, ImageList of the padded batch (N, 3, H', W')).
    """
    batch, _ = model.transform(images)
    return backbone_features(model, batch.tensors), batch


def backbone_features(model: nn.Module, batch: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """Backbone+FPN of `model` on an already transformed batch `(N, 3, H, W)`, levels named by stride."""
    return name_levels(model.backbone(batch), tuple(batch.shape[-2:]))


def input_scale(model: nn.Module, reference: nn.Module) -> float:
    """How many times larger `model`'s input is than `reference`'s: the ratio of their transforms'
    (evaluation) `min_size`, e.g. 800 / 512 for a torchvision COCO teacher and a 512 px student."""
    return float(model.transform.min_size[-1]) / float(reference.transform.min_size[-1])


def features_at(model: nn.Module, batch: torch.Tensor, scale: float,
                sizes: dict[str, tuple[int, int]] | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Backbone+FPN of `model` on `batch` (N, 3, H, W) seen at its own input size, maps at the batch's grid.

    A teacher trained at another size than the student sees the student's transformed batch rescaled by
    `scale` (`input_scale(teacher, student)`; bilinear, to a multiple of the model's `size_divisible`), so
    it detects at the object sizes it was trained for. Each level of its FPN is then resized (bilinear) to
    `sizes[level]`, the student's map size: the loss, its box masks and the adapters live on the student's
    grid, and the student's maps and gradients stay untouched. Levels keep their names: the teacher's p3 is
    1/8 of its own input and covers the same image region as the student's p3.
    Returns {"p3": (N, C, H_l, W_l), ...} with (H_l, W_l) = sizes[level] where given.
    """
    if scale != 1.0:
        d = int(getattr(model.transform, "size_divisible", 32))
        h, w = batch.shape[-2:]
        target = (max(d, round(h * scale / d) * d), max(d, round(w * scale / d) * d))
        batch = F.interpolate(batch, size=target, mode="bilinear", align_corners=False)
    feats = backbone_features(model, batch)
    for level, size in (sizes or {}).items():
        if level in feats and tuple(feats[level].shape[-2:]) != tuple(size):
            feats[level] = F.interpolate(feats[level], size=tuple(size), mode="bilinear", align_corners=False)
    return feats


def feature_levels(model: nn.Module, size: int = 128) -> dict[str, int]:
    """{level name: channels} of a detector's FPN, from one small dummy forward of its backbone."""
    p = next(model.parameters())
    with eval_mode(model.backbone), torch.no_grad():
        feats = backbone_features(model, torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    return {k: v.shape[1] for k, v in feats.items()}


def common_levels(found: dict[str, dict[str, int]], wanted: list[str] | None = None) -> list[str]:
    """Levels to use across models, `found` = {model name: {level: channels}}: `wanted`, or every level all
    models have. Raises ValueError when none is shared or a wanted level is missing somewhere."""
    common = [lvl for lvl in next(iter(found.values())) if all(lvl in f for f in found.values())]
    have = ", ".join(f"{n}: {list(f)}" for n, f in found.items())
    if wanted is None:
        if not common:
            raise ConfigError(f"the models share no FPN level ({have})")
        return common
    missing = [lvl for lvl in wanted if lvl not in common]
    if missing:
        raise ConfigError(f"levels {missing} are not in every model ({have})")
    return list(wanted)


class FeatureTap:
    """Capture a detector's transformed batch and named FPN outputs during a normal forward.

    >>> with FeatureTap(model) as tap:
    ...     losses = model(images, targets)
    >>> tap.features["p3"].shape   # (N, C, H/8, W/8), still attached to the graph
    >>> tap.images.tensors.shape   # (N, 3, H, W): what the backbone saw
    >>> tap.targets                # targets resized to the batch (boxes in batch pixels) or None

    Hooks live only inside the `with` block.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._raw: OrderedDict[str, torch.Tensor] | None = None
        self.images: ImageList | None = None
        self.targets: list[dict[str, torch.Tensor]] | None = None

    def __enter__(self) -> "FeatureTap":
        def on_transform(_m: nn.Module, _inp: Any, out: tuple[ImageList, Any]) -> None:
            self.images, self.targets = out

        def on_backbone(_m: nn.Module, _inp: Any, out: "OrderedDict[str, torch.Tensor]") -> None:
            self._raw = out

        self._handles = [self.model.transform.register_forward_hook(on_transform),
                         self.model.backbone.register_forward_hook(on_backbone)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def features(self) -> "OrderedDict[str, torch.Tensor]":
        if self._raw is None or self.images is None:
            raise RuntimeError("FeatureTap saw no forward pass yet")
        return name_levels(self._raw, tuple(self.images.tensors.shape[-2:]))
