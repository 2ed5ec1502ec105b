"""How teacher selection scales: `pkdkit.selection.cost_matrix` time and peak memory for 64, 256 and 1,024
calibration images and 1+2, 1+4 models.

Each (images, models) point runs in a fresh process (`bench/run.py --selection-worker IMAGES MODELS`) so
that its peak memory is its own: the process builds the models, warms up on a few images, then times one
cost matrix and records how far its peak resident set (CUDA: allocated memory) rose during it. The images
are made on the fly by a map-style dataset (one seeded random image per index), so that holding the
calibration set does not count as the cost matrix's memory. Expected: time linear in images (one backbone
forward per model per batch) and in models, memory flat in images (running float64 moments of the
features, `(sum C)^2` per FPN level, whatever the number of images). The models differ in size (ResNet-18
to ResNeXt-50), so "linear in models" is read against the CPU time of their forwards alone
(``cpu_seconds_over_forwards``: flat when the cost matrix adds a constant share on top of the forwards).

Every point computes the cost matrix as the selection does by default: moments per image chunk and the
bootstrap intervals (`pkdkit.selection.RESAMPLES` resamples). `selection_at_default` times the whole selection
(cost matrix with intervals, then the order and its support) at the preset's default image count, beside the
same cost matrix without the bootstrap, interleaved: the bootstrap's extra time.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from timing import peak_growth_mib, summary, sync, time_interleaved

from pkdkit.features import backbone_features
from pkdkit.models import DetectorSpec, build_detector
from pkdkit.ordering import select_teachers
from pkdkit.selection import RESAMPLES, cost_matrix

IMAGES = (64, 256, 1024)
QUICK_IMAGES = (16, 64, 256)


class RandomImages(torch.utils.data.Dataset):
    """`n` images (3, H, W) in [0, 1], image i drawn from its own generator (seed, i): made when read."""

    def __init__(self, n: int, hw: tuple[int, int], seed: int = 0):
        self.n, self.hw, self.seed = n, hw, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.rand(3, *self.hw, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))


def selection_point(specs: dict[str, DetectorSpec], n_images: int, hw: tuple[int, int], batch_size: int,
                    device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Seconds (wall and CPU), images/s and peak memory growth of one `cost_matrix` over `specs`."""
    torch.manual_seed(seed)
    models = {name: build_detector(spec).to(device).eval() for name, spec in specs.items()}
    with warnings.catch_warnings(record=True) as caught:  # e.g. "too few pixel samples at p7": kept in the JSON
        warnings.simplefilter("always")
        cost_matrix(models, RandomImages(min(n_images, 2 * batch_size), hw, seed + 1), batch_size=batch_size,
                    device=device)  # warm-up: allocator, first calls
        gc.collect()
        result: dict[str, Any] = {}

        def run() -> None:
            sync(device)
            tic, cpu = time.perf_counter(), time.process_time()
            result["matrix"] = cost_matrix(models, RandomImages(n_images, hw, seed), batch_size=batch_size,
                                           device=device)
            sync(device)
            result["seconds"], result["cpu_seconds"] = time.perf_counter() - tic, time.process_time() - cpu

        peak, method = peak_growth_mib(run, device)
    forwards = _forward_cpu_seconds(models, hw, batch_size, device) * math.ceil(n_images / batch_size)
    return {"images": n_images, "models": len(specs), "seconds": result["seconds"],
            "cpu_seconds": result["cpu_seconds"], "images_per_s": n_images / result["seconds"],
            "forward_cpu_seconds": forwards, "cpu_seconds_over_forwards": result["cpu_seconds"] / forwards,
            "peak_mib": peak, "memory_method": method, "levels": result["matrix"].levels,
            "warnings": sorted({str(w.message) for w in caught})}


