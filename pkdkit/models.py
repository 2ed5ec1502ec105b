"""Detector factory and checkpoints.

`build_detector(spec)` turns a small `DetectorSpec` into a torchvision detector (RetinaNet, FCOS,
Faster R-CNN, Mask R-CNN) on a ResNet / ResNeXt / MobileNetV3 / ConvNeXt / Swin backbone with an FPN of
`fpn_channels`. Everything is built from torchvision's public classes; a spec that names a torchvision
COCO detection weight (``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``) uses torchvision's own builder so
the published weights load unchanged.

Checkpoints are plain dicts of tensors and JSON-like values, written atomically (temp file + rename) and
read with ``torch.load(..., weights_only=True)``. A detector checkpoint carries its spec, its label map
(model label <-> dataset category id) and the config that produced it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pkdkit.data import LabelMap
from pkdkit.errors import PkdkitError, reason
from pkdkit.files import atomic_write

ARCHS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
ONE_STAGE = ("retinanet", "fcos")

# name -> (torchvision classification builder, kind). kind says how to take stage outputs.
BACKBONES: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18": (torchvision.models.resnet18, "resnet"),
    "resnet34": (torchvision.models.resnet34, "resnet"),
    "resnet50": (torchvision.models.resnet50, "resnet"),
    "resnet101": (torchvision.models.resnet101, "resnet"),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, "resnet"),
    "resnext101_32x8d": (torchvision.models.resnext101_32x8d, "resnet"),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, "sequential"),
    "convnext_tiny": (torchvision.models.convnext_tiny, "sequential"),
    "swin_t": (torchvision.models.swin_t, "nhwc"),
    "swin_s": (torchvision.models.swin_s, "nhwc"),
}

# torchvision COCO detection weights -> (arch, backbone, builder). Used when spec.weights names one.
TORCHVISION_DETECTORS: dict[str, tuple[str, str, Callable[..., nn.Module]]] = {
    "RetinaNet_ResNet50_FPN_Weights": ("retinanet", "resnet50", detection.retinanet_resnet50_fpn),
    "RetinaNet_ResNet50_FPN_V2_Weights": ("retinanet", "resnet50", detection.retinanet_resnet50_fpn_v2),
    "FCOS_ResNet50_FPN_Weights": ("fcos", "resnet50", detection.fcos_resnet50_fpn),
    "FasterRCNN_ResNet50_FPN_Weights": ("fasterrcnn", "resnet50", detection.fasterrcnn_resnet50_fpn),
    "FasterRCNN_ResNet50_FPN_V2_Weights": ("fasterrcnn", "resnet50", detection.fasterrcnn_resnet50_fpn_v2),
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": (
        "fasterrcnn", "mobilenet_v3_large", detection.fasterrcnn_mobilenet_v3_large_fpn),
    "MaskRCNN_ResNet50_FPN_Weights": ("maskrcnn", "resnet50", detection.maskrcnn_resnet50_fpn),
    "MaskRCNN_ResNet50_FPN_V2_Weights": ("maskrcnn", "resnet50", detection.maskrcnn_resnet50_fpn_v2),
}


class CheckpointError(PkdkitError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


@dataclass
class DetectorSpec:
    """What to build. `num_classes` counts the background (label 0), as torchvision does.

    anchor_sizes: one size per FPN level (smallest level first); None keeps torchvision's defaults
    (32..512 px, meant for 800 px images). Small-image presets pass smaller anchors.
    weights: a torchvision detection weight (``"FCOS_ResNet50_FPN_Weights.COCO_V1"``) or the path of a
    pkdkit checkpoint whose model weights initialise this one.
    backbone_weights: a torchvision classification weight (``"ResNet50_Weights.IMAGENET1K_V1"``).
    trainable_layers: backbone stages left trainable when backbone weights are loaded (None: 3, like
    torchvision); a backbone trained from scratch is always fully trainable.
    """

    arch: str = "retinanet"
    backbone: str = "resnet18"
    num_classes: int = 91
    fpn_channels: int = 256
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: tuple[int, ...] | None = None
    weights: str | None = None
    backbone_weights: str | None = None
    trainable_layers: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {tuple(BACKBONES)}")
        if self.anchor_sizes is not None:
            self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        if self.arch == "fcos" and self.fpn_channels % 32:
            raise ValueError(f"FCOS's head uses GroupNorm(32, C): fpn_channels must be a multiple of 32, "
                             f"not {self.fpn_channels}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes) if self.anchor_sizes else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DetectorSpec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.backbone}"


# ----------------------------------------------------------------------------------------------------
# Backbone + FPN
class StageFeatures(nn.Module):
    """Runs a `features` nn.Sequential and returns the outputs of selected blocks as NCHW maps.

    Swin's blocks work on NHWC tensors (`nhwc=True`): those outputs are permuted to NCHW.
    Output: OrderedDict name -> (N, C_i, H / stride_i, W / stride_i).
    """

    def __init__(self, features: nn.Sequential, return_indices: dict[int, str], nhwc: bool = False):
        super().__init__()
        last = max(return_indices)
        self.features = nn.Sequential(OrderedDict(list(features.named_children())[: last + 1]))
        self.return_indices = dict(return_indices)
        self.nhwc = nhwc

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.return_indices:
                out[self.return_indices[i]] = x.permute(0, 3, 1, 2).contiguous() if self.nhwc else x
        return out


class FPNBackbone(nn.Module):
    """`body` (stage outputs) followed by a torchvision FeaturePyramidNetwork. Same attribute names as
    torchvision's BackboneWithFPN (`body`, `fpn`, `out_channels`)."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int, extra_blocks: nn.Module):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def _download_hint(weights: Any) -> str:
    url = getattr(weights, "url", "?")
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return f"could not get weights {weights} (offline?). Download {url} and put it at {target}"


