"""Alarms during a run: the signs that a days-long distillation run is going wrong, each with its likely cause and
what to try, as pure functions over the per-epoch statistics the engine records (`history.json`'s epoch records).

The questions users of distillation code ask most ("AP stays 0", "the loss does not fall") have a few usual
causes: a teacher that did not load or does not detect on the data, a class mismatch, a distillation term that
swamps the detection loss, one FPN level that carries all of it (or none), a learning rate not scaled to the
batch. The engine checks these rules after every epoch and evaluation (`pkdkit.engine.train`), prints each
alarm as a progress line, writes it to TensorBoard as text and keeps it in the epoch's record (``"alarms"``)
and in the run's evaluation record.

`distill_ratio` and `level_shares` are the two measures these rules (and a check before a run) read from a
dict of loss values ``{name: value}``, where names starting with ``distill`` are the distillation levels' terms
and ``"loss"`` the sum of all terms.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

RATIO_GROWTH = 10.0  # the distillation / detection ratio grown this many times from its start
CLIPPED_MOST = 0.5  # gradients clipped on more than this fraction of an epoch's steps
LR_ADVICE = "the linear scaling rule: lr 0.01 at batch 16, scaled with the batch"


@dataclass(frozen=True)
class Alarm:
    """One alarm: `name` (a short key: ap_zero, ratio_grown, clipped, level_zero), `message` (what was seen, the
    likely cause and what to try) and `epoch` (1-based) where it was raised."""

    name: str
    message: str
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distillation_part(losses: Mapping[str, float]) -> tuple[float, float]:
    """(detection, distillation) of loss values: the sum of the ``distill*`` terms, and the rest (``loss`` minus
    them, or the sum of the other terms when there is no ``loss``)."""
    kd = sum(float(v) for k, v in losses.items() if k.startswith("distill"))
    det = float(losses["loss"]) - kd if "loss" in losses else sum(float(v) for k, v in losses.items()
                                                                   if not k.startswith("distill"))
    return det, kd


def distill_ratio(losses: Mapping[str, float]) -> float | None:
    """The distillation / detection ratio of loss values; None without distillation terms or a positive
    detection loss."""
    det, kd = distillation_part(losses)
    has_kd = any(k.startswith("distill") for k in losses)
    return kd / det if has_kd and det > 0 else None


def level_shares(terms: Mapping[str, float]) -> dict[str, float]:
    """Each distillation level's share of the distillation term, {name: fraction} (summing to 1), from the
    levels' terms alone (e.g. the ``distill_*`` loss values); empty when they sum to 0."""
    kd = sum(float(v) for v in terms.values())
    return {k: float(v) / kd for k, v in terms.items()} if kd > 0 else {}


def ap_alarm(ap: float, epoch: int, epochs: int) -> Alarm | None:
    """AP still 0 at an evaluation after `epoch` of `epochs`, past half the schedule."""
    if ap > 0 or epoch <= epochs / 2:
        return None
    return Alarm("ap_zero", f"AP is still 0 at epoch {epoch}/{epochs}, past half the schedule: likely (distilling) a "
                            "teacher that did not load or does not detect on this data, classes that do not match the "
                            "data's, a learning rate not scaled to the batch, or too few epochs for this data; try "
                            "`pkdkit doctor` on the plan, check the teachers' AP on this data, the lr against "
                            f"{LR_ADVICE}, and a longer schedule", epoch)


def ratio_alarm(start: float | None, now: float | None, epoch: int) -> Alarm | None:
    """The distillation / detection ratio `now` grown more than `RATIO_GROWTH` times from its `start`."""
    if start is None or now is None or start <= 0 or now <= RATIO_GROWTH * start:
        return None
    return Alarm("ratio_grown", f"the distillation / detection ratio grew {now / start:.0f}x from its start "
                                f"({start:.3g} -> {now:.3g}) by epoch {epoch}: the distillation term swamps the "
                                "detection loss (a distillation weight too high for this teacher); try a lower "
                                "loss_weight, or loss_weight: auto with a smaller loss_ratio", epoch)


def clipping_alarm(fraction: float | None, grad_clip: float | None, epoch: int) -> Alarm | None:
    """Gradients clipped on more than `CLIPPED_MOST` of the steps of an epoch."""
    if fraction is None or not grad_clip or fraction <= CLIPPED_MOST:
        return None
    return Alarm("clipped", f"gradients were clipped on {fraction:.0%} of the steps of epoch {epoch} (grad_clip "
                            f"{grad_clip:g}): most updates are cut short, usually a learning rate too high for the "
                            f"batch or a loss term too large; try a lower lr ({LR_ADVICE}) or loss_weight, or a "
                            "higher grad_clip", epoch)


def zero_level_alarms(means: Mapping[str, float], epoch: int) -> list[Alarm]:
    """Each distillation level whose term was 0 over a whole epoch (its epoch mean, `means`) while the
    distillation term as a whole was not (a weight of 0, distillation switched off, raises none)."""
    if not level_shares({k: v for k, v in means.items() if k.startswith("distill")}):
        return []
    return [Alarm("level_zero", f"the distillation term of {k} was 0 for all of epoch {epoch} while the other "
                                "levels' were not: that level teaches the student nothing (a feature map too small "
                                "for the loss's masks or the boxes, or a teacher map that is empty there); try "
                                "leaving it out (`levels:` of the stage) or check the teacher's features there", epoch)
            for k, v in means.items() if k.startswith("distill") and v == 0]


def epoch_alarms(history: Sequence[Mapping[str, Any]], grad_clip: float | None) -> list[Alarm]:
    """The alarms of the last epoch record of `history` (the engine's epoch records: loss means, and its
    ``"monitor"`` statistics: ``kd_ratio``, the first epoch's ``kd_ratio_start``, ``clipped_fraction``); the
    ratio's start is the run's first logging interval (or its first epoch)."""
    if not history:
        return []
    last, first = history[-1], history[0]
    epoch = int(last["epoch"])
    monitor, start = last.get("monitor", {}), first.get("monitor", {})
    means = {k: v for k, v in last.items() if k.startswith("distill") or k == "loss"}
    found = [ratio_alarm(start.get("kd_ratio_start", start.get("kd_ratio")), monitor.get("kd_ratio"), epoch),
             clipping_alarm(monitor.get("clipped_fraction"), grad_clip, epoch)]
    return [a for a in found if a is not None] + zero_level_alarms(means, epoch)
