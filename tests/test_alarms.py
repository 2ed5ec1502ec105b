"""Alarms during a run (`pkdkit.alarms`): each rule fires on statistics constructed to raise it, and not on
healthy ones (a real run raising none: tests/test_engine.py and test_distill.py's plan)."""
from __future__ import annotations

import pytest

from pkdkit.alarms import (ap_alarm, clipping_alarm, distill_ratio, epoch_alarms, level_shares, ratio_alarm,
                           zero_level_alarms)

HEALTHY = {"classification": 1.0, "bbox_regression": 0.5, "distill_p3": 0.3, "distill_p4": 0.2, "loss": 2.0}


def _epoch(epoch: int, ratio: float, clipped: float = 0.1, **losses: float) -> dict:
    return {"epoch": epoch, **(losses or HEALTHY), "monitor": {"kd_ratio": ratio, "clipped_fraction": clipped}}


def test_ratio_and_level_shares_read_the_distillation_terms():
    assert distill_ratio(HEALTHY) == pytest.approx(0.5 / 1.5)
    assert distill_ratio({"classification": 1.0, "loss": 1.0}) is None  # no distillation
    assert level_shares({k: v for k, v in HEALTHY.items() if k.startswith("distill")}) == {"distill_p3": pytest.approx(0.6), "distill_p4": pytest.approx(0.4)}
    assert level_shares({"distill_p3": 0.0, "distill_p4": 0.0}) == {}


def test_ap_still_zero_past_half_the_schedule():
    alarm = ap_alarm(0.0, 7, 12)
    assert alarm.name == "ap_zero" and "epoch 7/12" in alarm.message and "teacher" in alarm.message
    assert ap_alarm(0.0, 6, 12) is None and ap_alarm(0.01, 12, 12) is None


def test_ratio_grown_more_than_ten_times_from_its_start():
    alarm = ratio_alarm(0.5, 6.0, 3)
    assert alarm.name == "ratio_grown" and "12x" in alarm.message and "loss_weight" in alarm.message
    assert ratio_alarm(0.5, 4.9, 3) is None and ratio_alarm(None, 6.0, 3) is None
    # from the run's first record: its first logging interval's ratio
    history = [_epoch(1, 0.6) | {"monitor": {"kd_ratio_start": 0.1, "kd_ratio": 0.6}}, _epoch(2, 1.2)]
    assert [a.name for a in epoch_alarms(history, grad_clip=None)] == ["ratio_grown"]


def test_gradients_clipped_on_most_steps_of_an_epoch():
    alarm = clipping_alarm(0.8, 35.0, 2)
    assert alarm.name == "clipped" and "80%" in alarm.message and "lr" in alarm.message
    assert clipping_alarm(0.5, 35.0, 2) is None and clipping_alarm(0.9, None, 2) is None
    assert [a.name for a in epoch_alarms([_epoch(1, 0.5, clipped=0.9)], grad_clip=35.0)] == ["clipped"]


def test_a_distillation_level_at_zero_for_an_epoch():
    means = {**HEALTHY, "distill_p7": 0.0}
    (alarm,) = zero_level_alarms(means, 4)
    assert alarm.name == "level_zero" and "distill_p7" in alarm.message and "levels" in alarm.message
    assert zero_level_alarms({"distill_p3": 0.0, "distill_p4": 0.0, "loss": 1.0}, 4) == []  # weight 0: off
    assert [a.name for a in epoch_alarms([_epoch(1, 0.5, **means)], grad_clip=None)] == ["level_zero"]


def test_a_healthy_history_raises_none():
    assert epoch_alarms([_epoch(1, 0.5), _epoch(2, 0.8), _epoch(3, 1.5)], grad_clip=35.0) == []
    assert epoch_alarms([], grad_clip=35.0) == []


def test_alarms_are_progress_lines_and_tensorboard_text(tmp_path, capsys):
    from conftest import tb_texts

    from pkdkit.engine import report_alarms
    from pkdkit.board import open_writer

    alarms = [ap_alarm(0.0, 12, 12), clipping_alarm(0.9, 35.0, 12)]
    with open_writer(tmp_path) as writer:
        report_alarms(alarms, writer, 120, True, "plan stage 2/3 r50")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[pkdkit] plan stage 2/3 r50 ALARM ap_zero",
                                                      "[pkdkit] plan stage 2/3 r50 ALARM clipped"]
    assert [(step, text.split("**")[1]) for step, text in tb_texts(tmp_path, "alarms")] == [(120, "ap_zero"),
                                                                                          (120, "clipped")]