def _get_weights(name: str | None) -> Any:
    if name is None:
        return None
    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"unknown torchvision weights {name!r}: {e}") from e


def _with_download_hint(fn: Callable[..., nn.Module], weights: Any, **kwargs: Any) -> nn.Module:
    """`fn(weights=weights, **kwargs)`; a failed weight download becomes an error saying what to fetch."""
    try:
        return fn(weights=weights, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        if weights is not None and ("urlopen" in str(e) or isinstance(e, OSError)):
            raise CheckpointError(_download_hint(weights)) from e
        raise


def _stage_indices(features: nn.Sequential, nhwc: bool) -> list[tuple[int, int, int]]:
    """(block index, stride, channels) of the last block at each stride, found with a dummy forward."""
    x = torch.zeros(1, 3, 64, 64)
    found: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        for i, block in enumerate(features):
            x = block(x)
            h, c = (x.shape[1], x.shape[3]) if nhwc else (x.shape[2], x.shape[1])
            found[64 // h] = (i, c)
    return [(i, s, c) for s, (i, c) in sorted(found.items()) if s >= 4]


def build_backbone(spec: DetectorSpec) -> FPNBackbone:
    """Backbone + FPN. One-stage detectors get P3-P7 (P6/P7 from P5), two-stage ones P2-P5 + pool (P6)."""
    builder, kind = BACKBONES[spec.backbone]
    weights = _get_weights(spec.backbone_weights)
    pretrained = weights is not None
    one_stage = spec.arch in ONE_STAGE
    strides = (8, 16, 32) if one_stage else (4, 8, 16, 32)
    if kind == "resnet":
        norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
        net = _with_download_hint(builder, weights, norm_layer=norm)
        feats = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in (
            "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")))
        trainable_names = ["features.layer4", "features.layer3", "features.layer2", "features.layer1",
                           "features.conv1"]
    else:
        net = _with_download_hint(builder, weights)
        feats = net.features
        trainable_names = [f"features.{i}" for i in reversed(range(len(feats)))]
    nhwc = kind == "nhwc"
    picks = {s: (i, c) for i, s, c in _stage_indices(feats, nhwc)}
    missing = [s for s in strides if s not in picks]
    if missing:
        raise ValueError(f"backbone {spec.backbone} has no output at strides {missing}")
    body = StageFeatures(feats, {picks[s][0]: str(i) for i, s in enumerate(strides)}, nhwc=nhwc)
    in_channels = [picks[s][1] for s in strides]
    if pretrained:
        n = 3 if spec.trainable_layers is None else spec.trainable_layers
        if kind != "resnet":  # block count differs: keep the same fraction of blocks trainable
            n = round(len(trainable_names) * n / 5)
        keep = tuple(trainable_names[:n])
        for name, p in body.named_parameters():
            if not name.startswith(keep):
                p.requires_grad_(False)
    extra = LastLevelP6P7(spec.fpn_channels, spec.fpn_channels) if one_stage else LastLevelMaxPool()
    return FPNBackbone(body, in_channels, spec.fpn_channels, extra)


def _anchor_generator(spec: DetectorSpec, n_levels: int, ratios: tuple[float, ...]) -> AnchorGenerator | None:
    if spec.anchor_sizes is None:
        return None
    if len(spec.anchor_sizes) != n_levels:
        raise ValueError(f"{spec.arch} has {n_levels} FPN levels but anchor_sizes has {len(spec.anchor_sizes)}")
    if spec.arch == "retinanet":  # 3 scales per octave, as torchvision's default
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in spec.anchor_sizes)
    else:
        sizes = tuple((s,) for s in spec.anchor_sizes)
    return AnchorGenerator(sizes, (ratios,) * n_levels)


