"""TensorBoard for every run: the event files `pkdkit.engine.train` writes into a run's folder.

Tags (one set for a training run and for each plan stage):

- ``loss/total`` and ``loss/<term>`` (each detection loss term), ``distill/<level>`` (each distillation level's
  term), ``distill/ratio`` (distillation / detection, `pkdkit.alarms.distill_ratio`), ``train/lr``,
  ``train/grad_norm`` (the gradient norm before clipping) and ``train/images_per_s``: at every logging interval
  (`TrainConfig.log_every`), the mean over the interval and over the ranks;
- ``eval/<iou_type>/<stat>``: the 12 COCO stats at each evaluation;
- ``alarms`` (text): each alarm (`pkdkit.alarms`) when raised.

Steps are global: a plan's stage k starts where stage k - 1 ended (`pkdkit.engine.train`'s `step_offset`),
so ``tensorboard --logdir <plan folder>`` reads the stages as one set of curves (one colour per stage), and
``tensorboard --logdir <run folder>`` shows every run under it (teachers, baseline, plans). A resumed run
purges the events past the step it resumes from, so no step appears twice. Only rank 0 writes.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from pkdkit.alarms import Alarm, distill_ratio

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def open_writer(out_dir: str | os.PathLike, purge_step: int | None = None) -> "SummaryWriter":
    """A TensorBoard writer into `out_dir`; events of steps >= `purge_step` written earlier (a run killed after
    its last checkpoint) are dropped when TensorBoard reads the folder."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run starts

    return SummaryWriter(str(out_dir), purge_step=purge_step)


def loss_tag(name: str) -> str:
    """The tag of a loss term: ``loss/total`` for the sum, ``distill/<level>`` for a distillation term
    (``distill_p3`` -> ``distill/p3``), ``loss/<name>`` for a detection term."""
    if name == "loss":
        return "loss/total"
    if name.startswith("distill"):
        return "distill/" + (name[len("distill_"):] if name.startswith("distill_") else name)
    return f"loss/{name}"


def log_training(writer: "SummaryWriter", step: int, losses: Mapping[str, float], *, lr: float,
                 grad_norm: float | None, images_per_s: float) -> None:
    """One logging interval's scalars at global `step`: the loss terms, the distillation ratio (when there is
    distillation), the learning rate, the gradient norm (when measured) and the images per second."""
    for name, value in losses.items():
        writer.add_scalar(loss_tag(name), value, step)
    ratio = distill_ratio(losses)
    if ratio is not None:
        writer.add_scalar("distill/ratio", ratio, step)
    writer.add_scalar("train/lr", lr, step)
    if grad_norm is not None:
        writer.add_scalar("train/grad_norm", grad_norm, step)
    writer.add_scalar("train/images_per_s", images_per_s, step)


def log_evaluation(writer: "SummaryWriter", record: Mapping[str, Any], step: int) -> None:
    """An evaluation record's COCO stats (`pkdkit.evaluate.EvalRecord`: 12 per IoU type) at global `step`."""
    for iou_type, metrics in record.get("metrics", {}).items():
        for name, value in metrics["stats"].items():
            writer.add_scalar(f"eval/{iou_type}/{name}", value, step)


def log_alarms(writer: "SummaryWriter", alarms: Iterable[Alarm], step: int) -> None:
    """Alarms as TensorBoard text (the Text tab) at global `step`."""
    for alarm in alarms:
        writer.add_text("alarms", f"**{alarm.name}** (epoch {alarm.epoch}): {alarm.message}", step)
