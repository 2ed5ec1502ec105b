"""Detector factory and checkpoints.

`build_detector(spec)` turns a small `DetectorSpec` into a torchvision detector (RetinaNet, FCOS,
Faster R-CNN, Mask R-CNN) on a ResNet / ResNeXt / MobileNetV3 / ConvNeXt / Swin backbone with an FPN of
`fpn_channels`. Everything is built from torchvision's public classes; a spec that names a torchvision
COCO detection weight (``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``) uses torchvision's own builder so
the published weights load unchanged.

Checkpoints are plain dicts of tensors and JSON-like values, written atomically (temp file + rename) and
read with ``torch.load(..., weights_only=True)``. Each carries a sha256 digest of its content, checked when it
is loaded, and a loaded checkpoint with non-finite weights is refused (`load_checkpoint`). A detector
checkpoint carries its spec, its label map (model label <-> dataset category id) and the config that produced it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pkdkit.config import check_keys, check_types
from pkdkit.data import LabelMap
from pkdkit.errors import ConfigError, PkdkitError, reason
from pkdkit.files import atomic_write

ARCHS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
ONE_STAGE = ("retinanet", "fcos")
FPN_LEVELS = 5  # every arch: P3-P7 (one-stage), P2-P5 + pool (two-stage); one anchor size per level

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
        """Every field's type (ConfigError naming it; a list of anchor sizes becomes a tuple), then its value."""
        check_types(self, "detector")
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; expected one of {tuple(BACKBONES)}")
        if self.anchor_sizes is not None:
            if len(self.anchor_sizes) != FPN_LEVELS or min(self.anchor_sizes) < 1:
                raise ConfigError(f"anchor_sizes must be {FPN_LEVELS} sizes >= 1 px, one per FPN level (smallest "
                                  f"first), found {list(self.anchor_sizes)}")
        if not (isinstance(self.min_size, int) and isinstance(self.max_size, int)
                and 1 <= self.min_size <= self.max_size):
            raise ConfigError(f"min_size and max_size must be whole pixels with 1 <= min_size <= max_size (images "
                              f"are resized so the short side is min_size and the long side at most max_size), "
                              f"found min_size={self.min_size!r}, max_size={self.max_size!r}")
        if self.arch == "fcos" and self.fpn_channels % 32:
            raise ConfigError(f"FCOS's head uses GroupNorm(32, C): fpn_channels must be a multiple of 32, "
                              f"not {self.fpn_channels}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes) if self.anchor_sizes else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorSpec":
        return cls(**check_keys(cls, d, "detector"))

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


def _get_weights(name: str | None) -> Any:
    if name is None:
        return None
    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"unknown torchvision weights {name!r}: {e}") from e


