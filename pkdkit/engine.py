"""The training loop: a plain loop in the spirit of torchvision's references/detection/engine.py.

`train(model, dataset, cfg, out_dir)` trains anything whose forward `(images, targets)` returns a dict of
losses: a torchvision detector in train mode, or a `pkdkit.distill.Distiller`. It writes an atomic
checkpoint (`last.pt`: model, optimizer, scheduler, AMP scaler, RNG states, history) and `metrics.json`
after every epoch, and resumes from `last.pt` when run again with the same config. Each epoch re-seeds
every RNG from (seed, epoch) and the sampler shuffles by (seed, epoch), so a run killed mid-epoch and
resumed ends with exactly the weights of an uninterrupted run.

`train_detector(...)` is the supervised entry point the CLI and notebooks call: build, train, save
`model.pt`, evaluate.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pkdkit.data import CocoDetection, make_loader
from pkdkit.evaluate import evaluate_detector
from pkdkit.files import write_json
from pkdkit.models import (DetectorSpec, atomic_save, build_detector, initial_weights_label, load_checkpoint,
                           save_detector, state_fingerprint)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stopped before the optimizer step."""


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow the 1x detection schedule of torchvision/MMDetection
    (SGD 0.01 at batch 16 scaled linearly, steps at 8/12 and 11/12 of training, grad-clip 35 as the
    paper's released MGD configs)."""

    epochs: int = 12
    batch_size: int = 8
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "multistep"  # multistep | cosine
    milestones: tuple[float, ...] = (8 / 12, 11 / 12)  # fractions of all iterations
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    grad_clip: float | None = 35.0
    amp: bool = True  # used on CUDA only
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    num_workers: int = 0  # loader worker processes (decode, targets, masks off the training process)
    pin_memory: bool | None = None  # page-locked batches for asynchronous copies; None: on when training on CUDA
    persistent_workers: bool = False  # keep the workers between epochs (needs num_workers > 0)
    prefetch_factor: int | None = None  # batches loaded ahead per worker; None: torch's default (2)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', not {self.optimizer!r}")
        if self.schedule not in ("multistep", "cosine"):
            raise ValueError(f"schedule must be 'multistep' or 'cosine', not {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        self.milestones = tuple(float(m) for m in self.milestones)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# Settings that do not change the result: a resumed run may change them.
_RESUME_FREE = {"progress", "num_workers", "device", "pin_memory", "persistent_workers", "prefetch_factor"}


# ----------------------------------------------------------------------------------------------------
# Seeds, devices, distributed
def seed_everything(seed: int) -> None:
    """The one place every RNG is seeded (python, numpy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here")
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
    factor = 1.0
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(it >= m * total for m in cfg.milestones)
    else:
        factor = 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    warm = min(cfg.warmup_iters, max(total // 4, 1)) if cfg.warmup_iters else 0
    if it < warm:
        alpha = it / warm
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


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

    Writes `out_dir/last.pt` and `out_dir/metrics.json` (with `config`, which should describe everything
    that produced the run) after each epoch; only rank 0 writes. Resumes from `last.pt` if present.
    Loss names starting with ``distill`` are shown as the distillation part of the progress bar.
    `on_epoch_end(epoch, model)` may return extra metrics (for example an evaluation) for that epoch.
    """
    info = init_distributed(cfg.device)
    device = _device_for(cfg, info)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "last.pt"
    model.to(device)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers,
                         distributed=info.enabled, persistent_workers=cfg.persistent_workers,
                         prefetch_factor=cfg.prefetch_factor,
                         pin_memory=device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory)
    total_iters = cfg.epochs * len(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total_iters, cfg))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    full_config = {"train": cfg.to_dict(), **(config or {})}

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_resume_config(state.get("train_config", {}), cfg, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history = json.loads(state["history"])
        start_epoch = int(state["epoch"])

    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    step = start_epoch * len(loader)
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch) + info.rank)
        loader.sampler.set_epoch(epoch)
        net.train()
        sums: dict[str, float] = {}
        t0 = time.time()
        # a bar beside the loader, not around it: tqdm.auto's bar calls iter() on what it wraps once more,
        # which would start (and drop) a second set of loader workers every epoch
        bar = tqdm(total=len(loader), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
        for i, (images, targets) in enumerate(loader):
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, enabled=use_amp):
                losses = net(images, targets)
            loss = sum(losses.values())
            _check_finite(loss, losses, info, epoch, i, step, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            values = {k: v.item() for k, v in losses.items()}
            values["loss"] = loss.item()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            kd = sum(v for k, v in values.items() if k.startswith("distill"))
            bar.set_postfix(loss=f"{values['loss']:.3f}", det=f"{values['loss'] - kd:.3f}", kd=f"{kd:.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.update()
        bar.close()
        n = max(len(loader), 1)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                  "seconds": round(time.time() - t0, 2), **{k: v / n for k, v in sums.items()}}
        if on_epoch_end is not None and info.is_main:
            record.update(on_epoch_end(epoch, model))
        history.append(record)
        if info.is_main:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                         "epoch": epoch + 1, "history": json.dumps(history), "train_config": cfg.to_dict()},
                        ckpt_path)
            write_json({"config": full_config, "epochs": history}, out_dir / "metrics.json")
            if cfg.progress:
                tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: " +
                           ", ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "lr"))
        barrier(info)
    return history


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if diff:
        raise RuntimeError(f"{path} was written with different settings ({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in diff)}); "
                           "resume with the same settings, or delete it / use another output folder to start over")


