"""pkdkit benchmarks: costs of distillation, evaluation, data loading and teacher selection, as ratios
measured side by side in one run so that machine noise cancels.

    OMP_NUM_THREADS=1 .venv/bin/python bench/run.py   # CPU, tiny preset, ~15 min on 2 cores (`make bench`)
    .venv/bin/python bench/run.py --quick          # fewer repeats, smaller evaluation and selection sets
    .venv/bin/python bench/run.py --device cuda    # 800 px, ResNet-50 teacher / ResNet-18 student, batch 8,
                                                   # plus AMP / channels-last / cuDNN autotuning side by side
    .venv/bin/python bench/run.py --only evaluation loader   # some parts only

What is measured (timed runs interleave A, B, B, A, ... after warm-up; medians are reported):
- ``distill``: a `Distiller` step (the engine's own `train_step`: forward, backward, optimizer and scheduler
  steps, finite checks; MGD on every common FPN level) over a
  student step plus the teacher's no-grad backbone+FPN forward on the same transformed batch. The target
  is <= 1.05. Two more rows help read it: the same Distiller with a loss that costs nothing (its machinery
  alone: feature tap, level naming, teacher call; the rest of the gap is MGD's generation convolutions) and
  the student step alone.
- ``evaluation``: `pkdkit.evaluate.coco_evaluate` over plain pycocotools (``COCO.loadRes`` + ``COCOeval``
  evaluate/accumulate/summarize) on the same generated set with COCO's 80 categories, crowd regions and
  masks on every detection (bench/cocodata.py), bbox and segm; all 12 stats and per-class AP compared bit
  for bit. Targets: bbox <= 0.35, segm <= 0.5 (wall time; the CPU-time ratio is reported beside it); and
  ``segm_real``, segm on real-shaped masks (COCO-sized images, many-vertex polygons, uncompressed crowd RLE:
  ``make_eval_set(real_shaped=True)``), where mask work weighs most: target <= 0.35.
- ``loader``: images/s of `pkdkit.data.make_loader` (decode, targets, masks) with 0, 1 and 2 workers against
  the training step's, on the tiny and small presets' data (bench/loading.py). Target: >= 3x the step.
- ``jpeg_loader``: the same on COCO-like data (`pkdkit synth --size coco --format jpeg`: ~640 x 480 JPEGs,
  many-vertex masks), with 0, 1, 2, 4, ... workers up to the CPUs, beside the student's training step on a
  batch of it; the per-image cost split into the JPEG decode and the rest (with torchvision's ``decode_jpeg``
  on the CPU beside PIL's), and the loader workers a GPU's step rate needs (ceil(rate x per-image cost); the
  rate measured here on CUDA, else read from reports/bench-cuda.json).
- ``reference``: images/s of `pkdkit.engine.train_step` against a loop in the style of torchvision's
  ``references/detection`` ``train_one_epoch`` (bench/reference.py), same student, batches and settings,
  interleaved. Target: >= 0.97.
- ``selection``: `pkdkit.selection.cost_matrix` time and peak memory for 64, 256 and 1,024 calibration images
  and 1+2, 1+4 models, each point in its own process (bench/scaling.py): time linear, memory flat; and the
  whole selection (cost matrix with bootstrap intervals, order and support) at the preset's default image
  count (all 64 validation images of the tiny preset), beside the matrix without intervals.
- ``memory``: peak memory of a distillation step and of a plain student step: on CPU each in its own process
  (growth of the peak resident set over the steps, from /proc), on CUDA from ``torch.cuda.max_memory_allocated``.
- ``settings`` (CUDA): the distillation step plain, with AMP (bfloat16 where supported; the teacher's forward
  runs inside the same autocast), + channels-last, + ``cudnn.benchmark``, interleaved. Without a GPU it is
  recorded as not measured; tests/test_bench.py runs its code path on CPU.

Models start from random weights (nothing is downloaded); batches are random images with random boxes.
A table is printed and everything (with machine info, thread count, load average, config and command) is
written as JSON (``--out``, default reports/bench.json).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/cocodata.py, bench/timing.py
from cocodata import make_eval_set  # noqa: E402

import loading  # noqa: E402
import reference  # noqa: E402
import scaling  # noqa: E402
from timing import TrainStep, machine_info, peak_growth_mib, summary, time_interleaved  # noqa: E402

from pkdkit.distill import build_distiller  # noqa: E402
from pkdkit.engine import TrainConfig  # noqa: E402
from pkdkit.features import backbone_features  # noqa: E402
from pkdkit.models import DetectorSpec, build_detector  # noqa: E402
from pkdkit.presets import get_preset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchConfig:
    """What one run measures. `for_device` fills in the sizes for CPU (tiny preset) or CUDA (realistic)."""

    device: str = "cpu"
    student: DetectorSpec = field(default_factory=DetectorSpec)
    teacher: DetectorSpec = field(default_factory=DetectorSpec)  # the distillation step's teacher
    candidates: list[DetectorSpec] = field(default_factory=list)  # the 4 teachers of the 1 + 4 cost matrix
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, lr, grad clip, AMP (CUDA only)
    image_hw: tuple[int, int] = (96, 96)  # raw image size before the detector's resize
    loss: str = "mgd"
    loss_params: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    warmup: int = 3
    repeats: int = 15
    eval_images: int = 500
    eval_repeats: int = 5
    selection_images: tuple[int, ...] = scaling.IMAGES  # calibration images of the cost-matrix points
    selection_models: tuple[int, ...] = (3, 5)  # 1 + 2 and 1 + 4 models
    selection_default_images: int = 64  # the selection's default image count (the preset's validation set)
    loader_presets: tuple[str, ...] = ("tiny", "small")
    loader_images: dict[str, int] = field(default_factory=lambda: {"tiny": 64, "small": 96})
    loader_passes: int = 3
    loader_steps: int = 4
    jpeg_images: int = 32  # COCO-like JPEGs of the jpeg_loader part
    reference_batches: int = 2  # batches per timed pass of the reference-loop comparison
    settings_repeats: int = 20  # per AMP / channels-last / cuDNN variant (CUDA)
    memory_steps: int = 3
    seed: int = 0

    @classmethod
    def make(cls, device: str, sizes: str | None = None, quick: bool = False) -> "BenchConfig":
        """sizes: "tiny" (the tiny preset: 96 px, 32-channel FPN) or "realistic" (COCO-like: 800 px,
        256-channel FPN, 91 classes, batch 8, AMP on CUDA); default: realistic on CUDA, tiny on CPU."""
        sizes = sizes or ("realistic" if device.startswith("cuda") else "tiny")
        if sizes == "realistic":
            preset = get_preset("coco")
            size = dict(num_classes=91, fpn_channels=256, min_size=800, max_size=1333)
            student = DetectorSpec(arch="retinanet", backbone="resnet18", **size)
            teacher = replace(student, backbone="resnet50")
            cfg = cls(device=device, student=student, teacher=teacher, image_hw=(480, 640), channels_last=True,
                      train=preset.distill.replace(batch_size=8, amp=True), loss_params=dict(preset.loss_params),
                      candidates=_candidates(student, [teacher]), repeats=30, warmup=5)
        elif sizes == "tiny":
            preset = get_preset("tiny")
            teachers = [t for t in preset.teachers.values() if isinstance(t, DetectorSpec)]
            # The preset calibrates its weight per stage (loss_weight: auto); a timed step uses a fixed one of
            # the same scale for features trained from scratch (MGD at the authors' 2e-5 starts ~50x the
            # detection loss there, and bf16 steps can overflow).
            cfg = cls(device=device, student=preset.student, teacher=teachers[-1], train=preset.distill,
                      candidates=_candidates(preset.student, teachers), loss=preset.loss,
                      loss_params={"alpha_mgd": 1e-6, **preset.loss_params}, image_hw=(preset.student.min_size,) * 2,
                      selection_default_images=preset.calibration_images or preset.synth["n_val"])
        else:
            raise ValueError(f"sizes must be 'tiny' or 'realistic', not {sizes!r}")
        if quick:
            cfg = replace(cfg, repeats=max(cfg.repeats // 2, 6), warmup=2, eval_images=200, eval_repeats=3,
                          selection_images=scaling.QUICK_IMAGES, loader_images={"tiny": 32, "small": 32},
                          jpeg_images=16,
                          loader_passes=2, loader_steps=2, settings_repeats=6)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(student=self.student.to_dict(), teacher=self.teacher.to_dict(), train=self.train.to_dict(),
                 candidates=[t.to_dict() for t in self.candidates])
        return d


def _candidates(student: DetectorSpec, teachers: list[DetectorSpec]) -> list[DetectorSpec]:
    """Four candidate teachers: the given ones, then larger backbones of the student's detector."""
    found = {t.name: t for t in teachers}
    for backbone in ("resnet34", "resnet50", "resnet101", "resnext50_32x4d"):
        found.setdefault(replace(student, backbone=backbone).name, replace(student, backbone=backbone))
    return list(found.values())[:4]