def cached_weight_file(weights: Any) -> Path:
    """Where torchvision keeps (or would download) the file of a weight enum: `<TORCH_HOME>/hub/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _download_hint(weights: Any) -> str:
    return (f"could not get weights {weights} (offline?). Download {weights.url} and put it at "
            f"{cached_weight_file(weights)}")


def _with_download_hint(fn: Callable[..., nn.Module], weights: Any, **kwargs: Any) -> nn.Module:
    """`fn(weights=weights, **kwargs)`; a failed download, or a cached weight file that cannot be read or
    does not fit the architecture, becomes a CheckpointError naming the weight and the file."""
    try:
        return fn(weights=weights, **kwargs)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        # URLError is an OSError; a bad cached file surfaces as RuntimeError, UnpicklingError, EOFError, ...
        if weights is None:
            raise
        cached = cached_weight_file(weights)
        if not cached.is_file() or "urlopen" in str(e):
            raise CheckpointError(_download_hint(weights)) from e
        problem = "does not fit" if "state_dict" in str(e) else "cannot be read as"
        first = str(e).strip().splitlines()[:3]
        raise CheckpointError(f"the cached weight file {cached} {problem} {weights} "
                              f"({fn.__name__}): {' '.join(first)}. Delete it and download {weights.url} "
                              f"again to {cached}") from e


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
    if spec.arch == "retinanet":  # 3 scales per octave, as torchvision's default
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in spec.anchor_sizes)
    else:
        sizes = tuple((s,) for s in spec.anchor_sizes)
    return AnchorGenerator(sizes, (ratios,) * n_levels)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with `models` in eval mode; every submodule's own train/eval flag is restored on exit,
    also on error (a frozen part stays frozen, a training model goes on training)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def is_torchvision_weight(ref: str | os.PathLike | None) -> bool:
    """Whether a model reference names a torchvision COCO detection weight (``"FCOS_ResNet50_FPN_Weights.COCO_V1"``)
    rather than a checkpoint path."""
    return isinstance(ref, str) and ref.split(".")[0] in TORCHVISION_DETECTORS


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that also takes a group of a single value, whose normalised value is 0 (output: the bias).

    torch's `F.group_norm` refuses inputs with one value per group ("Expected more than 1 value per channel"), a
    check meant for batch norm. FCOS's head has GroupNorm(32, C): with the tiny preset's C = 32 and 96 px
    images, P7 is 1 x 1, so a batch of one image (ONNX export, the last batch of an epoch of 8k + 1 images,
    a one-image validation set) has one value per group. The alternatives (fewer groups, fewer FPN levels, a
    larger padded input) change the architecture or its computation and so every result; this calls the
    same kernel (`torch.group_norm`) as `nn.GroupNorm`, so weights, names and outputs are unchanged wherever
    the model already ran, and the single-value case gets its mathematical limit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def _single_value_group_norms(model: nn.Module) -> nn.Module:
    """Every `nn.GroupNorm` of `model` replaced by `GroupNorm`, keeping its parameters (same names, same tensors)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.GroupNorm:
                norm = GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)
    return model


def build_detector(spec: DetectorSpec) -> nn.Module:
    """Build the detector a spec describes (weights loaded when it names any). Returns it in train mode.
    Its GroupNorm layers take batches of one small image (`GroupNorm`)."""
    if is_torchvision_weight(spec.weights):
        return _single_value_group_norms(_build_torchvision_detector(spec))
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
    return _single_value_group_norms(model)


def detector_arch(model: nn.Module) -> str:
    """The `ARCHS` name of a built detector ("retinanet", "fcos", "fasterrcnn", "maskrcnn")."""
    for arch, cls in (("maskrcnn", detection.MaskRCNN), ("fasterrcnn", detection.FasterRCNN),
                      ("retinanet", detection.RetinaNet), ("fcos", detection.FCOS)):
        if isinstance(model, cls):  # MaskRCNN before FasterRCNN: it is a subclass
            return arch
    raise ValueError(f"not a torchvision detector pkdkit knows: {type(model).__name__}; expected one of {ARCHS}")


def _build_torchvision_detector(spec: DetectorSpec) -> nn.Module:
    enum_name = spec.weights.split(".")[0]
    arch, backbone, builder = TORCHVISION_DETECTORS[enum_name]
    weights = _get_weights(spec.weights)
    n_cats = len(weights.meta["categories"])
    expected = replace(spec, arch=arch, backbone=backbone, num_classes=n_cats, fpn_channels=256)
    if (spec.arch, spec.backbone, spec.num_classes, spec.fpn_channels) != (arch, backbone, n_cats, 256):
        raise ConfigError(
            f"{spec.weights} is a {arch} on {backbone} with {n_cats} classes and 256 FPN channels; the spec says "
            f"{spec.arch} on {spec.backbone} with {spec.num_classes} classes and {spec.fpn_channels} channels. "
            f"Use {expected.to_dict()}")
    return _with_download_hint(builder, weights, min_size=spec.min_size, max_size=spec.max_size)


