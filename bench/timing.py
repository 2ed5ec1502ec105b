"""What every benchmark part shares: machine facts, interleaved timing, peak memory, the engine's training step."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pkdkit.engine import FiniteChecks, LossMeter, StepAt, TrainConfig, build_optimizer, build_scheduler, train_step


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
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = list(os.getloadavg())  # other jobs on a shared machine show here
    for dist in ("pycocotools", "faster-coco-eval"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
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


# ----------------------------------------------------------------------------------------------------
# Peak memory of this process (Linux): reset the high-water mark, run, read it
def peak_rss_reset() -> bool:
    """Reset the kernel's peak resident set size of this process (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_growth_mib(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """(MiB, method): how far the peak memory of `fn()` rose above what was in use just before it: on CUDA
    ``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set (run it in a fresh process
    with ``MALLOC_MMAP_THRESHOLD_=65536``, see `bench/run.py`, so that the heap does not remember old peaks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return ((torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "torch.cuda.max_memory_allocated - memory_allocated before")
    if peak_rss_reset():
        before = rss_kib("VmRSS")
        fn()
        return (rss_kib("VmHWM") - before) / 1024, "VmHWM after resetting it (/proc/self/clear_refs) - VmRSS before"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return ((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
            "ru_maxrss growth (a lower bound when set-up peaked higher)")


# ----------------------------------------------------------------------------------------------------
# One training step
def amp_dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 where the device supports it (no loss scaling needed), else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # CPU autocast supports bfloat16 only


class TrainStep:
    """One training step of `model` (forward `(images, targets) -> {name: loss}`): `pkdkit.engine.train_step`
    itself, the very step `engine.train` runs (autocast, backward, gradient clipping, optimizer step, the
    finite checks and the per-iteration scheduler; the losses summed on the device and, with the checks, read
    back every ``train.log_every`` steps, as the engine does), on a fixed batch, with its own optimizer, scheduler (a run
    of `total_iters` steps: it sets the learning rate, not the step's cost) and scaler.

    amp: None follows the engine (``train.amp`` on CUDA only, float16 with a GradScaler); True/False force it,
    in `amp_dtype` (default: `amp_dtype_for(device)`, bfloat16 where supported); loss scaling is used only
    for float16.
    """

    def __init__(self, model: nn.Module, images: list[torch.Tensor], targets: list[dict], train: TrainConfig,
                 device: torch.device, *, amp: bool | None = None, amp_dtype: torch.dtype | None = None,
                 total_iters: int = 1000):
        self.model, self.images, self.targets, self.train, self.device = model, images, targets, train, device
        self.checks = FiniteChecks(model)
        self.optimizer = build_optimizer(self.checks.params, train)
        self.scheduler = build_scheduler(self.optimizer, total_iters, train)
        if amp is None:
            self.amp, self.amp_dtype = train.amp and device.type == "cuda", amp_dtype or torch.float16
        else:
            self.amp, self.amp_dtype = amp, amp_dtype or amp_dtype_for(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.steps = 0
        self.losses: dict[str, torch.Tensor] = {}
        self.meter = LossMeter(device)

    def __call__(self) -> None:
        losses = train_step(self.model, self.images, self.targets, self.optimizer, self.scheduler, self.scaler,
                            self.train, self.device, checks=self.checks, at=StepAt(step=self.steps),
                            amp_dtype=self.amp_dtype if self.amp else None)
        self.steps += 1
        self.losses = losses
        self.meter.add(losses)
        if self.steps % self.train.log_every == 0:  # the engine reads the checks and losses back as often
            self.checks.check()
            self.meter.read()

    @property
    def last_loss(self) -> float:
        """The last step's loss (read back from the device now: after the timing)."""
        return self.losses["loss"].item() if self.losses else float("nan")