# ----------------------------------------------------------------------------------------------------
# Inputs and models
def make_batch(cfg: BenchConfig, device: torch.device, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """`batch_size` random images (3, H, W) in [0, 1] with 2-6 random boxes each (labels 1..K-1)."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.image_hw
    images, targets = [], []
    for _ in range(cfg.train.batch_size):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        n = int(torch.randint(2, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + 0.25 * torch.rand(n, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, cfg.student.num_classes, (n,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def build_models(cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(cfg.seed)
    student, teacher = build_detector(cfg.student), build_detector(cfg.teacher)
    for m in (student, teacher):
        m.to(device)
        if cfg.channels_last:
            m.to(memory_format=torch.channels_last)
    return student.train(), teacher.eval()


STEPS = ("distill", "student+teacher", "student", "distill_free_loss")


class WithTeacher(nn.Module):
    """The student's forward `(images, targets) -> {name: loss}`, then `teacher_forward()` (not trained): under
    the engine's step, the teacher runs inside the student's autocast, as a Distiller's teacher does."""

    def __init__(self, student: nn.Module, teacher_forward: Callable[[], None]) -> None:
        super().__init__()
        self.student, self.teacher_forward = student, teacher_forward

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        losses = self.student(images, targets)
        self.teacher_forward()
        return losses
PARTS = ("distill", "evaluation", "loader", "jpeg_loader", "reference", "selection", "memory", "settings")


def step_fns(cfg: BenchConfig, device: torch.device, kinds: tuple[str, ...] = STEPS) -> dict[str, TrainStep]:
    """The steps compared, each on its own copy of the same student: "distill" (Distiller + MGD),
    "student+teacher" (the student's step and, in the same autocast, the teacher's no-grad backbone forward
    on the batch the student saw), "student" (alone) and "distill_free_loss" (the Distiller with an MSE
    loss of weight 0, which costs next to nothing: the Distiller's machinery alone)."""
    student, teacher = build_models(cfg, device)
    images, targets = make_batch(cfg, device, cfg.seed)
    with torch.no_grad():
        batch = student.transform(images)[0].tensors  # (N, 3, H, W), what the student's backbone sees
    if cfg.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)

    def teacher_forward() -> None:
        with torch.no_grad():
            backbone_features(teacher, batch)

    def distiller(loss: str, params: dict[str, Any]) -> nn.Module:
        model = build_distiller(copy.deepcopy(student), teacher, loss, params).to(device)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    make = {"distill": lambda: TrainStep(distiller(cfg.loss, cfg.loss_params), images, targets, cfg.train, device),
            "student+teacher": lambda: TrainStep(WithTeacher(copy.deepcopy(student), teacher_forward), images,
                                                 targets, cfg.train, device),
            "student": lambda: TrainStep(copy.deepcopy(student), images, targets, cfg.train, device),
            "distill_free_loss": lambda: TrainStep(distiller("mse", {"loss_weight": 0.0}), images, targets,
                                                   cfg.train, device)}
    return {kind: make[kind]() for kind in kinds}