def selection_at_default(specs: dict[str, DetectorSpec], n_images: int, hw: tuple[int, int], batch_size: int,
                         device: torch.device, repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """The selection at its default image count: seconds of the cost matrix with its bootstrap intervals, of
    the same matrix without them (interleaved, medians of `repeats`), and of ordering the teachers with the
    order's support (the default strategy on every resample)."""
    torch.manual_seed(seed)
    models = {name: build_detector(spec).to(device).eval() for name, spec in specs.items()}
    images = RandomImages(n_images, hw, seed)
    made: dict[str, Any] = {}

    def matrix(resamples: int) -> None:
        made[resamples] = cost_matrix(models, images, batch_size=batch_size, device=device, resamples=resamples)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # levels with too few pixels: reported by selection_point
        times = time_interleaved({"with_intervals": lambda: matrix(RESAMPLES), "without": lambda: matrix(0)},
                                 warmup=0, repeats=repeats, device=device)
    names = list(specs)
    tic = time.perf_counter()
    selection = select_teachers(made[RESAMPLES], names[0], names[1:])
    order_seconds = time.perf_counter() - tic
    with_s, without_s = (summary(times[k])["median_s"] for k in ("with_intervals", "without"))
    return {"images": n_images, "models": len(specs), "resamples": RESAMPLES, "chunks": made[RESAMPLES].chunks,
            "seconds": with_s, "seconds_without_intervals": without_s, "bootstrap_share": with_s / without_s - 1,
            "order_and_support_seconds": order_seconds, "order": selection.order,
            "support": selection.order_support["share"]}


def _forward_cpu_seconds(models: dict[str, torch.nn.Module], hw: tuple[int, int], batch_size: int,
                         device: torch.device, repeats: int = 3) -> float:
    """CPU seconds of one batch through every model's transform + backbone + FPN (the median of `repeats`):
    the work a cost matrix cannot avoid, so that models of different sizes can be compared."""
    images = [RandomImages(batch_size, hw, 7)[i].to(device) for i in range(batch_size)]
    first = next(iter(models.values()))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            cpu = time.process_time()
            batch = first.transform(images)[0].tensors
            for m in models.values():
                backbone_features(m, batch)
            sync(device)
            times.append(time.process_time() - cpu)
    return statistics.median(times)


def bench_selection_scaling(run_py: Path, args: list[str], model_counts: tuple[int, ...],
                            images: tuple[int, ...]) -> dict[str, Any]:
    """Every (models, images) point in its own process (`run_py --selection-worker`), then the growth:
    seconds per image (flat if time is linear in images), seconds per image per model, and peak memory
    relative to the smallest image count (1.0 if flat)."""
    points = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # see bench_memory
    for n_models in model_counts:
        for n_images in images:
            cmd = [sys.executable, str(run_py), "--selection-worker", str(n_images), str(n_models), *args]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=run_py.parent.parent,
                                  env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"selection worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
            points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[bench] selection 1+{n_models - 1} models, {n_images} images: {points[-1]['seconds']:.1f} s, "
                  f"peak {points[-1]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"points": points, "images": list(images), "models": list(model_counts)}
    growth = {}
    for n_models in model_counts:
        row = [p for p in points if p["models"] == n_models]
        base = row[0]
        growth[f"1+{n_models - 1}"] = {
            "seconds_per_image": [p["seconds"] / p["images"] for p in row],
            "time_ratio_largest_vs_smallest_per_image": (row[-1]["seconds"] / row[-1]["images"])
            / (base["seconds"] / base["images"]),
            "cpu_time_ratio_largest_vs_smallest_per_image": (row[-1]["cpu_seconds"] / row[-1]["images"])
            / (base["cpu_seconds"] / base["images"]),
            "cpu_seconds_over_forwards": [p["cpu_seconds_over_forwards"] for p in row],
            "peak_mib": [p["peak_mib"] for p in row],
            "memory_ratio_largest_vs_smallest": row[-1]["peak_mib"] / base["peak_mib"],
        }
    if len(model_counts) > 1:
        small, large = model_counts[0], model_counts[-1]
        pick = {m: next(p for p in points if p["models"] == m and p["images"] == images[-1]) for m in (small, large)}
        growth["time_ratio_models"] = {
            "models": [small, large], "ratio": pick[large]["seconds"] / pick[small]["seconds"],
            "cpu_ratio": pick[large]["cpu_seconds"] / pick[small]["cpu_seconds"],
            # the models differ in size: compare with what their forwards alone cost
            "forward_cpu_ratio": pick[large]["forward_cpu_seconds"] / pick[small]["forward_cpu_seconds"]}
    out["growth"] = growth
    return out