def torchvision_spec(weights_name: str) -> DetectorSpec:
    """The spec of a torchvision COCO detector: its architecture, 91 classes, 256 FPN channels and
    torchvision's input size (800/1333)."""
    arch, backbone, _ = TORCHVISION_DETECTORS[weights_name.split(".")[0]]
    n_cats = len(_get_weights(weights_name).meta["categories"])
    return DetectorSpec(arch=arch, backbone=backbone, num_classes=n_cats, fpn_channels=256, weights=weights_name)


def torchvision_label_map(weights_name: str) -> LabelMap:
    """Label map of a torchvision COCO detector: its label index is the COCO category id (91 slots,
    "N/A" entries are unused ids)."""
    cats = _get_weights(weights_name).meta["categories"]
    used = [{"id": i, "name": n} for i, n in enumerate(cats) if i > 0 and n != "N/A"]
    return LabelMap.identity(used)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
DIGEST_KEY = "pkdkit_sha256"


def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes (in logical order, whatever
    its memory layout) and every other value's repr, walked in order through dicts, lists and tuples.

    It is stored in the checkpoint itself (`DIGEST_KEY`) rather than in a file beside it: one file is written
    by one atomic rename, and copied, linked or moved, it carries its digest with it. It is computed over the
    values `torch.load(weights_only=True)` returns rather than over the file's bytes, which include the digest;
    a change of the bytes that still loads (damaged weights) changes these values. Cost, measured on a
    130 MB ResNet-50 FCOS checkpoint on one CPU core: 0.08 s of hashing (and 0.07 s of finite check) against
    0.12 s for torch.load and 2.5 s for `load_detector` as a whole."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, dict):
            h.update(f"dict {len(v)};".encode())
            for k, item in v.items():
                walk(k)
                walk(item)
        elif isinstance(v, (list, tuple)):
            h.update(f"{type(v).__name__} {len(v)};".encode())
            for item in v:
                walk(item)
        else:
            h.update(f"{type(v).__name__} {v!r};".encode())

    walk(obj)
    return h.hexdigest()


def atomic_save(obj: Any, path: str | os.PathLike, *, digest: bool = True) -> Path:
    """torch.save through `pkdkit.files.atomic_write`: a crash never leaves half a checkpoint, a full disk
    gives a one-line error naming the file. A dict gets its `content_digest` under `DIGEST_KEY` (`digest`
    False: written as it is, e.g. a plain state dict for torchvision's `load_state_dict`)."""
    if digest and isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: content_digest(obj)}
    return atomic_write(path, lambda f: torch.save(obj, f))


