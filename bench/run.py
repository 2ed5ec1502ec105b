"""pkdkit benchmarks: costs of distillation, evaluation and teacher selection, as ratios measured side by
side in one run so that machine noise cancels.

    .venv/bin/python bench/run.py                  # CPU, tiny preset, a few minutes on 2 cores (`make bench`)
    .venv/bin/python bench/run.py --quick          # fewer repeats and a smaller evaluation set
    .venv/bin/python bench/run.py --device cuda    # 800 px, ResNet-50 teacher / ResNet-18 student, batch 8, AMP
    .venv/bin/python bench/run.py --sizes realistic --batch-size 2 --warmup 1 --repeats 3 --only distill  # on CPU

What is measured (timed runs interleave A, B, B, A, ... after warm-up; medians are reported):
- distillation step overhead: a `Distiller` step (forward, backward, optimizer step; MGD on every common FPN
  level) over a student step plus the teacher's no-grad backbone+FPN forward on the same transformed batch.
  The target is <= 1.05. Two more rows help read it: the same Distiller with a loss that costs nothing
  (its machinery alone: feature tap, level naming, teacher call; the rest of the gap is MGD's generation
  convolutions) and the student step alone.
- evaluation: `pkdkit.evaluate.coco_evaluate` over plain pycocotools (``COCO.loadRes`` + ``COCOeval``
  evaluate/accumulate/summarize) on the same realistic generated results (bench/cocodata.py), bbox and
  segm, with all 12 stats compared bit for bit. The target is <= 0.5.
- teacher selection: seconds for a 1 + 4 model `pkdkit.selection.cost_matrix` on 64 images.
- peak memory of a distillation step and of a plain student step: on CPU each in its own process (growth of
  the peak resident set over the steps, from /proc), on CUDA from ``torch.cuda.max_memory_allocated``.

Models start from random weights (nothing is downloaded); batches are random images with random boxes.
A table is printed and everything (with machine info and the config) is written as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/cocodata.py
from cocodata import make_eval_set  # noqa: E402

from pkdkit.distill import build_distiller  # noqa: E402
from pkdkit.engine import TrainConfig, build_optimizer  # noqa: E402
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
    selection_images: int = 64
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
            cfg = cls(device=device, student=preset.student, teacher=teachers[-1], train=preset.distill,
                      candidates=_candidates(preset.student, teachers), loss=preset.loss,
                      loss_params=dict(preset.loss_params), image_hw=(preset.student.min_size,) * 2)
        else:
            raise ValueError(f"sizes must be 'tiny' or 'realistic', not {sizes!r}")
        if quick:
            cfg = replace(cfg, repeats=max(cfg.repeats // 2, 6), warmup=2, eval_images=200, eval_repeats=3)
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
# Helpers
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__, "python": platform.python_version(),
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": str(device),
            "platform": platform.platform()}
    for dist in ("pycocotools", "faster-coco-eval"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call of each function, run in turns (order reversed every round: A B, B A, ...)
    so that slow drifts of the machine hit all of them alike. The first `warmup` rounds are dropped."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            tic = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - tic)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


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


class TrainStep:
    """One training step of `model` (forward `(images, targets) -> {name: loss}`), as pkdkit.engine runs it:
    AMP autocast on CUDA, zero_grad, (scaled) backward, gradient clipping, the configured optimizer's step. `extra()` runs after
    the step (e.g. the teacher's forward, for the comparison that has no Distiller)."""

    def __init__(self, model: nn.Module, images: list[torch.Tensor], targets: list[dict], cfg: BenchConfig,
                 device: torch.device, extra: Callable[[], Any] | None = None):
        self.model, self.images, self.targets, self.cfg, self.device, self.extra = \
            model, images, targets, cfg, device, extra
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.train)
        self.amp = cfg.train.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.last_loss = float("nan")

    def __call__(self) -> None:
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.model(self.images, self.targets)
            if self.extra is not None:
                self.extra()
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_loss = loss.item()  # the engine logs every step: a sync, as here


