"""Named sizes of the whole pipeline: `tiny` (CPU, the demo and the tests), `small` (one GPU, synthetic
data, the progressive-vs-one-shot experiment), `coco` (COCO 2017 with torchvision's COCO teachers).

A preset is plain data: where the data comes from, the student, the candidate teachers, and the training
settings for teachers/baseline and for each distillation stage. Notebooks and the CLI read it and let
parameters override single values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pkdkit.engine import TrainConfig
from pkdkit.models import DetectorSpec
from pkdkit.errors import ConfigError


@dataclass
class Preset:
    name: str
    synth: dict[str, int] | None  # make_synthetic_coco arguments; None: bring your own COCO data
    student: DetectorSpec
    teachers: dict[str, DetectorSpec | str]  # name -> spec to train, or a torchvision COCO weight name
    train: TrainConfig  # the baseline student
    distill: TrainConfig  # each distillation stage
    loss: str = "mgd"
    loss_params: dict[str, Any] = field(default_factory=dict)  # empty: the authors' values for the student's family
    loss_weight: float | str = 1.0  # weight on the distillation term, or "auto" (calibrated per stage)
    calibration_images: int | None = None  # teacher selection: at most this many validation images; None: all
    notes: str = ""
    teacher_epochs: int | None = None  # teachers train longer (a bigger schedule) when set; else train.epochs
    teacher_train_images: int | None = None  # synthetic presets: teachers train on this many images (a superset)
    # (min_size, max_size) of teachers given as torchvision weight names; None: torchvision's own 800/1333
    reference_size: tuple[int, int] | None = None


def _tiny() -> Preset:
    # FCOS: from scratch on 64 images it learns within minutes on a CPU, where RetinaNet barely starts.
    # The design (reports/cpu-designs.md lists every design tried, with its numbers): the paper's protocol;
    # every stage on the baseline's recipe; teachers trained on 2x more images than the student, as published
    # teachers see more data than a small student gets, so that they are clearly stronger; 64 validation
    # images so that one run's AP moves less with the seed.
    size = dict(num_classes=6, fpn_channels=32, min_size=96, max_size=96, anchor_sizes=(8, 16, 32, 64, 128))
    recipe = TrainConfig(epochs=12, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_iters=10,
                         grad_clip=10.0, checkpoint_every=4)  # an epoch is ~2 s: a checkpoint each would add ~10%
    return Preset(
        name="tiny",
        synth=dict(n_train=64, n_val=64, size=96, seed=0),
        student=DetectorSpec(arch="fcos", backbone="resnet18", **size),
        teachers={
            "fcos_r34": DetectorSpec(arch="fcos", backbone="resnet34", **size),
            "fcos_r50": DetectorSpec(arch="fcos", backbone="resnet50", **size),
        },
        train=recipe,
        distill=recipe,  # each stage trains the baseline's schedule, as the released configs do
        # From-scratch feature maps are far larger than pretrained ones (at alpha 2e-4 the MGD term started ~500x
        # the detection loss): calibrate each stage so that distillation starts at the detection loss.
        loss_weight="auto",
        teacher_epochs=12,
        teacher_train_images=128,  # teacher selection uses all 64 validation images (calibration_images: None)
        notes="CPU demo: student on 64 synthetic images of 96 px, teachers on 128, 64 for validation; thin FPN; "
              "12 epochs; under 10 minutes on 2 cores. AP is low by design.",
    )


def _small() -> Preset:
    size = dict(num_classes=6, fpn_channels=128, min_size=256, max_size=256, anchor_sizes=(16, 32, 64, 128, 256))
    return Preset(
        name="small",
        synth=dict(n_train=2000, n_val=300, size=256, seed=0),
        student=DetectorSpec(arch="retinanet", backbone="resnet18", **size),
        teachers={
            "retinanet_r50": DetectorSpec(arch="retinanet", backbone="resnet50", **size),
            "fcos_r101": DetectorSpec(arch="fcos", backbone="resnet101", **size),
            "retinanet_r101": DetectorSpec(arch="retinanet", backbone="resnet101", **size),
        },
        train=TrainConfig(epochs=24, batch_size=16, lr=0.01, warmup_iters=200),
        distill=TrainConfig(epochs=24, batch_size=16, lr=0.01, warmup_iters=200),  # each stage: the baseline's schedule
        loss_weight="auto",  # from-scratch features: the authors' alpha does not fit their scale
        notes="One GPU: 2000+300 synthetic images of 256 px, ResNet-18 student vs ResNet-50/101 teachers.",
    )


def _coco() -> Preset:
    # num_classes is replaced by the data's (COCO 2017: 80 categories + background; your own data: its own).
    size = dict(num_classes=91, fpn_channels=256, min_size=800, max_size=1333)
    return Preset(
        name="coco",
        synth=None,
        student=DetectorSpec(arch="retinanet", backbone="resnet18", backbone_weights="ResNet18_Weights.IMAGENET1K_V1",
                             **size),
        teachers={  # torchvision's COCO detectors, weakest to strongest (box AP 36.4, 39.2, 41.5)
            "retinanet_r50": "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
            "fcos_r50": "FCOS_ResNet50_FPN_Weights.COCO_V1",
            "retinanet_r50_v2": "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",
        },
        train=TrainConfig(epochs=12, batch_size=16, lr=0.01, warmup_iters=500, grad_clip=35.0),
        distill=TrainConfig(epochs=12, batch_size=16, lr=0.01, warmup_iters=500, grad_clip=35.0),
        loss_weight=1.0,  # pretrained COCO features: MGD's published RetinaNet settings as they are
        calibration_images=64,
        notes="COCO 2017 (or your own COCO-format data) at 800 px with torchvision's COCO detectors as teachers; "
              "needs their weights in the torch hub cache. The student keeps the dataset's labels; teachers' "
              "classes are matched to the dataset's categories by name.",
    )


PRESETS = {"tiny": _tiny, "small": _small, "coco": _coco}


def get_preset(name: str, image_size: int | None = None, **overrides: Any) -> Preset:
    """A fresh preset by name; keyword arguments replace top-level fields. `image_size` sets min_size and
    max_size of the student and of every teacher (trained or torchvision's), e.g. small images for a quick
    run of the `coco` preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    preset = replace(PRESETS[name](), **overrides)
    if image_size is None:
        return preset
    size = dict(min_size=int(image_size), max_size=int(image_size))
    return replace(preset, student=replace(preset.student, **size), reference_size=(int(image_size), int(image_size)),
                   teachers={k: v if isinstance(v, str) else replace(v, **size) for k, v in preset.teachers.items()})
