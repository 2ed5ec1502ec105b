"""The training loop: a plain loop in the spirit of torchvision's references/detection/engine.py.

`train(model, dataset, cfg, out_dir)` trains anything whose forward `(images, targets)` returns a dict of
losses: a torchvision detector in train mode, or a `pkdkit.distill.Distiller`: set-up (loader, optimizer,
scheduler), resume, then `train_one_epoch` (one `train_step` per batch) and a checkpoint per epoch (or every
`checkpoint_every` epochs). It writes an atomic checkpoint (`last.pt`: model, optimizer, scheduler, AMP scaler, RNG states,
history) and `history.json` together, and resumes from `last.pt` when run again with the same config. Each
epoch re-seeds every RNG from (seed, epoch) and the sampler shuffles by (seed, epoch), so a run killed mid-epoch and
resumed ends with exactly the weights of an uninterrupted run. Nothing random depends on the loader's processes:
each image's augmentation draws from a generator seeded by (seed, epoch, index) (`pkdkit.data.ItemKey`) and a
model's own draws (MGD's masks) from one seeded by (seed, step) (`step_seed`), so the weights are the same with
any `num_workers`.

`train_detector(...)` is the supervised entry point the CLI and notebooks call: build, train, save
`model.pt`, evaluate.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pkdkit.config import check_keys, check_range, check_types
from pkdkit.data import CocoDetection, make_loader, mixed_seed
from pkdkit.errors import ConfigError, PkdkitError
from pkdkit.evaluate import EvalRecord, evaluate_detector, evaluation_files
from pkdkit.files import run_lock, write_json
from pkdkit.models import (DetectorSpec, atomic_save, build_detector, initial_weights_label, load_checkpoint,
                           model_meta, save_detector, state_fingerprint)
from pkdkit.progress import bar as progress_bar, step as progress_step
from pkdkit.runid import RAN_ON, check_same_run


class NonFiniteLossError(PkdkitError, RuntimeError):
    """A loss or a weight became NaN or infinite; training stopped before it could reach a checkpoint."""


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow the 1x detection schedule of torchvision/MMDetection
    (SGD 0.01 at batch 16 scaled linearly, steps at 8/12 and 11/12 of training, grad-clip 35 as the
    paper's released MGD configs)."""

    epochs: int = field(default=12, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=8, metadata={"help": "images per step (per process under DDP)"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (with momentum) or adamw",
                                                    "choices": ("sgd", "adamw")})
    lr: float = field(default=0.005, metadata={"help": "peak learning rate (after warmup), > 0"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum in [0, 1)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "L2 / decoupled weight decay, >= 0"})
    schedule: str = field(default="multistep", metadata={"help": "learning-rate decay after warmup",
                                                         "choices": ("multistep", "cosine")})
    milestones: tuple[float, ...] = field(default=(8 / 12, 11 / 12), metadata={
        "help": "multistep: fractions of all iterations where the learning rate is multiplied by gamma"})
    gamma: float = field(default=0.1, metadata={"help": "multistep decay factor, > 0"})
    warmup_iters: int = field(default=500, metadata={"help": "linear warmup iterations (at most a quarter of "
                                                             "training), 0 for none"})
    warmup_factor: float = field(default=0.001, metadata={"help": "learning-rate multiplier at the first step "
                                                                  "of warmup, in [0, 1]"})
    grad_clip: float | None = field(default=35.0, metadata={"help": "clip the gradient norm to this; 0 (null "
                                                                    "in a plan): no clipping"})
    amp: bool = field(default=True, metadata={"help": "mixed precision (used on CUDA only)"})
    channels_last: bool = field(default=True, metadata={
        "help": "channels-last memory layout for the convolutions (used on CUDA only: 1.24x faster with AMP on "
                "an H200, bench/run.py --device cuda)"})
    seed: int = field(default=0, metadata={"help": "seed of every RNG (weights, shuffling, flips)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:<index> or mps"})
    num_workers: int | Literal["auto"] = field(default="auto", metadata={
        "help": "data-loader worker processes (decode, targets, masks off the training process); auto: on CUDA "
                "the CPUs of this process divided by the processes on this machine, at most 8 (`loader_workers`), "
                "on a CPU 0"})
    pin_memory: bool | None = field(default=None, metadata={"help": "page-locked batches for asynchronous copies; "
                                                                    "null: on when training on CUDA"})
    persistent_workers: bool | None = field(default=None, metadata={
        "help": "keep the loader workers between epochs (needs num_workers > 0); null: on when there are workers"})
    prefetch_factor: int | None = field(default=None, metadata={"help": "batches loaded ahead per worker; null: "
                                                                        "torch's default (2)"})
    checkpoint_every: int = field(default=1, metadata={
        "help": "write the resume checkpoint (last.pt, with history.json) every this many epochs and after the "
                "last; a killed run resumes from it exactly. Raise it where an epoch takes seconds and writing "
                "the checkpoint a good part of that (the tiny preset)"})
    progress: bool = field(default=True, metadata={"help": "progress bars and per-epoch lines"})

    def __post_init__(self) -> None:
        """Type and range of every setting (ConfigError naming it): a NaN or infinite learning rate must not
        train for an epoch and leave a checkpoint of NaN weights. Numbers given as strings ("1e-3", as YAML
        reads them) are read as numbers."""
        check_types(self, "training setting")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', not {self.optimizer!r}")
        if self.schedule not in ("multistep", "cosine"):
            raise ConfigError(f"schedule must be 'multistep' or 'cosine', not {self.schedule!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:<index> or mps, not {self.device!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            check_range(name, getattr(self, name), 1)
        for name in ("warmup_iters", "seed", "weight_decay"):
            check_range(name, getattr(self, name), 0)
        if self.num_workers != "auto":
            check_range("num_workers", self.num_workers, 0)
        check_range("lr", self.lr, 0, lo_open=True)
        check_range("momentum", self.momentum, 0, 1, hi_open=True)
        check_range("gamma", self.gamma, 0, lo_open=True)
        check_range("warmup_factor", self.warmup_factor, 0, 1)
        check_range("grad_clip", self.grad_clip, 0)
        for m in self.milestones:
            check_range("each milestone (a fraction of all iterations)", m, 0, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**check_keys(cls, d, "training settings"))

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})