STEPS = ("distill", "student+teacher", "student", "distill_free_loss")


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

    make = {"distill": lambda: TrainStep(distiller(cfg.loss, cfg.loss_params), images, targets, cfg, device),
            "student+teacher": lambda: TrainStep(copy.deepcopy(student), images, targets, cfg, device,
                                                 teacher_forward),
            "student": lambda: TrainStep(copy.deepcopy(student), images, targets, cfg, device),
            "distill_free_loss": lambda: TrainStep(distiller("mse", {"loss_weight": 0.0}), images, targets, cfg,
                                                   device)}
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


def _fresh_gt(gt: dict) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def bench_evaluation(cfg: BenchConfig) -> dict[str, Any]:
    from pycocotools.cocoeval import COCOeval

    from pkdkit.evaluate import STAT_NAMES, coco_evaluate
    from pkdkit.fasteval import DEFAULT_COCOEVAL

    gt, results = make_eval_set(cfg.eval_images, seed=cfg.seed)
    out: dict[str, Any] = {"images": len(gt["images"]), "ground_truth": len(gt["annotations"]),
                           "crowd": sum(a["iscrowd"] for a in gt["annotations"]), "detections": len(results),
                           "evaluator": f"{DEFAULT_COCOEVAL.__module__}.{DEFAULT_COCOEVAL.__name__}", "target": 0.5}
    for iou_type in ("bbox", "segm"):
        stats: dict[str, list[float]] = {}
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

        def pkdkit() -> None:
            coco_gt, res = inputs["pkdkit"]
            metrics = coco_evaluate(coco_gt, res, (iou_type,))[iou_type]
            stats["pkdkit"] = [metrics["stats"][n] for n in STAT_NAMES]

        times: dict[str, list[float]] = {"plain": [], "pkdkit": []}
        for r in range(cfg.eval_repeats + 1):  # the first round warms up
            for name, fn in ((("plain", plain), ("pkdkit", pkdkit)) if r % 2 == 0 else
                             (("pkdkit", pkdkit), ("plain", plain))):
                prepare()
                gc.collect()
                tic = time.perf_counter()
                fn()
                if r > 0:
                    times[name].append(time.perf_counter() - tic)
        diff = max(abs(a - b) for a, b in zip(stats["plain"], stats["pkdkit"]))
        out[iou_type] = {"plain": summary(times["plain"]), "pkdkit": summary(times["pkdkit"]),
                         "ratio": statistics.median(times["pkdkit"]) / statistics.median(times["plain"]),
                         "stats_identical": stats["plain"] == stats["pkdkit"], "stats_max_abs_diff": diff,
                         "AP": stats["pkdkit"][0], "stats": dict(zip(STAT_NAMES, stats["pkdkit"]))}
    return out