def _not_a_checkpoint(path: Path, e: Exception) -> str:
    """Why `path` cannot be read as a checkpoint, in words (torch's own message advises weights_only=False,
    which would run whatever code a pickle holds)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(64)
        what = ("empty" if not head else "text, e.g. JSON or YAML" if head.lstrip()[:1] in (b"{", b"[")
                else "not a zip archive")
        return f"it is not a checkpoint written by torch.save (the file is {what})"
    if isinstance(e, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors and plain values, which pkdkit does not load "
                "(it reads checkpoints with weights_only=True)")
    return f"it is damaged or not a PyTorch checkpoint ({reason(e).splitlines()[0]})"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True and verify it: missing or unreadable files, a file whose
    content changed since it was written (its `content_digest` differs from the one stored in it) and
    non-finite model weights raise CheckpointError naming the file. Checkpoints written before digests
    existed are read after the finite check alone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_not_a_checkpoint(path, e)}") from e
    if isinstance(payload, dict) and DIGEST_KEY in payload:
        payload = dict(payload)
        if payload.pop(DIGEST_KEY) != content_digest(payload):
            raise CheckpointError(f"checkpoint {path} has changed since it was written (its content does not match "
                                  f"the sha256 digest written with it): the file is damaged; restore it from a "
                                  f"copy, or delete it and train again")
    weights = payload.get("model", payload) if isinstance(payload, dict) else {}
    bad = [k for k, t in weights.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not torch.isfinite(t).all()] if isinstance(weights, dict) else []
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. "
                              f"{bad[:3]}: the file is damaged or the training diverged; restore it from a copy, "
                              f"or delete it and train again")
    return payload


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, shapes, values): proves which weights a run started from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def initial_weights_label(spec: DetectorSpec, seed: int) -> str:
    """How `build_detector(spec)` after `seed_everything(seed)` initialises: named in every record's budget."""
    return f"initial ({spec.backbone_weights} backbone, seed {seed})" if spec.backbone_weights \
        else f"initial (random, seed {seed})"


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
                  expected: DetectorSpec | None = None,
                  size: tuple[int, int] | None = None) -> tuple[nn.Module, DetectorSpec, LabelMap, dict[str, Any]]:
    """Rebuild a detector from its checkpoint. `expected`, when given, must match the checkpoint's
    arch, backbone, class count and FPN width, else CheckpointError says which differs.
    `size`: (min_size, max_size) of the rebuilt model's transform instead of the checkpoint's."""
    payload = load_checkpoint(path, map_location)
    for key in ("model", "spec", "label_map"):
        if key not in payload:
            raise CheckpointError(f"{path} is not a pkdkit detector checkpoint (no {key!r})")
    spec = DetectorSpec.from_dict(payload["spec"])
    if size is not None:
        spec = replace(spec, min_size=int(size[0]), max_size=int(size[1]))
    if expected is not None:
        _check_compatible(spec, expected, path)
    model = build_detector(replace(spec, weights=None, backbone_weights=None))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit a {spec.name}: {e}") from e
    return model, spec, LabelMap.from_dict(payload["label_map"]), payload


# ----------------------------------------------------------------------------------------------------
# Model references: a pkdkit checkpoint path or a torchvision COCO weight name
def load_model(ref: str | os.PathLike, *, size: tuple[int, int] | None = None,
               expected: DetectorSpec | None = None,
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, DetectorSpec, LabelMap]:
    """The one way from a model reference to (model in train mode, spec, label map).

    ref: a pkdkit checkpoint path, or a torchvision COCO detection weight name
        (``"FCOS_ResNet50_FPN_Weights.COCO_V1"``, loaded from the torch hub cache; its label map is
        torchvision's: label == COCO category id).
    size: (min_size, max_size) of the model's transform; None keeps the model's own (the checkpoint's
        spec, torchvision's 800/1333 for a weight name).
    expected: for checkpoints, the arch/backbone/classes/FPN width the checkpoint must have.
    """
    if is_torchvision_weight(ref):
        spec = torchvision_spec(str(ref))
        if size is not None:
            spec = replace(spec, min_size=int(size[0]), max_size=int(size[1]))
        return build_detector(spec), spec, torchvision_label_map(str(ref))
    model, spec, label_map, _ = load_detector(ref, map_location, expected=expected, size=size)
    return model, spec, label_map


def model_meta(ref: str | os.PathLike) -> tuple[DetectorSpec, LabelMap]:
    """Spec and label map of a model reference without building the model (cheap validation)."""
    if is_torchvision_weight(ref):
        return torchvision_spec(str(ref)), torchvision_label_map(str(ref))
    payload = load_checkpoint(ref)
    for key in ("spec", "label_map"):
        if key not in payload:
            raise CheckpointError(f"{ref} is not a pkdkit detector checkpoint (no {key!r})")
    return DetectorSpec.from_dict(payload["spec"]), LabelMap.from_dict(payload["label_map"])


# ----------------------------------------------------------------------------------------------------
# Export: a deployable student
class ExportError(PkdkitError, ValueError):
    """A model that cannot be exported in the asked format; the message says why and what works instead."""