def _check_finite(loss: torch.Tensor, losses: dict[str, torch.Tensor], info: DistInfo, epoch: int, i: int,
                  step: int, ckpt: Path) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
    if info.enabled:
        dist.all_reduce(bad)
    if bad.item() > 0:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        kept = f"the last good checkpoint {ckpt} is intact" if ckpt.exists() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {i + 1} (global step {step + 1}): "
                                 f"{parts}; training stopped, {kept}")


# ----------------------------------------------------------------------------------------------------
def train_detector(spec: DetectorSpec, train_ds: CocoDetection, val_ds: CocoDetection, cfg: TrainConfig,
                   out_dir: str | os.PathLike, *, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Supervised training of one detector: build from `spec`, train, write `model.pt`, evaluate on `val_ds`.
    The record's config carries the `budget`: the initialisation (named, with its state fingerprint) and
    the epochs trained.

    Writes `out_dir/{last.pt, metrics.json, model.pt, eval.json, eval_results.json}` and returns the
    evaluation record. Running it again resumes an interrupted run, or returns the existing evaluation
    when `model.pt` and `eval.json` are already there.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.pt").exists() and (out_dir / "eval.json").exists():
        return json.loads((out_dir / "eval.json").read_text())
    label_map = train_ds.label_map
    if spec.num_classes != label_map.num_classes:
        raise ValueError(f"spec.num_classes={spec.num_classes} but {train_ds.ann_file} has "
                         f"{len(label_map.cat_ids)} categories (num_classes={label_map.num_classes} with background)")
    seed_everything(cfg.seed)
    model = build_detector(spec)
    budget = {"init": initial_weights_label(spec, cfg.seed), "epochs": cfg.epochs,
              "init_fingerprint": state_fingerprint(model)}
    full = {"spec": spec.to_dict(), "train": cfg.to_dict(), "data": {"train": str(train_ds.ann_file),
                                                                      "val": str(val_ds.ann_file)},
            "budget": budget, **(config or {})}
    train(model, train_ds, cfg, out_dir, desc=f"train {spec.name}", config=full)
    info = init_distributed(cfg.device)
    record: dict[str, Any] = {}
    if info.is_main:
        save_detector(out_dir / "model.pt", model, spec, label_map, config=full)
        record = evaluate_detector(model, val_ds, label_map, out_dir=out_dir, name="eval",
                                   device=_device_for(cfg, info), config=full, progress=cfg.progress)
    barrier(info)
    return record