def bench_selection(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    from pkdkit.selection import cost_matrix

    torch.manual_seed(cfg.seed)
    specs = {"student": cfg.student, **{s.name: s for s in cfg.candidates}}
    models = {name: build_detector(spec).to(device).eval() for name, spec in specs.items()}
    g = torch.Generator().manual_seed(cfg.seed)
    images = [torch.rand(3, *cfg.image_hw, generator=g) for _ in range(cfg.selection_images)]
    times = []
    with warnings.catch_warnings(record=True) as caught:  # e.g. "too few pixel samples at p7": kept in the JSON
        warnings.simplefilter("always")
        for _ in range(2):  # the first run warms up (allocator, cuDNN)
            sync(device)
            tic = time.perf_counter()
            matrix = cost_matrix(models, images, batch_size=cfg.train.batch_size, device=device)
            sync(device)
            times.append(time.perf_counter() - tic)
    return {"models": {n: s.name for n, s in specs.items()}, "images": cfg.selection_images,
            "seconds": times[-1], "warmup_seconds": times[0], "levels": matrix.levels,
            "warnings": sorted({str(w.message) for w in caught})}


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak resident set size of this process (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def memory_worker(cfg: BenchConfig, kind: str) -> dict[str, Any]:
    """Peak memory growth (MiB) over `memory_steps` steps of `kind` ("distill" or "student"), measured from
    just before the first step, so it counts activations, gradients and optimizer state, not the weights.
    On CPU it runs in a fresh process (see `bench_memory`) so that the two do not share a heap."""
    device = torch.device(cfg.device)
    step = step_fns(cfg, device, (kind,))[kind]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(cfg.memory_steps):
            step()
        torch.cuda.synchronize(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "method": "torch.cuda.max_memory_allocated - memory_allocated before the first step"}
    if _peak_rss_reset():
        before = _rss_kib("VmRSS")
        for _ in range(cfg.memory_steps):
            step()
        return {"peak_mib": (_rss_kib("VmHWM") - before) / 1024,
                "method": "VmHWM after resetting it (/proc/self/clear_refs) - VmRSS before the first step"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(cfg.memory_steps):
        step()
    return {"peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
            "method": "ru_maxrss growth (a lower bound when set-up peaked higher)"}


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
    d, ev, sel, mem = res["distill_step"], res["evaluation"], res["selection"], res["memory"]
    ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    rows = [("distillation step", "", "", ""),
            ("  distill step (MGD, all levels)", ms(d["distill"]["median_s"]), "", ""),
            ("  student step + teacher forward", ms(d["student+teacher"]["median_s"]), "", ""),
            ("  overhead ratio", f"{d['ratio']:.3f}", "<= 1.05", "ok" if d["ratio"] <= 1.05 else "ABOVE"),
            ("  machinery only (free loss)", f"{d['ratio_machinery']:.3f}", "", ""),
            ("  student step alone", ms(d["student"]["median_s"]), "", ""),
            ("  images/s distill | student+teacher",
             f"{d['images_per_s']['distill']:.1f} | {d['images_per_s']['student+teacher']:.1f}", "", "")]
    rows.append((f"COCO evaluation ({ev['images']} images, {ev['detections']} dets)", "", "", ""))
    for iou_type in ("bbox", "segm"):
        e = ev[iou_type]
        rows += [(f"  {iou_type}: pycocotools | pkdkit",
                  f"{ms(e['plain']['median_s'])} | {ms(e['pkdkit']['median_s'])}", "", ""),
                 (f"  {iou_type}: time ratio", f"{e['ratio']:.3f}", "<= 0.5", "ok" if e["ratio"] <= 0.5 else "ABOVE"),
                 (f"  {iou_type}: 12 stats identical", str(e["stats_identical"]), "True",
                  "ok" if e["stats_identical"] else f"max diff {e['stats_max_abs_diff']:.2e}")]
    rows += [(f"teacher selection: 1+4 cost matrix, {sel['images']} images", f"{sel['seconds']:.2f} s", "", ""),
             ("peak memory: student step", f"{mem['student']['peak_mib']:.1f} MiB", "", ""),
             ("peak memory: distill step", f"{mem['distill']['peak_mib']:.1f} MiB", "", ""),
             ("  memory ratio", f"{mem['ratio']:.3f}", "", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
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
    parser.add_argument("--only", nargs="+", choices=["distill", "evaluation", "selection", "memory"],
                        help="run only these parts")
    parser.add_argument("--memory-worker", choices=["student", "distill"], help=argparse.SUPPRESS)
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
    device = torch.device(cfg.device)
    parts = args.only or ["distill", "evaluation", "selection", "memory"]
    res: dict[str, Any] = {"machine": machine_info(device), "config": cfg.to_dict(),
                           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    t0 = time.perf_counter()
    runners = {"distill": ("distill_step", lambda: bench_distill_step(cfg, device)),
               "evaluation": ("evaluation", lambda: bench_evaluation(cfg)),
               "selection": ("selection", lambda: bench_selection(cfg, device)),
               "memory": ("memory", lambda: bench_memory(cfg, args))}
    for part in parts:
        key, run = runners[part]
        tic = time.perf_counter()
        print(f"[bench] {part} ...", file=sys.stderr, flush=True)
        res[key] = run()
        print(f"[bench] {part} done in {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    if not args.only:
        print(table(res))
    else:
        print(json.dumps({k: res[k] for k in res if k not in ("machine", "config")}, indent=2, default=str))
    m = res["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['torch_threads']} threads, "
          f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; {res['seconds']:.0f} s; JSON: {out}")
    return res


if __name__ == "__main__":
    main()