def _torchvision_recipe(model: nn.Module, spec: DetectorSpec) -> str:
    """Python source that builds `model`'s architecture with torchvision alone (no pkdkit), as `model`."""
    if is_torchvision_weight(spec.weights):
        builder = TORCHVISION_DETECTORS[spec.weights.split(".")[0]][2].__name__
        return (f"from torchvision.models.detection import {builder}\n"
                f"model = {builder}(weights=None, weights_backbone=None, num_classes={spec.num_classes}, "
                f"min_size={spec.min_size}, max_size={spec.max_size})\n")
    if BACKBONES[spec.backbone][1] != "resnet":
        raise ExportError(f"--format torchvision rebuilds the backbone with torchvision's BackboneWithFPN, which "
                          f"takes ResNet/ResNeXt stages; {spec.backbone} is not one: use --format onnx")
    one_stage = spec.arch in ONE_STAGE
    layers = ["layer2", "layer3", "layer4"] if one_stage else ["layer1", "layer2", "layer3", "layer4"]
    in_channels = [blk[0].in_channels for blk in model.backbone.fpn.inner_blocks]
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())
    generator = model.anchor_generator if one_stage else model.rpn.anchor_generator
    cls = {"retinanet": "RetinaNet", "fcos": "FCOS", "fasterrcnn": "FasterRCNN", "maskrcnn": "MaskRCNN"}[spec.arch]
    anchor_kw = "anchor_generator" if one_stage else "rpn_anchor_generator"
    c = spec.fpn_channels
    extra = f"LastLevelP6P7({c}, {c})" if one_stage else "LastLevelMaxPool()"
    return "\n".join([
        "import torchvision",
        f"from torchvision.models.detection import {cls}",
        "from torchvision.models.detection.anchor_utils import AnchorGenerator",
        "from torchvision.models.detection.backbone_utils import BackboneWithFPN",
        "from torchvision.ops import FrozenBatchNorm2d",
        "from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7",
        "",
        f"body = torchvision.models.{spec.backbone}(weights=None"
        + (", norm_layer=FrozenBatchNorm2d)" if frozen else ")"),
        f"backbone = BackboneWithFPN(body, {({n: str(i) for i, n in enumerate(layers)})!r}, {in_channels}, {c}, "
        f"extra_blocks={extra})",
        f"anchors = AnchorGenerator({tuple(tuple(s) for s in generator.sizes)!r}, "
        f"{tuple(tuple(r) for r in generator.aspect_ratios)!r})",
        f"model = {cls}(backbone, num_classes={spec.num_classes}, {anchor_kw}=anchors, min_size={spec.min_size}, "
        f"max_size={spec.max_size})",
        "",
    ])