# ----------------------------------------------------------------------------------------------------
# Seeds, devices, distributed
def seed_everything(seed: int) -> None:
    """The one place every RNG is seeded (python, numpy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of the random draws a model makes in training step `step` (global, from 0) on process `rank`
    (MGD's masks, `pkdkit.distill.Distiller.seed_step`): a function of these alone, so the draws are the same
    whatever the loader does and when a run resumes."""
    return mixed_seed(seed, step, rank)


MAX_AUTO_WORKERS = 8  # a cap: each worker holds a copy of the dataset and its prefetched batches in memory


def loader_workers(num_workers: int | str, device: torch.device) -> int:
    """The loader worker processes `num_workers` stands for: a number as it is; "auto" on CUDA is the CPUs this
    process may run on (`os.sched_getaffinity`) divided by the training processes on this machine
    (`LOCAL_WORLD_SIZE`, set by torchrun), less one for the training process itself, at most
    `MAX_AUTO_WORKERS`, at least 1: decoding and transforming images in other processes keeps the GPU busy;
    on a CPU (or MPS) "auto" is 0, since the training process's threads already use every core, and workers
    would only take cores from them. The weights do not depend on it (`pkdkit.data.ItemKey`)."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min(MAX_AUTO_WORKERS, per_process - 1))


def ran_on(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """Where a run of `cfg` on this process group trains, as its records keep it (`pkdkit.runid.RAN_ON`): the
    device's name ("cpu", or e.g. "NVIDIA H200"), torch's version, CPU threads, whether AMP and channels-last
    are in effect (on CUDA only) and the number of processes: what may change the numerics but not what the run
    is (`pkdkit.runid.MAY_CHANGE_NUMERICS`)."""
    device = _device_for(cfg, info)
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else device.type, "torch": str(torch.__version__),
            "threads": torch.get_num_threads(), "amp": cfg.amp and cuda, "channels_last": cfg.channels_last and cuda,
            "world_size": info.world_size}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here (use --device cpu)")
    return torch.device(name)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (env RANK/WORLD_SIZE/LOCAL_RANK); single process otherwise.
    gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _device_for(cfg: TrainConfig, info: DistInfo) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule
def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(it: int, total: int, cfg: TrainConfig) -> float:
    """LR multiplier at iteration `it` of `total`: linear warmup, then multi-step or cosine decay."""
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(it >= m * total for m in cfg.milestones)
    else:
        factor = 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    warm = min(cfg.warmup_iters, max(total // 4, 1)) if cfg.warmup_iters else 0
    if it < warm:
        alpha = it / warm
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, cfg: TrainConfig) -> Any:
    """The per-iteration learning-rate schedule of a run of `total_iters` steps (`lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total_iters, cfg))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------------
# The loop
def train(model: nn.Module, dataset: torch.utils.data.Dataset, cfg: TrainConfig, out_dir: str | os.PathLike, *,
          desc: str = "train", config: dict[str, Any] | None = None,
          on_epoch_end: Callable[[int, nn.Module], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Train `model` (forward `(images, targets) -> {name: loss}`) on `dataset`; returns per-epoch metrics.

    Writes `out_dir/last.pt` and `out_dir/history.json` (with `config`, which should describe everything
    that produced the run) after every `cfg.checkpoint_every` epochs and the last; only rank 0 writes.
    Resumes from `last.pt` if present.
    Loss names starting with ``distill`` are shown as the distillation part of the progress bar.
    A model with a `seed_step(seed)` method (a `pkdkit.distill.Distiller`, for MGD's masks) gets
    `step_seed(cfg.seed, step, rank)` before each step's forward.
    `on_epoch_end(epoch, model)` may return extra metrics (for example an evaluation) for that epoch.
    `out_dir` is locked for the run (`pkdkit.files.run_lock`): a second run on it fails at once.
    A resumed run must have the same `config`, training settings and training-set annotations (RunMismatchError
    names what differs).
    After every optimizer step the weights are checked as well as the loss before it, so a NaN or an
    infinity never reaches a checkpoint.
    """
    info = init_distributed(cfg.device)
    with run_lock(out_dir) if info.is_main else contextlib.nullcontext():
        return _train(model, dataset, cfg, Path(out_dir), info, desc, config, on_epoch_end)


def training_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint, history): what `train` writes into `out_dir`, `last.pt` and `history.json`."""
    return Path(out_dir) / "last.pt", Path(out_dir) / "history.json"


LEGACY_HISTORY = "metrics.json"  # the history's name in runs written before it got its own (still read)


def history_file(out_dir: str | os.PathLike) -> Path:
    """The training history in `out_dir`: `history.json`, or the `metrics.json` a run written before the rename
    left there (when it has no `history.json`)."""
    history = training_files(out_dir)[1]
    legacy = history.with_name(LEGACY_HISTORY)
    return legacy if legacy.exists() and not history.exists() else history


def detector_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(model, evaluation record): what `train_detector` leaves in `out_dir` once done, `model.pt` and the
    record `evaluate_detector` writes (`evaluation_files`)."""
    return Path(out_dir) / "model.pt", evaluation_files(out_dir)[0]


def _train(model: nn.Module, dataset: torch.utils.data.Dataset, cfg: TrainConfig, out_dir: Path, info: DistInfo,
           desc: str, config: dict[str, Any] | None,
           on_epoch_end: Callable[[int, nn.Module], dict[str, Any]] | None) -> list[dict[str, Any]]:
    # set-up: device, loader, optimisation
    device = _device_for(cfg, info)
    ckpt_path, history_path = training_files(out_dir)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # 4-D weights only; convolutions then run channels-last
    workers = loader_workers(cfg.num_workers, device)
    persistent = workers > 0 if cfg.persistent_workers is None else cfg.persistent_workers
    prefetch = cfg.prefetch_factor
    if workers == 0 and cfg.num_workers == "auto":  # auto chose no workers: their settings apply to nothing
        persistent, prefetch = False, None
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=workers,
                         distributed=info.enabled, persistent_workers=persistent, prefetch_factor=prefetch,
                         pin_memory=device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory)
    total_iters = cfg.epochs * len(loader)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, total_iters, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    # the training set's content, not only its path: a resumed run must see the same annotations
    full_config = {"train": cfg.to_dict(), "train_data_sha256": getattr(dataset, "fingerprint", None), **(config or {})}
    history, start_epoch = _resume(ckpt_path, model, optimizer, scheduler, scaler, full_config, device)

    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch) + info.rank)
        loader.sampler.set_epoch(epoch)
        t0 = time.time()
        means = train_one_epoch(net, loader, optimizer, scheduler, scaler, cfg, device, epoch, info=info,
                                ckpt_path=ckpt_path, desc=desc)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                  "seconds": round(time.time() - t0, 2), **means}
        if on_epoch_end is not None and info.is_main:
            record.update(on_epoch_end(epoch, model))
        history.append(record)
        if info.is_main:
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                _save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, epoch + 1, history, full_config)
                write_json({"config": full_config, "epochs": history}, history_path)
            if cfg.progress:
                progress_step(f"{desc} epoch {epoch + 1}/{cfg.epochs}: " +
                              ", ".join(f"{k}={v:.4f}" for k, v in record.items()
                                        if isinstance(v, float) and k not in ("lr", "seconds"))
                              + f" ({record['seconds']:.0f} s)")
        barrier(info)
    return history


def _resume(ckpt_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, full_config: dict[str, Any],
            device: torch.device) -> tuple[list[dict[str, Any]], int]:
    """(history, first epoch to run): from `ckpt_path` when it exists (model, optimizer, scheduler, AMP scaler
    and every RNG restored, after checking it was written with the same settings), else ([], 0)."""
    if not ckpt_path.exists():
        return [], 0
    state = load_checkpoint(ckpt_path, map_location=device)
    check_same_run(json.loads(state["config"]), full_config, f"{ckpt_path} was written with different settings",
                   SAME_SETTINGS)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return json.loads(state["history"]), int(state["epoch"])


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     scaler: torch.amp.GradScaler, epochs_done: int, history: list[dict[str, Any]],
                     full_config: dict[str, Any]) -> None:
    """Everything `_resume` needs to go on exactly, written atomically."""
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                 "epoch": epochs_done, "history": json.dumps(history), "config": json.dumps(full_config, default=str)},
                path)


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, cfg: TrainConfig, device: torch.device,
                    epoch: int, *, info: DistInfo, ckpt_path: Path, desc: str = "train") -> dict[str, float]:
    """One pass over `loader`, one `train_step` per batch. Returns the epoch's mean of every loss and of their
    sum ("loss"). A non-finite loss or weight stops training (NonFiniteLossError naming the step; `ckpt_path`
    is the checkpoint left intact)."""
    checks = FiniteChecks(model, info, ckpt_path)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    seed_step = getattr(module, "seed_step", None)  # a model with random draws of its own (a Distiller's masks)
    model.train()
    sums: dict[str, float] = {}
    # a bar beside the loader, not around it: a tqdm bar calls iter() on what it wraps once more,
    # which would start (and drop) a second set of loader workers every epoch
    bar = progress_bar(total=len(loader), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
    for i, (images, targets) in enumerate(loader):
        at = StepAt(epoch, i, epoch * len(loader) + i)
        if seed_step is not None:
            seed_step(step_seed(cfg.seed, at.step, info.rank))
        losses = train_step(model, images, targets, optimizer, scheduler, scaler, cfg, device, checks=checks, at=at)
        values = {k: v.item() for k, v in losses.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        kd = sum(v for k, v in values.items() if k.startswith("distill"))
        bar.set_postfix(loss=f"{values['loss']:.3f}", det=f"{values['loss'] - kd:.3f}", kd=f"{kd:.4f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.update()
    bar.close()
    n = max(len(loader), 1)
    return {k: v / n for k, v in sums.items()}


@dataclass(frozen=True)
class StepAt:
    """Where a training step is, for messages: `epoch` and `index` (the batch in the epoch) count from 0, and
    `step` is the run's global step."""

    epoch: int = 0
    index: int = 0
    step: int = 0

    def __str__(self) -> str:
        return f"epoch {self.epoch + 1}, step {self.index + 1} (global step {self.step + 1})"


def train_step(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, cfg: TrainConfig,
               device: torch.device, *, checks: "FiniteChecks", at: StepAt = StepAt(),
               amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One training step as torchvision's reference does it, and the one `train` runs: batch to `device`,
    forward `(images, targets) -> {name: loss}` under autocast, sum, backward (scaled by `scaler`), optional
    gradient clipping (`cfg.grad_clip`), optimizer step, `checks` of the loss (before the backward) and of the
    weights (after the step), and the per-iteration `scheduler` step.

    images: (3, H, W) tensors; targets: torchvision target dicts (boxes (K, 4), labels (K,), ...).
    amp_dtype: the autocast dtype; None: float16 when `scaler` is enabled (the engine's AMP, CUDA only), else
        no autocast. A bfloat16 step needs no loss scaling (pass a disabled scaler).
    Returns the losses and their sum under "loss", as 0-d tensors (reading them is the caller's sync).
    """
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    amp_dtype = amp_dtype or (torch.float16 if scaler.is_enabled() else None)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = model(images, targets)
    loss = sum(losses.values())
    checks.loss(loss, losses, at)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(checks.params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    checks.weights(at)
    scheduler.step()
    return {**losses, "loss": loss}


# What to do when an output folder holds a run of other settings (`pkdkit.runid.check_same_run`).
SAME_SETTINGS = "run again with the same settings, or use another output folder (or delete this one) to start over"


class FiniteChecks:
    """The finite checks of every training step of `model`'s trainable parameters: a non-finite loss, or a
    weight a huge learning rate pushed to inf, raises NonFiniteLossError naming the step before it can reach a
    checkpoint (`ckpt_path`, said to be intact). Under DDP every rank learns of a failure on any rank. Each
    check reads one number back from the device now."""

    def __init__(self, model: nn.Module, info: DistInfo = DistInfo(), ckpt_path: Path | None = None) -> None:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.info, self.ckpt_path = info, ckpt_path

    def _failed(self, bad: torch.Tensor) -> bool:
        if self.info.enabled:
            dist.all_reduce(bad)
        return bad.item() > 0

    def _kept(self) -> str:
        ckpt = self.ckpt_path
        return (f"the last good checkpoint {ckpt} is intact" if ckpt is not None and ckpt.exists()
                else "no checkpoint was written yet")

    def loss(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], at: StepAt) -> None:
        """Before the backward: the summed loss is finite."""
        if self._failed(torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise NonFiniteLossError(f"non-finite loss at {at}: {parts}; training stopped, {self._kept()}")

    def weights(self, at: StepAt) -> None:
        """After the optimizer step: the loss was finite, but a huge learning rate can still push weights to inf.
        A tensor's sum is finite exactly when its values are (short of an overflow, which only diverged weights
        reach), and summing costs a tenth of `isfinite(...).all()`: about 10 ms per step for a ResNet-50 on a CPU."""
        finite = torch.isfinite(torch.stack([p.detach().float().sum() for p in self.params]))  # (P,)
        if self._failed((~finite).sum().float()):
            names = [n for (n, _), ok in zip(self.named_params, finite.tolist()) if not ok]
            raise NonFiniteLossError(f"non-finite weights after the optimizer step at {at}: {len(names)} tensors, "
                                     f"e.g. {names[:3]} (is the learning rate too high?); training stopped, "
                                     f"{self._kept()}")


# ----------------------------------------------------------------------------------------------------
def detector_run(spec: DetectorSpec, train_ds: CocoDetection, val_ds: CocoDetection, cfg: TrainConfig,
                 config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(the seeded initial model, the settings that identify the run) of `train_detector`: the spec, the
    training settings, the data (annotation files and their content) and the `budget` (the initialisation,
    named, with its state fingerprint, and the epochs), with `config` added."""
    seed_everything(cfg.seed)
    model = build_detector(spec)
    budget = {"init": initial_weights_label(spec, cfg.seed), "epochs": cfg.epochs,
              "init_fingerprint": state_fingerprint(model)}
    full = {"spec": spec.to_dict(), "train": cfg.to_dict(),
            "data": {"train": str(train_ds.ann_file.resolve()), "train_sha256": train_ds.fingerprint,
                     "val": str(val_ds.ann_file.resolve()), "val_sha256": val_ds.fingerprint},
            "budget": budget, **(config or {})}
    return model, full


def finished_detector(out_dir: str | os.PathLike, full: dict[str, Any]) -> EvalRecord | None:
    """The evaluation record of a finished `train_detector` run in `out_dir` (its `model.pt` and record are
    there), None when it has not finished; RunMismatchError (`pkdkit.runid.check_same_run`) when that run was
    made with settings other than `full` (`detector_run`). Every "already trained" shortcut goes through it."""
    model_file, record_file = detector_files(out_dir)
    if not (model_file.exists() and record_file.exists()):
        return None
    record = EvalRecord.read(record_file)
    check_same_run(record.config, full, f"{record_file} was written with different settings", SAME_SETTINGS)
    model_meta(model_file)  # the saved model is still the detector checkpoint written (digest, weights)
    return record


def train_detector(spec: DetectorSpec, train_ds: CocoDetection, val_ds: CocoDetection, cfg: TrainConfig,
                   out_dir: str | os.PathLike, *, config: dict[str, Any] | None = None) -> EvalRecord:
    """Supervised training of one detector: build from `spec`, train, write `model.pt`, evaluate on `val_ds`.
    The record's config carries the `budget`: the initialisation (named, with its state fingerprint) and
    the epochs trained.

    Writes `out_dir/{last.pt, history.json, model.pt, eval.json, eval_results.json}` and returns the
    evaluation record. Running it again resumes an interrupted run, or returns the existing evaluation
    when `model.pt` and `eval.json` are already there; either way only if the spec, the training settings and
    the data (annotation files and their content) are those of the saved run, else RunMismatchError names
    what differs. Cheap checks come first: classes, image files, a writable `out_dir`.
    """
    out_dir = Path(out_dir)
    label_map = train_ds.label_map
    label_map.check_num_classes(spec.num_classes, "spec", train_ds.ann_file)
    train_ds.check_images()
    val_ds.check_images()
    model, full = detector_run(spec, train_ds, val_ds, cfg, config)
    info = init_distributed(cfg.device)
    with run_lock(out_dir) if info.is_main else contextlib.nullcontext():
        model_file = detector_files(out_dir)[0]
        record = finished_detector(out_dir, full)
        if record is not None:
            if cfg.progress and info.is_main:
                progress_step(f"train {spec.name}: trained earlier, AP {record.ap:.3f} ({out_dir.name})")
            return record
        train(model, train_ds, cfg, out_dir, desc=f"train {spec.name}", config=full)
        record = EvalRecord()
        if info.is_main:
            done = {**full, RAN_ON: ran_on(cfg, info)}  # where it was trained: in its model and record
            save_detector(model_file, model, spec, label_map, config=done)
            record = evaluate_detector(model, val_ds, label_map, out_dir=out_dir, name="eval",
                                       device=_device_for(cfg, info), config=done, progress=cfg.progress)
            if cfg.progress:
                progress_step(f"train {spec.name}: evaluated, AP {record.ap:.3f} ({out_dir.name})")
        barrier(info)
    return record