# ----------------------------------------------------------------------------------------------------
# Benchmarks
def bench_distill_step(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    steps = step_fns(cfg, device)
    times = time_interleaved(steps, cfg.warmup, cfg.repeats, device)
    med = {name: statistics.median(t) for name, t in times.items()}
    out: dict[str, Any] = {name: summary(t) for name, t in times.items()}
    out["ratio"] = med["distill"] / med["student+teacher"]
    out["ratio_machinery"] = med["distill_free_loss"] / med["student+teacher"]
    out["ratio_vs_student"] = med["distill"] / med["student"]
    out["images_per_s"] = {name: cfg.train.batch_size / m for name, m in med.items()}
    out["final_losses"] = {name: s.last_loss for name, s in steps.items()}
    out["target"] = 1.05
    return out


def bench_reference(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """pkdkit's training step against torchvision's reference loop (bench/reference.py) on the student and
    `reference_batches` batches of random images (`make_batch`, seeds 0, 1, ...)."""
    student, _ = build_models(cfg, device)
    batches = [make_batch(cfg, device, seed) for seed in range(cfg.reference_batches)]
    out = reference.bench_reference(student, batches, cfg.train, device, cfg.warmup, cfg.repeats)
    out["student"] = cfg.student.name
    return out


def _fresh_gt(gt: dict) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


EVAL_TARGETS = {"bbox": 0.35, "segm": 0.5, "segm_real": 0.35}  # pkdkit's time / pycocotools' time


def bench_evaluation(cfg: BenchConfig) -> dict[str, Any]:
    from pkdkit.fasteval import DEFAULT_COCOEVAL

    gt, results = make_eval_set(cfg.eval_images, seed=cfg.seed)
    out: dict[str, Any] = {"images": len(gt["images"]), "categories": len(gt["categories"]),
                           "categories_with_ground_truth": len({a["category_id"] for a in gt["annotations"]}),
                           "ground_truth": len(gt["annotations"]),
                           "crowd": sum(a["iscrowd"] for a in gt["annotations"]), "detections": len(results),
                           "detections_with_masks": sum("segmentation" in r for r in results),
                           "evaluator": f"{DEFAULT_COCOEVAL.__module__}.{DEFAULT_COCOEVAL.__name__}",
                           "target": EVAL_TARGETS}
    for iou_type in ("bbox", "segm"):
        out[iou_type] = _compare_evaluators(gt, results, iou_type, cfg.eval_repeats)
    # COCO-sized images and many-vertex masks (crowd regions as uncompressed RLE, a few categories dominate):
    # where mask conversions and IoUs weigh most, as on real COCO masks
    gt_real, results_real = make_eval_set(cfg.eval_images, seed=cfg.seed, real_shaped=True)
    polygons = [a["segmentation"][0] for a in gt_real["annotations"] if not a["iscrowd"]]
    out["segm_real"] = {"images": len(gt_real["images"]), "ground_truth": len(gt_real["annotations"]),
                        "detections": len(results_real),
                        "polygon_vertices_mean": sum(len(p) // 2 for p in polygons) / max(len(polygons), 1),
                        **_compare_evaluators(gt_real, results_real, "segm", cfg.eval_repeats)}
    return out


def _compare_evaluators(gt: dict, results: list[dict], iou_type: str, repeats: int) -> dict[str, Any]:
    """Plain pycocotools against `pkdkit.evaluate.coco_evaluate` on the same ground truth and results, interleaved
    (`repeats` timed rounds after one warm-up round): times, their ratios, and whether all numbers agree."""
    from pycocotools.cocoeval import COCOeval

    from pkdkit.evaluate import STAT_NAMES, coco_evaluate, cocoeval_metrics

    stats: dict[str, list[float]] = {}
    per_class: dict[str, dict[str, float]] = {}
    inputs: dict[str, Any] = {}

    def prepare() -> None:  # untimed: fresh ground truth and results for each run (pycocotools edits both)
        inputs["plain"] = (_fresh_gt(gt), copy.deepcopy(results))
        inputs["pkdkit"] = (_fresh_gt(gt), copy.deepcopy(results))

    def plain() -> None:
        coco_gt, res = inputs["plain"]
        with contextlib.redirect_stdout(io.StringIO()):
            cocoeval = COCOeval(coco_gt, coco_gt.loadRes(res), iou_type)
            cocoeval.evaluate()
            cocoeval.accumulate()
            cocoeval.summarize()
        stats["plain"] = [float(s) for s in cocoeval.stats]
        per_class["plain"] = cocoeval_metrics(cocoeval)["per_class"]

    def pkdkit() -> None:
        coco_gt, res = inputs["pkdkit"]
        metrics = coco_evaluate(coco_gt, res, (iou_type,))[iou_type]
        stats["pkdkit"] = [metrics["stats"][n] for n in STAT_NAMES]
        per_class["pkdkit"] = metrics["per_class"]

    times: dict[str, list[float]] = {"plain": [], "pkdkit": []}
    cpu: dict[str, list[float]] = {"plain": [], "pkdkit": []}
    for r in range(repeats + 1):  # the first round warms up
        for name, fn in ((("plain", plain), ("pkdkit", pkdkit)) if r % 2 == 0 else
                         (("pkdkit", pkdkit), ("plain", plain))):
            prepare()
            gc.collect()
            tic, cpu_tic = time.perf_counter(), time.process_time()
            fn()
            if r > 0:
                times[name].append(time.perf_counter() - tic)
                cpu[name].append(time.process_time() - cpu_tic)
    diff = max(abs(a - b) for a, b in zip(stats["plain"], stats["pkdkit"]))
    return {"plain": summary(times["plain"]), "pkdkit": summary(times["pkdkit"]),
            "ratio": statistics.median(times["pkdkit"]) / statistics.median(times["plain"]),
            "cpu_ratio": statistics.median(cpu["pkdkit"]) / statistics.median(cpu["plain"]),
            "per_class_identical": per_class["plain"] == per_class["pkdkit"],
            "stats_identical": stats["plain"] == stats["pkdkit"], "stats_max_abs_diff": diff,
            "AP": stats["pkdkit"][0], "stats": dict(zip(STAT_NAMES, stats["pkdkit"]))}


def selection_specs(cfg: BenchConfig, n_models: int) -> dict[str, DetectorSpec]:
    """The student and the first ``n_models - 1`` candidate teachers."""
    if not 2 <= n_models <= len(cfg.candidates) + 1:
        raise ValueError(f"n_models must be in [2, {len(cfg.candidates) + 1}], got {n_models}")
    return {"student": cfg.student, **{s.name: s for s in cfg.candidates[:n_models - 1]}}


def selection_worker(cfg: BenchConfig, n_images: int, n_models: int) -> dict[str, Any]:
    """One cost-matrix point (child process of `bench_selection`)."""
    return scaling.selection_point(selection_specs(cfg, n_models), n_images, cfg.image_hw, cfg.train.batch_size,
                                   torch.device(cfg.device), cfg.seed)


def bench_selection(cfg: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    out = scaling.bench_selection_scaling(Path(__file__).resolve(), _child_args(cfg, args), cfg.selection_models,
                                          cfg.selection_images)
    out["model_names"] = {f"1+{m - 1}": [spec.name for spec in selection_specs(cfg, m).values()]
                          for m in cfg.selection_models}
    out["default"] = scaling.selection_at_default(selection_specs(cfg, cfg.selection_models[0]),
                                                  cfg.selection_default_images, cfg.image_hw, cfg.train.batch_size,
                                                  torch.device(cfg.device), seed=cfg.seed)
    return out


def _child_args(cfg: BenchConfig, args: argparse.Namespace) -> list[str]:
    """The arguments that make a child process's BenchConfig equal to this one."""
    child = ["--device", cfg.device, "--batch-size", str(cfg.train.batch_size)]
    return child + (["--quick"] if args.quick else []) + (["--sizes", args.sizes] if args.sizes else [])


# ----------------------------------------------------------------------------------------------------
# Speed settings side by side: AMP, channels-last, cuDNN autotuning
SETTINGS: dict[str, dict[str, bool]] = {
    "plain": dict(amp=False, channels_last=False, cudnn_benchmark=False),
    "amp": dict(amp=True, channels_last=False, cudnn_benchmark=False),
    "amp+channels_last": dict(amp=True, channels_last=True, cudnn_benchmark=False),
    "amp+channels_last+cudnn_benchmark": dict(amp=True, channels_last=True, cudnn_benchmark=True),
}


def settings_fns(cfg: BenchConfig, device: torch.device,
                 names: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, TrainStep]:
    """A distillation step (Distiller + the configured loss) per setting, each on its own models: autocast
    (bfloat16 where supported, else float16 with loss scaling) around the student's forward, the teacher's
    forward (the Distiller runs it inside the same autocast) and the loss; channels-last weights and input;
    ``torch.backends.cudnn.benchmark`` set before each of its steps (a no-op off CUDA)."""
    images, targets = make_batch(cfg, device, cfg.seed)
    steps = {}
    for name in names:
        s = SETTINGS[name]
        student, teacher = build_models(replace(cfg, channels_last=s["channels_last"]), device)
        model = build_distiller(student, teacher, cfg.loss, cfg.loss_params).to(device)
        if s["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        step = TrainStep(model, images, targets, cfg.train, device, amp=s["amp"])
        step.cudnn_benchmark, step.teacher = s["cudnn_benchmark"], teacher
        steps[name] = step
    return steps


def bench_settings(cfg: BenchConfig, device: torch.device, warmup: int | None = None,
                   repeats: int | None = None, steps: dict[str, TrainStep] | None = None) -> dict[str, Any]:
    """Distillation-step time per setting (`settings_fns`, or `steps` made by it), interleaved, and each
    one's speed-up over "plain"."""
    steps = steps or settings_fns(cfg, device)

    def call(step: TrainStep) -> Callable[[], None]:
        def run() -> None:
            torch.backends.cudnn.benchmark = step.cudnn_benchmark
            step()
        return run

    saved = torch.backends.cudnn.benchmark
    try:
        times = time_interleaved({n: call(s) for n, s in steps.items()}, cfg.warmup if warmup is None else warmup,
                                 cfg.settings_repeats if repeats is None else repeats, device)
    finally:
        torch.backends.cudnn.benchmark = saved
    med = {name: statistics.median(t) for name, t in times.items()}
    out: dict[str, Any] = {name: {**summary(t), **SETTINGS[name], "images_per_s": cfg.train.batch_size / med[name],
                                  "speedup_vs_plain": med["plain"] / med[name],
                                  "amp_dtype": str(steps[name].amp_dtype).replace("torch.", "")
                                  if steps[name].amp else None,
                                  "final_loss": steps[name].last_loss}
                           for name, t in times.items()}
    out["device"] = str(device)
    return out


def memory_worker(cfg: BenchConfig, kind: str) -> dict[str, Any]:
    """Peak memory growth (MiB) over `memory_steps` steps of `kind` ("distill" or "student"), measured from
    just before the first step, so it counts activations, gradients and optimizer state, not the weights.
    On CPU it runs in a fresh process (see `bench_memory`) so that the two do not share a heap."""
    device = torch.device(cfg.device)
    step = step_fns(cfg, device, (kind,))[kind]
    gc.collect()

    def steps() -> None:
        for _ in range(cfg.memory_steps):
            step()

    peak, method = peak_growth_mib(steps, device)
    return {"peak_mib": peak, "method": method + " the first step"}


def bench_memory(cfg: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("student", "distill"):
        if cfg.device.startswith("cuda"):
            out[kind] = memory_worker(cfg, kind)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", kind, "--device", cfg.device]
        cmd += (["--quick"] if args.quick else []) + (["--sizes", args.sizes] if args.sizes else [])
        cmd += ["--batch-size", str(cfg.train.batch_size)]
        # glibc keeps freed blocks for reuse, so a process's resident set remembers old peaks: with every
        # block of 64 KiB or more mapped on its own (and unmapped when freed) it follows the live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {kind!r} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["distill"]["peak_mib"] / out["student"]["peak_mib"]
    return out


# ----------------------------------------------------------------------------------------------------
# Report
def table(res: dict[str, Any]) -> str:
    """The figures of the parts that ran, with their targets, as a plain-text table."""
    ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    rows: list[tuple[str, str, str, str]] = []
    if "distill_step" in res:
        d = res["distill_step"]
        rows += [("distillation step", "", "", ""),
                 ("  distill step (MGD, all levels)", ms(d["distill"]["median_s"]), "", ""),
                 ("  student step + teacher forward", ms(d["student+teacher"]["median_s"]), "", ""),
                 ("  overhead ratio", f"{d['ratio']:.3f}", "<= 1.05", ok(d["ratio"] <= 1.05)),
                 ("  machinery only (free loss)", f"{d['ratio_machinery']:.3f}", "", ""),
                 ("  student step alone", ms(d["student"]["median_s"]), "", "")]
    if "evaluation" in res:
        ev = res["evaluation"]
        rows.append((f"COCO evaluation ({ev['images']} images, {ev['categories']} categories, "
                     f"{ev['detections_with_masks']} detections with masks, {ev['crowd']} crowd)", "", "", ""))
        for iou_type in ("bbox", "segm", "segm_real"):
            if iou_type not in ev:
                continue
            e, target = ev[iou_type], ev["target"][iou_type]
            if iou_type == "segm_real":
                rows.append((f"  segm_real: COCO-sized images, many-vertex masks ({e['images']} images, "
                             f"{e['detections']} detections, {e['polygon_vertices_mean']:.0f} vertices/polygon)",
                             "", "", ""))
            rows += [(f"  {iou_type}: pycocotools | pkdkit",
                      f"{ms(e['plain']['median_s'])} | {ms(e['pkdkit']['median_s'])}", "", ""),
                     (f"  {iou_type}: time ratio (CPU-time ratio)", f"{e['ratio']:.3f} ({e['cpu_ratio']:.3f})",
                      f"<= {target}", ok(e["ratio"] <= target)),
                     (f"  {iou_type}: 12 stats | per-class AP identical",
                      f"{e['stats_identical']} | {e['per_class_identical']}", "True",
                      ok(e["stats_identical"] and e["per_class_identical"]))]
    for name, ld in res.get("loader", {}).items():
        rows.append((f"data loading, {name} preset ({ld['image_size']} px, batch {ld['batch_size']}, "
                     f"masks)", "", "", ""))
        rows.append(("  training step (images/s)", f"{ld['step']['images_per_s']:.1f}", "", ""))
        for row in ld["loader"]:
            rows.append((f"  loader, {row['num_workers']} workers: images/s (x step)",
                         f"{row['images_per_s']:.0f} ({row['ratio_to_step']:.1f}x)", f">= {ld['target']:.0f}x",
                         ok(row["ratio_to_step"] >= ld["target"])))
        for row in ld["fed"]:
            rows.append((f"  steps fed by the loader ({row['num_workers']} workers) / steps alone",
                         f"{row['ratio_to_step']:.2f}", "", ""))
    if "jpeg_loader" in res:
        jp = res["jpeg_loader"]
        rows.append((f"data loading, COCO-like JPEGs ({jp['images']} images ~640x480, masks, batch "
                     f"{jp['batch_size']}; {jp['cpus']} CPUs)", "", "", ""))
        rows.append((f"  training step, {jp['student']} on {jp['step']['device']} (images/s)",
                     f"{jp['step']['images_per_s']:.1f}", "", ""))
        for row in jp["loader"]:
            rows.append((f"  loader, {row['num_workers']} workers: images/s (x step)",
                         f"{row['images_per_s']:.0f} ({row['ratio_to_step']:.1f}x)", "", ""))
        pi = jp["per_image"]
        rows.append(("  per image: all | PIL JPEG decode | to float (shares) | decode_jpeg on CPU",
                     f"{1000 * pi['item_s']:.1f} | {1000 * pi['pil_decode_s']:.1f} | {1000 * pi['to_float_s']:.1f} ms "
                     f"({100 * pi['decode_share']:.0f}%, {100 * pi['to_float_share']:.0f}%) | "
                     f"{1000 * pi['torchvision_decode_jpeg_cpu_s']:.1f} ms", "", ""))
        if "workers_needed" in jp:
            g = jp["gpu_step"]
            rows.append((f"  workers for {g['gpu']} ({g['source']}): distill | student step",
                         " | ".join(f"{jp['workers_needed'][k]} ({g[k]:.0f} img/s)" for k in jp["workers_needed"]),
                         "", ""))
    if "reference" in res:
        rf = res["reference"]
        rows += [(f"training throughput vs torchvision's reference loop ({rf['student']}, batch {rf['batch_size']})",
                  "", "", ""),
                 ("  pkdkit train_step | reference loop (images/s)",
                  f"{rf['pkdkit']['images_per_s']:.2f} | {rf['reference']['images_per_s']:.2f}", "", ""),
                 ("  ratio (CPU-time ratio)", f"{rf['ratio']:.3f} ({rf['cpu_ratio']:.3f})", f">= {rf['target']}",
                  ok(rf["ratio"] >= rf["target"]))]
    if "selection" in res:
        sel = res["selection"]
        for key, g in sel["growth"].items():
            if key.startswith("1+"):
                rows.append((f"selection {key} models, {sel['images']} images: s", ", ".join(
                    f"{p['seconds']:.1f}" for p in sel["points"] if f"1+{p['models'] - 1}" == key), "", ""))
                rows.append(("  per-image time, largest / smallest (CPU time)",
                             f"{g['time_ratio_largest_vs_smallest_per_image']:.2f} "
                             f"({g['cpu_time_ratio_largest_vs_smallest_per_image']:.2f})", "~1 (linear)", ""))
                rows.append(("  CPU time / the models' forwards alone",
                             ", ".join(f"{r:.2f}" for r in g["cpu_seconds_over_forwards"]), "flat", ""))
                rows.append(("  peak MiB (largest / smallest)", ", ".join(f"{m:.0f}" for m in g["peak_mib"]) +
                             f" ({g['memory_ratio_largest_vs_smallest']:.2f})", "~1 (flat)", ""))
        if "default" in sel:
            d = sel["default"]
            rows.append((f"selection at its default ({d['images']} images, 1+{d['models'] - 1} models): s",
                         f"{d['seconds']:.1f} ({d['seconds_without_intervals']:.1f} without intervals)", "", ""))
            rows.append((f"  bootstrap ({d['resamples']} resamples of {d['chunks']} chunks): extra time",
                         f"{100 * d['bootstrap_share']:.0f}%", "small", ""))
            rows.append(("  order + support: s", f"{d['order_and_support_seconds']:.3f}", "", ""))
        if "time_ratio_models" in sel["growth"]:
            g = sel["growth"]["time_ratio_models"]
            rows.append((f"  CPU time 1+{g['models'][1] - 1} / 1+{g['models'][0] - 1} models", f"{g['cpu_ratio']:.2f}",
                         f"~{g['forward_cpu_ratio']:.2f} (their forwards)", ""))
    if "memory" in res:
        mem = res["memory"]
        rows += [("peak memory: student step | distill step",
                  f"{mem['student']['peak_mib']:.1f} | {mem['distill']['peak_mib']:.1f} MiB", "", ""),
                 ("  memory ratio", f"{mem['ratio']:.3f}", "", "")]
    if "settings" in res:
        st = res["settings"]
        if st.get("status") == "not measured":
            rows.append(("AMP / channels-last / cuDNN autotuning", "not measured (no GPU)", "", ""))
        else:
            rows.append((f"distill step settings on {st['device']}", "", "", ""))
            for name in SETTINGS:
                rows.append((f"  {name}", f"{ms(st[name]['median_s'])} ({st[name]['speedup_vs_plain']:.2f}x)", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    header = ("what", "value", "target", "")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "-" * (sum(widths) + 6)] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (tiny preset) or cuda (800 px, R50 -> R18, AMP)")
    parser.add_argument("--sizes", choices=["tiny", "realistic"],
                        help="model and image sizes (default: realistic on CUDA, tiny on CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 200 evaluation images")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench.json"), help="JSON results file")
    parser.add_argument("--repeats", type=int, help="timed distillation steps per variant")
    parser.add_argument("--warmup", type=int, help="untimed distillation steps per variant first")
    parser.add_argument("--batch-size", type=int, help="images per training step")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other parts' results already in --out and replace only those run now "
                             "(recorded under 'merged' with their command, machine and seconds)")
    parser.add_argument("--memory-worker", choices=["student", "distill"], help=argparse.SUPPRESS)
    parser.add_argument("--selection-worker", nargs=2, type=int, metavar=("IMAGES", "MODELS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = BenchConfig.make(args.device, args.sizes, args.quick)
    if args.repeats is not None:
        cfg = replace(cfg, repeats=args.repeats)
    if args.warmup is not None:
        cfg = replace(cfg, warmup=args.warmup)
    if args.batch_size is not None:
        cfg = replace(cfg, train=cfg.train.replace(batch_size=args.batch_size))
    if args.memory_worker:  # child process of bench_memory: one JSON line on stdout
        print(json.dumps(memory_worker(cfg, args.memory_worker)))
        return {}
    if args.selection_worker:  # child process of bench_selection: one JSON line on stdout
        print(json.dumps(selection_worker(cfg, *args.selection_worker), default=str))
        return {}
    device = torch.device(cfg.device)
    parts = args.only or list(PARTS)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + " ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    res: dict[str, Any] = {"machine": machine_info(device), "config": cfg.to_dict(), "command": command}
    t0 = time.perf_counter()
    runners = {"distill": ("distill_step", lambda: bench_distill_step(cfg, device)),
               "evaluation": ("evaluation", lambda: bench_evaluation(cfg)),
               "loader": ("loader", lambda: {name: loading.bench_loading(
                   name, device, n_images=cfg.loader_images[name], passes=cfg.loader_passes,
                   steps=cfg.loader_steps) for name in cfg.loader_presets}),
               "jpeg_loader": ("jpeg_loader", lambda: loading.bench_jpeg_loading(
                   cfg.student, cfg.train, device, n_images=cfg.jpeg_images, passes=cfg.loader_passes,
                   steps=cfg.loader_steps, gpu_report=ROOT / "reports" / "bench-cuda.json")),
               "reference": ("reference", lambda: bench_reference(cfg, device)),
               "selection": ("selection", lambda: bench_selection(cfg, args)),
               "memory": ("memory", lambda: bench_memory(cfg, args)),
               "settings": ("settings", lambda: bench_settings(cfg, device) if device.type == "cuda" else
                            {"status": "not measured", "reason": "no GPU on this machine; run "
                             "`bench/run.py --device cuda` on one (the code path is tested on CPU by "
                             "tests/test_bench.py)", "variants": list(SETTINGS)})}
    for part in parts:
        key, run = runners[part]
        tic = time.perf_counter()
        print(f"[bench] {part} ...", file=sys.stderr, flush=True)
        res[key] = run()
        print(f"[bench] {part} done in {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = res
    if args.merge and out.is_file():
        written = json.loads(out.read_text())
        keys = [runners[part][0] for part in parts]
        written.update({key: res[key] for key in keys})
        written.setdefault("merged", []).append({"parts": keys, "command": command, "machine": res["machine"],
                                                 "seconds": res["seconds"]})
    out.write_text(json.dumps(written, indent=2, default=str))
    print(table(res))
    m = res["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['torch_threads']} threads, "
          f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; {res['seconds']:.0f} s; JSON: {out}")
    return res


if __name__ == "__main__":
    main()
