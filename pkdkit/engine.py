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

from pkdkit.alarms import Alarm, ap_alarm, distill_ratio, epoch_alarms
from pkdkit.board import log_alarms, log_evaluation, log_training, open_writer
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
    log_every: int = field(default=50, metadata={
        "help": "read the losses and the finite checks back from the device, update the progress bar and write "
                "TensorBoard every this many steps (and at the end of each epoch): no host synchronisation on "
                "the steps between"})

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
        for name in ("epochs", "batch_size", "checkpoint_every", "log_every"):
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
          on_epoch_end: Callable[[int, nn.Module], dict[str, Any]] | None = None,
          step_offset: int = 0) -> list[dict[str, Any]]:
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
    infinity never reaches a checkpoint (`FiniteChecks`, read every `cfg.log_every` steps and before each
    checkpoint).

    TensorBoard event files go into `out_dir` (`pkdkit.board`: losses, ratio, learning rate, gradient norm,
    images/s every `cfg.log_every` steps; alarms; the COCO stats of an evaluation `on_epoch_end` returns), at
    global steps starting after `step_offset` (a plan's earlier stages). Each epoch record holds its loss means,
    its "step" (global, after it), its "monitor" statistics and its "alarms" (`pkdkit.alarms`).
    """
    info = init_distributed(cfg.device)
    with run_lock(out_dir) if info.is_main else contextlib.nullcontext():
        return _train(model, dataset, cfg, Path(out_dir), info, desc, config, on_epoch_end, step_offset)


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
           on_epoch_end: Callable[[int, nn.Module], dict[str, Any]] | None, step_offset: int) -> list[dict[str, Any]]:
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
    # rank 0 writes TensorBoard (at steps counted from 1: the steps done), flushed with each checkpoint; a resumed
    # run drops the events written after its checkpoint
    writer = open_writer(out_dir, purge_step=step_offset + start_epoch * len(loader) + 1) if info.is_main else None
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch) + info.rank)
        loader.sampler.set_epoch(epoch)
        t0 = time.time()
        means = train_one_epoch(net, loader, optimizer, scheduler, scaler, cfg, device, epoch, info=info,
                                ckpt_path=ckpt_path, desc=desc, writer=writer, step_offset=step_offset)
        step = step_offset + (epoch + 1) * len(loader)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                  "seconds": round(time.time() - t0, 2), **means}
        if on_epoch_end is not None and info.is_main:
            record.update(on_epoch_end(epoch, model))
        history.append(record)
        alarms = _epoch_alarms(history, cfg)
        if info.is_main:
            report_alarms(alarms, writer, step, cfg.progress, desc)
            if "metrics" in record:  # on_epoch_end evaluated
                log_evaluation(writer, record, step)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                _save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, epoch + 1, history, full_config)
                write_json({"config": full_config, "epochs": history}, history_path)
                writer.flush()
            if cfg.progress:
                progress_step(f"{desc} epoch {epoch + 1}/{cfg.epochs}: " +
                              ", ".join(f"{k}={v:.4f}" for k, v in record.items()
                                        if isinstance(v, float) and k not in ("lr", "seconds"))
                              + f" ({record['seconds']:.0f} s)")
        barrier(info)
    if writer is not None:
        writer.close()
    return history


def _epoch_alarms(history: list[dict[str, Any]], cfg: TrainConfig) -> list[Alarm]:
    """The alarms of the last epoch of `history` (`pkdkit.alarms.epoch_alarms`, and the AP alarm when its record
    holds an evaluation), kept in its record (``"alarms"``)."""
    record = history[-1]
    alarms = epoch_alarms(history, cfg.grad_clip)
    if "metrics" in record:
        alarms += evaluation_alarms(record, record["epoch"], cfg.epochs)
    record["alarms"] = [a.to_dict() for a in alarms]
    return alarms


def evaluation_alarms(record: dict[str, Any], epoch: int, epochs: int) -> list[Alarm]:
    """The alarms of an evaluation record (`pkdkit.evaluate.EvalRecord`) after `epoch` of `epochs`."""
    alarm = ap_alarm(EvalRecord.of(record).ap, epoch, epochs)
    return [alarm] if alarm is not None else []


def report_alarms(alarms: list[Alarm], writer: Any, step: int, progress: bool, desc: str) -> None:
    """Alarms as progress lines (`pkdkit.progress.step`) and TensorBoard text at global `step`."""
    if writer is not None:
        log_alarms(writer, alarms, step)
    if progress:
        for alarm in alarms:
            progress_step(f"{desc} ALARM {alarm.name}: {alarm.message}")


def note_evaluation(out_dir: str | os.PathLike, record: EvalRecord, history: list[dict[str, Any]], cfg: TrainConfig,
                    desc: str) -> EvalRecord:
    """After a run in `out_dir` (its `history`) is evaluated (`record`, written in `out_dir`): its COCO stats and
    alarms (the run's epochs' and the evaluation's, `pkdkit.alarms`) into the folder's TensorBoard events at
    the run's last step, the alarms printed, and kept in the record (``"alarms"``, its file rewritten).
    Returns the record."""
    step = int(history[-1].get("step", 0)) if history else 0
    epoch_alarms_ = [Alarm(**a) for r in history for a in r.get("alarms", [])]
    alarms = evaluation_alarms(record, cfg.epochs, cfg.epochs)
    record["alarms"] = [a.to_dict() for a in epoch_alarms_ + alarms]
    with contextlib.closing(open_writer(out_dir)) as writer:
        log_evaluation(writer, record, step)
        report_alarms(alarms, writer, step, cfg.progress, desc)
    if "path" in record:
        write_json({k: v for k, v in record.items() if k != "path"}, record["path"])
    return record


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
                    epoch: int, *, info: DistInfo, ckpt_path: Path, desc: str = "train", writer: Any = None,
                    step_offset: int = 0) -> dict[str, Any]:
    """One pass over `loader`, one `train_step` per batch. Returns the epoch's mean of every loss and of their
    sum ("loss"), averaged over the ranks, and its "monitor" statistics (`pkdkit.alarms.epoch_alarms`): the
    distillation / detection ratio ``kd_ratio`` (and in the first epoch ``kd_ratio_start``, the first logging
    interval's), the share of steps whose gradients were clipped, the last gradient norm measured.

    Nothing is read back from the device between logging intervals (every `cfg.log_every` steps and the
    epoch's last): the losses are summed and the finite checks kept on the device, then read at once, the bar
    updated and (rank 0, `writer`) TensorBoard written at global step `step_offset` + steps done. A non-finite
    loss or weight stops training there (NonFiniteLossError naming the step where it first happened;
    `ckpt_path` is the checkpoint left intact): the epoch's last read comes before any checkpoint."""
    checks = FiniteChecks(model, info, ckpt_path)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    seed_step = getattr(module, "seed_step", None)  # a model with random draws of its own (a Distiller's masks)
    meter = LossMeter(device, info)
    model.train()
    monitor: dict[str, Any] = {}
    # a bar beside the loader, not around it: a tqdm bar calls iter() on what it wraps once more,
    # which would start (and drop) a second set of loader workers every epoch
    bar = progress_bar(total=len(loader), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
    tic, images_seen = time.perf_counter(), 0
    for i, (images, targets) in enumerate(loader):
        at = StepAt(epoch, i, epoch * len(loader) + i)
        if seed_step is not None:
            seed_step(step_seed(cfg.seed, at.step, info.rank))
        read_now = (i + 1) % cfg.log_every == 0 or i + 1 == len(loader)
        checks.measure_grad_norm = read_now and writer is not None
        images_seen += len(images)
        losses = train_step(model, images, targets, optimizer, scheduler, scaler, cfg, device, checks=checks, at=at)
        meter.add(losses)
        bar.update()
        if read_now:
            checks.check()
            values = meter.read()
            ratio = distill_ratio(values)
            if epoch == 0 and "kd_ratio_start" not in monitor and ratio is not None:
                monitor["kd_ratio_start"] = ratio
            kd = sum(v for k, v in values.items() if k.startswith("distill"))
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{values['loss']:.3f}", det=f"{values['loss'] - kd:.3f}", kd=f"{kd:.4f}",
                            lr=f"{lr:.2e}")
            if writer is not None:
                now = time.perf_counter()
                grad_norm = checks.grad_norm.item() if checks.grad_norm is not None else None
                log_training(writer, step_offset + at.step + 1, values, lr=lr, grad_norm=grad_norm,
                             images_per_s=images_seen * info.world_size / max(now - tic, 1e-9))
                tic, images_seen = now, 0
    bar.close()
    means = meter.means()
    ratio = distill_ratio(means)
    monitor.update({"kd_ratio": ratio} if ratio is not None else {})
    if cfg.grad_clip:
        monitor["clipped_fraction"] = checks.clipped_fraction()
    if checks.grad_norm is not None:
        monitor["grad_norm"] = checks.grad_norm.item()
    return {**means, "monitor": monitor}


class LossMeter:
    """The loss values of an epoch's steps summed on the device (no host synchronisation per step), read back
    at logging intervals: `read` gives the means since the last read and `means` the epoch's, both averaged
    over the ranks (one all-reduce per read)."""

    def __init__(self, device: torch.device, info: DistInfo = DistInfo()) -> None:
        # float64 sums of the float32 values: the epoch means a per-step `.item()` summed in Python gave
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.info, self.names, self.sums = info, [], None
        self.steps, self.read_steps, self.read_sums = 0, 0, []

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """One step's losses ({name: 0-d tensor}, the same names each step)."""
        if self.sums is None:
            self.names = list(losses)
            self.sums = torch.zeros(len(self.names), dtype=self.dtype, device=losses["loss"].device)
            self.read_sums = [0.0] * len(self.names)
        self.sums += torch.stack([losses[k].detach().float() for k in self.names]).to(self.dtype)
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The mean of each loss over the steps since the last read (and over the ranks); synchronises."""
        sums = self.sums.clone()
        if self.info.enabled:
            dist.all_reduce(sums)
            sums /= self.info.world_size
        now = sums.tolist()
        n = max(self.steps - self.read_steps, 1)
        window = {k: (a - b) / n for k, a, b in zip(self.names, now, self.read_sums)}
        self.read_sums, self.read_steps = now, self.steps
        return window

    def means(self) -> dict[str, float]:
        """The epoch's mean of each loss, as of the last `read` (the engine reads at the epoch's last step)."""
        return {k: v / max(self.read_steps, 1) for k, v in zip(self.names, self.read_sums)}


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
    weights (after the step), kept on the device (`FiniteChecks.check` reads them), and the per-iteration
    `scheduler` step. Nothing here waits for the device.

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
    if cfg.grad_clip or checks.measure_grad_norm:
        scaler.unscale_(optimizer)
        if cfg.grad_clip:
            checks.gradients(torch.nn.utils.clip_grad_norm_(checks.params, cfg.grad_clip), cfg.grad_clip)
        else:  # the norm alone, fused, on the steps whose norm is logged
            grads = [p.grad for p in checks.params if p.grad is not None]
            checks.gradients(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), None)
    scaler.step(optimizer)
    scaler.update()
    checks.weights(at)
    scheduler.step()
    return {**losses, "loss": loss}


# What to do when an output folder holds a run of other settings (`pkdkit.runid.check_same_run`).
SAME_SETTINGS = "run again with the same settings, or use another output folder (or delete this one) to start over"


class FiniteChecks:
    """The finite checks of every training step of `model`'s trainable parameters: a non-finite loss, or a
    weight a huge learning rate pushed to inf, raises NonFiniteLossError naming the step where it first
    happened, before it can reach a checkpoint (`ckpt_path`, said to be intact). Under DDP every rank learns of
    a failure on any rank.

    Each step's checks stay on the device (the first bad step's index, the loss terms there, the tensors found
    non-finite), so a step never waits for the device; `check()` reads them back, and the engine calls it at
    every logging interval and at the end of each epoch, before any checkpoint. A non-finite loss therefore goes
    through its backward and optimizer step (the weights become non-finite too), but never into a checkpoint.
    It also keeps the gradient norm (`gradients`): the last one measured and how many steps were clipped."""

    NONE = 2**62  # "no bad step yet" (the minimum over ranks is the first bad step of any)

    def __init__(self, model: nn.Module, info: DistInfo = DistInfo(), ckpt_path: Path | None = None) -> None:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.info, self.ckpt_path = info, ckpt_path
        self.measure_grad_norm = False  # train_step measures the norm without clipping only when asked
        self.grad_norm: torch.Tensor | None = None
        self._ats: list[StepAt] = []  # the steps since this object was made, by index
        self._names: list[str] = []
        device = self.params[0].device
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._first_loss = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self._first_weights = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self._bad_parts: torch.Tensor | None = None
        self._bad_tensors = torch.zeros(len(self.params), dtype=torch.bool, device=device)
        self._clipped = torch.zeros((), dtype=torch.int64, device=device)
        self._measured = 0

    def _kept(self) -> str:
        ckpt = self.ckpt_path
        return (f"the last good checkpoint {ckpt} is intact" if ckpt is not None and ckpt.exists()
                else "no checkpoint was written yet")

    def loss(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], at: StepAt) -> None:
        """Before the backward: whether the summed loss is finite, and its terms at the first step it is not."""
        self._ats.append(at)
        self._names = list(losses)
        parts = torch.stack([v.detach().float() for v in losses.values()])  # (terms,)
        new = ~torch.isfinite(loss.detach()) & (self._first_loss == self.NONE)
        self._bad_parts = parts if self._bad_parts is None else torch.where(new, parts, self._bad_parts)
        self._first_loss = torch.where(new, self._count, self._first_loss)

    def weights(self, at: StepAt) -> None:
        """After the optimizer step: the loss may have been finite while a huge learning rate pushed weights to
        inf. One fused reduction (`torch._foreach_norm`, one norm per tensor): a norm is finite exactly when
        the tensor's values are (short of an overflow, which only diverged weights reach)."""
        with torch.no_grad():
            bad = ~torch.isfinite(torch.stack(torch._foreach_norm(self.params)))  # (P,)
        new = bad.any() & (self._first_weights == self.NONE)
        self._bad_tensors = torch.where(new, bad, self._bad_tensors)
        self._first_weights = torch.where(new, self._count, self._first_weights)
        self._count += 1

    def gradients(self, norm: torch.Tensor, clip: float | None) -> None:
        """The step's gradient norm before clipping (0-d, on the device); with `clip`, counts a clipped step."""
        self.grad_norm = norm.detach()
        if clip:
            self._clipped += norm.detach() > clip
            self._measured += 1

    def clipped_fraction(self) -> float:
        """The share of the steps (with clipping) whose gradient norm was above the clip; synchronises."""
        return self._clipped.item() / max(self._measured, 1)

    def check(self) -> None:
        """Read the checks of every step so far (one synchronisation; the minimum over ranks under DDP); raise
        NonFiniteLossError naming the first step whose loss or weights were not finite."""
        first = torch.stack([self._first_loss, self._first_weights])
        if self.info.enabled:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        loss_at, weights_at = first.tolist()
        if loss_at < self.NONE and loss_at <= weights_at:
            mine = self._first_loss.item() == loss_at  # the terms are this rank's when the loss was
            parts = (", ".join(f"{k}={v:.4g}" for k, v in zip(self._names, self._bad_parts.tolist())) if mine
                     else "on another rank")
            raise NonFiniteLossError(f"non-finite loss at {self._ats[loss_at]}: {parts}; training stopped, "
                                     f"{self._kept()}")
        if weights_at < self.NONE:
            names = [n for (n, _), bad in zip(self.named_params, self._bad_tensors.tolist()) if bad]
            raise NonFiniteLossError(f"non-finite weights after the optimizer step at {self._ats[weights_at]}: "
                                     f"{len(names)} tensors, e.g. {names[:3]} (is the learning rate too high?); "
                                     f"training stopped, {self._kept()}")


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
        history = train(model, train_ds, cfg, out_dir, desc=f"train {spec.name}", config=full)
        record = EvalRecord()
        if info.is_main:
            done = {**full, RAN_ON: ran_on(cfg, info)}  # where it was trained: in its model and record
            save_detector(model_file, model, spec, label_map, config=done)
            record = evaluate_detector(model, val_ds, label_map, out_dir=out_dir, name="eval",
                                       device=_device_for(cfg, info), config=done, progress=cfg.progress)
            note_evaluation(out_dir, record, history, cfg, f"train {spec.name}")
            if cfg.progress:
                progress_step(f"train {spec.name}: evaluated, AP {record.ap:.3f} ({out_dir.name})")
        barrier(info)
    return record
