"""pkdkit's training step against a plain loop in the style of torchvision's detection reference
(``references/detection/engine.py``, ``train_one_epoch``), on the same model, batches and settings.

The reference step, as ``train_one_epoch`` runs it: batch to the device, forward under autocast (when AMP is
on), sum of the losses, the summed loss read on the host (``.item()``, which the reference checks with
``math.isfinite``, exiting if not) and every loss term read for its ``MetricLogger``, ``zero_grad``,
backward (scaled by the GradScaler when there is one), optimizer step, per-iteration scheduler step. It clips
the gradient norm where the configuration does (the reference's detection script has no clipping option; with
the same settings both clip). pkdkit's side is `pkdkit.engine.train_step` through `timing.TrainStep`: the step
`engine.train` runs, with its finite checks of the loss and of the weights.

Both start from the same weights with their own optimizer (`pkdkit.engine.build_optimizer`) and scheduler
(`build_scheduler`), and take the same batches in the same order; the timed unit is one pass over those
batches, the two interleaved (A B, B A, ...), medians compared: ``ratio`` = pkdkit's images/s / the
reference's (wall time; target >= 0.97), ``cpu_ratio`` the same from this process's CPU time, which other
jobs on a shared machine disturb less.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from timing import TrainStep, summary, time_interleaved

from pkdkit.engine import TrainConfig, build_optimizer, build_scheduler

TARGET = 0.97


class ReferenceStep:
    """One step of torchvision's ``train_one_epoch`` loop body on `model` (see the module docstring)."""

    def __init__(self, model: nn.Module, train: TrainConfig, device: torch.device, total_iters: int = 1000):
        self.model, self.train, self.device = model, train, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, train)
        self.scheduler = build_scheduler(self.optimizer, total_iters, train)
        self.amp = train.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type) if self.amp else None
        self.images: list[torch.Tensor] = []
        self.targets: list[dict] = []
        self.logged: dict[str, float] = {}

    def __call__(self) -> None:
        images = [im.to(self.device) for im in self.images]
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in self.targets]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss_dict = self.model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"reference loop: loss is {loss_value}")
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(losses).backward()
            if self.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses.backward()
            if self.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        # the MetricLogger's update: every loss term and the learning rate read on the host
        self.logged = {"loss": loss_value, **{k: v.item() for k, v in loss_dict.items()},
                       "lr": self.optimizer.param_groups[0]["lr"]}


def bench_reference(model: nn.Module, batches: list[tuple[list[torch.Tensor], list[dict]]], train: TrainConfig,
                    device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Images/s of pkdkit's step and of the reference step, each on its own copy of `model` (weights as
    given), over `batches` (already loaded, so that loading costs neither), interleaved; see the module
    docstring."""
    steps = {"pkdkit": TrainStep(copy.deepcopy(model).to(device).train(), [], [], train, device),
             "reference": ReferenceStep(copy.deepcopy(model).to(device).train(), train, device)}

    cpu: dict[str, list[float]] = {name: [] for name in steps}  # this process's CPU seconds of each pass

    def one_pass(name: str) -> Any:
        def run() -> None:
            tic = time.process_time()
            for images, targets in batches:
                steps[name].images, steps[name].targets = images, targets
                steps[name]()
            cpu[name].append(time.process_time() - tic)
        return run

    times = time_interleaved({name: one_pass(name) for name in steps}, warmup, repeats, device)
    n_images = sum(len(images) for images, _ in batches)
    rate = {name: n_images / statistics.median(t) for name, t in times.items()}
    cpu_median = {name: statistics.median(c[warmup:]) for name, c in cpu.items()}
    return {**{name: {**summary(t), "images_per_s": rate[name]} for name, t in times.items()},
            "ratio": rate["pkdkit"] / rate["reference"], "cpu_ratio": cpu_median["reference"] / cpu_median["pkdkit"],
            "target": TARGET, "batches": len(batches),
            "batch_size": train.batch_size, "images_per_pass": n_images, "device": str(device),
            "grad_clip": train.grad_clip, "amp": steps["reference"].amp,
            "final_loss": {"pkdkit": steps["pkdkit"].last_loss, "reference": steps["reference"].logged["loss"]}}