def _torchvision_state_dict(model: nn.Module, spec: DetectorSpec) -> "OrderedDict[str, torch.Tensor]":
    """`model`'s weights under torchvision's names (pkdkit's `backbone.body.features.X` is `backbone.body.X`)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, t in model.state_dict().items():
        if not is_torchvision_weight(spec.weights):
            name = name.replace("backbone.body.features.", "backbone.body.", 1)
        out[name] = t.detach().cpu().clone()
    return out


def export_torchvision(model: nn.Module, spec: DetectorSpec, label_map: LabelMap, out: str | os.PathLike) -> Path:
    """Write `model`'s weights as a plain state dict that torchvision's own classes load (`out`), and
    `out` + ``.json``: the spec, the label map (model label -> dataset category id and name) and `build`,
    the torchvision-only Python source that makes the architecture as ``model``::

        ns = {}; exec(json.load(open("student.pth.json"))["build"], ns)
        ns["model"].load_state_dict(torch.load("student.pth", weights_only=True))
    """
    recipe = _torchvision_recipe(model, spec)
    path = atomic_save(_torchvision_state_dict(model, spec), out, digest=False)
    meta = {"format": "torchvision", "spec": spec.to_dict(), "label_map": label_map.to_dict(), "build": recipe,
            "torchvision": torchvision.__version__}
    atomic_write(Path(str(out) + ".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return path


class _OnnxDetector(nn.Module):
    """A detector in eval mode as a function of one image (3, H, W) in [0, 1] -> (boxes (K, 4) xyxy
    pixels, scores (K,), labels (K,)): the input/output signature ONNX needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def export_onnx(model: nn.Module, spec: DetectorSpec, label_map: LabelMap, out: str | os.PathLike,
                example: torch.Tensor | None = None, opset: int = 17) -> Path:
    """Write `model` as ONNX (`out`): input ``image`` (3, H, W) float in [0, 1], any H and W; outputs
    ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) after the model's own post-processing (score
    threshold, NMS, top-k). Needs the `onnx` extra (``pip install pkdkit[onnx]``). `out` + ``.json``
    holds the spec and the label map."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it)
    except ImportError as e:
        raise ExportError("--format onnx needs the onnx package: pip install 'pkdkit[onnx]'") from e
    model = model.eval()
    if example is None:
        example = torch.rand(3, spec.min_size, spec.min_size)
    out = Path(out)
    onnx_bytes = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_OnnxDetector(model).eval(), (example,), onnx_bytes, opset_version=opset, dynamo=False,
                          input_names=["image"], output_names=["boxes", "scores", "labels"],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                        "scores": {0: "detections"}, "labels": {0: "detections"}})
    atomic_write(out, lambda f: f.write(onnx_bytes.getbuffer()))
    meta = {"format": "onnx", "spec": spec.to_dict(), "label_map": label_map.to_dict(), "opset": opset,
            "inputs": {"image": "(3, H, W) float32 in [0, 1]"},
            "outputs": {"boxes": "(K, 4) xyxy pixels", "scores": "(K,)", "labels": "(K,) model labels"}}
    atomic_write(Path(str(out) + ".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return out


EXPORTS: dict[str, Callable[..., Path]] = {"torchvision": export_torchvision, "onnx": export_onnx}


# The files of a run folder (training, evaluation, distillation, selection, notebooks): an export never writes them.
RUN_FILES = frozenset({"model.pt", "last.pt", "student.pt", "metrics.json", "eval.json", "eval_results.json",
                       "calibration.json", "summary.json", "plan.yaml", "selection.json", "selection.png",
                       "settings.json", "parameters.json"})


def _check_export_outputs(ref: str | os.PathLike, outputs: list[Path], force: bool) -> None:
    """Refuse, before anything is loaded or written: an output that is a folder; a file of a run folder (a
    folder holding any of `RUN_FILES`), such as its own model.pt, even with `force`; an existing file (the
    exported checkpoint included) unless `force`."""
    for path in outputs:
        if path.is_dir():
            raise ExportError(f"--out {path} is a folder; give the name of a file to write (e.g. {path / 'student.pth'})")
        folder = path.parent
        if path.name in RUN_FILES and any((folder / name).exists() for name in RUN_FILES):
            raise ExportError(f"{path} is a file of the run folder {folder}; an export never replaces a run's own "
                              f"files: write it elsewhere (e.g. --out {folder / 'export' / 'student.pth'})")
        if path.exists() and not force:
            same = not is_torchvision_weight(ref) and Path(ref).exists() and path.samefile(ref)
            raise ExportError(f"{path} already exists{' (it is the checkpoint being exported)' if same else ''}; "
                              f"give another --out, or --force to replace it")


def export_model(ref: str | os.PathLike, fmt: str, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Export a model reference (a student checkpoint) as `fmt` ("torchvision" or "onnx") to `out` and its
    description to `out` + ``.json``. Existing outputs are refused unless `force`; a run folder's own files
    always (`_check_export_outputs`)."""
    if fmt not in EXPORTS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {sorted(EXPORTS)}")
    out = Path(out)
    _check_export_outputs(ref, [out, Path(str(out) + ".json")], force)
    model, spec, label_map = load_model(ref)
    return EXPORTS[fmt](model.eval(), spec, label_map, out)