def build_detector(spec: DetectorSpec) -> nn.Module:
    """Build the detector a spec describes (weights loaded when it names any). Returns it in train mode."""
    if spec.weights and spec.weights.split(".")[0] in TORCHVISION_DETECTORS:
        return _build_torchvision_detector(spec)
    backbone = build_backbone(spec)
    size = dict(min_size=spec.min_size, max_size=spec.max_size)
    if spec.arch == "retinanet":
        model = detection.RetinaNet(backbone, spec.num_classes, anchor_generator=_anchor_generator(spec, 5, (0.5, 1.0, 2.0)), **size)
    elif spec.arch == "fcos":
        model = detection.FCOS(backbone, spec.num_classes, anchor_generator=_anchor_generator(spec, 5, (1.0,)), **size)
    else:
        cls = detection.FasterRCNN if spec.arch == "fasterrcnn" else detection.MaskRCNN
        model = cls(backbone, spec.num_classes, rpn_anchor_generator=_anchor_generator(spec, 5, (0.5, 1.0, 2.0)), **size)
    if spec.weights:
        payload = load_checkpoint(spec.weights)
        _check_compatible(DetectorSpec.from_dict(payload["spec"]), spec, spec.weights)
        model.load_state_dict(payload["model"])
    return model


def _build_torchvision_detector(spec: DetectorSpec) -> nn.Module:
    enum_name = spec.weights.split(".")[0]
    arch, backbone, builder = TORCHVISION_DETECTORS[enum_name]
    weights = _get_weights(spec.weights)
    n_cats = len(weights.meta["categories"])
    expected = replace(spec, arch=arch, backbone=backbone, num_classes=n_cats, fpn_channels=256)
    if (spec.arch, spec.backbone, spec.num_classes, spec.fpn_channels) != (arch, backbone, n_cats, 256):
        raise ValueError(
            f"{spec.weights} is a {arch} on {backbone} with {n_cats} classes and 256 FPN channels; the spec says "
            f"{spec.arch} on {spec.backbone} with {spec.num_classes} classes and {spec.fpn_channels} channels. "
            f"Use {expected.to_dict()}")
    return _with_download_hint(builder, weights, min_size=spec.min_size, max_size=spec.max_size)


def torchvision_label_map(weights_name: str) -> LabelMap:
    """Label map of a torchvision COCO detector: its label index is the COCO category id (91 slots,
    "N/A" entries are unused ids)."""
    cats = _get_weights(weights_name).meta["categories"]
    used = [{"id": i, "name": n} for i, n in enumerate(cats) if i > 0 and n != "N/A"]
    return LabelMap.identity(used)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through `pkdkit.files.atomic_write`: a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; missing or unreadable files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {reason(e)}") from e


def save_detector(path: str | os.PathLike, model: nn.Module, spec: DetectorSpec, label_map: LabelMap,
                  config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> Path:
    """Write a detector checkpoint: model weights, spec, label map, config and metrics."""
    state = model.state_dict()
    return atomic_save({"model": state, "spec": spec.to_dict(), "label_map": label_map.to_dict(),
                        "config": config or {}, "metrics": metrics or {}}, path)


def _check_compatible(found: DetectorSpec, wanted: DetectorSpec, where: Any) -> None:
    for key in ("arch", "backbone", "num_classes", "fpn_channels"):
        a, b = getattr(found, key), getattr(wanted, key)
        if a != b:
            raise CheckpointError(f"{where} holds a {key}={a!r} model but {key}={b!r} was asked for "
                                  f"(checkpoint: {found.name}, {found.num_classes} classes; "
                                  f"wanted: {wanted.name}, {wanted.num_classes} classes)")


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  expected: DetectorSpec | None = None) -> tuple[nn.Module, DetectorSpec, LabelMap, dict[str, Any]]:
    """Rebuild a detector from its checkpoint. `expected`, when given, must match the checkpoint's
    arch, backbone, class count and FPN width, else CheckpointError says which differs."""
    payload = load_checkpoint(path, map_location)
    for key in ("model", "spec", "label_map"):
        if key not in payload:
            raise CheckpointError(f"{path} is not a pkdkit detector checkpoint (no {key!r})")
    spec = DetectorSpec.from_dict(payload["spec"])
    if expected is not None:
        _check_compatible(spec, expected, path)
    model = build_detector(replace(spec, weights=None, backbone_weights=None))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit a {spec.name}: {e}") from e
    return model, spec, LabelMap.from_dict(payload["label_map"]), payload
