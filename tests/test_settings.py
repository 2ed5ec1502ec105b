"""Run settings chosen once (notebook 01) and read by every later notebook from the run directory."""
from __future__ import annotations

import json

import pytest

from pkdkit import workflow
from pkdkit.errors import RunMismatchError
from pkdkit.rundir import RunDir


def test_settings_round_trip_through_the_run_directory(tmp_path):
    settings = workflow.RunSettings(preset="tiny", seed=3, epochs=2, image_size=64)
    workflow.save_settings(tmp_path, settings)
    assert json.loads(RunDir(tmp_path).settings.read_text())["seed"] == 3
    assert workflow.load_settings(tmp_path) == settings


def test_a_changed_setting_is_refused_with_what_differs_and_what_to_do(tmp_path):
    workflow.save_settings(tmp_path, workflow.RunSettings(epochs=2))
    with pytest.raises(RunMismatchError, match=r"epochs: 2 -> 4.*new folder.*or delete"):
        workflow.save_settings(tmp_path, workflow.RunSettings(epochs=4))
    assert workflow.load_settings(tmp_path).epochs == 2  # nothing overwritten
    # how the run is computed may change: the device is recorded, the run kept
    workflow.save_settings(tmp_path, workflow.RunSettings(epochs=2, device="cpu"))
    assert workflow.load_settings(tmp_path).device == "cpu"


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = workflow.save_settings(tmp_path / "run", workflow.RunSettings(data_root="coco"))
    assert saved.data_root == str(tmp_path / "coco") == workflow.load_settings(tmp_path / "run").data_root


def test_a_later_notebook_on_an_empty_run_directory_says_to_run_notebook_01(tmp_path):
    with pytest.raises(workflow.RunNotStartedError, match="run notebook 01 with this run_dir first"):
        workflow.load_settings(tmp_path / "nothing")


def test_open_run_applies_the_image_size_and_makes_the_data_once(tmp_path):
    run = workflow.start_run(tmp_path, workflow.RunSettings(image_size=64))
    assert run.preset.student.min_size == run.preset.student.max_size == 64
    assert run.data.val_dataset().coco.getImgIds()
    stamp = RunDir(tmp_path).data.joinpath("annotations", "instances_val.json").stat().st_mtime_ns
    assert workflow.open_run(tmp_path).settings == run.settings
    assert RunDir(tmp_path).data.joinpath("annotations", "instances_val.json").stat().st_mtime_ns == stamp


def test_one_rule_says_what_identifies_a_run_for_every_record():
    """`pkdkit.runid`: settings that do not change the weights, settings that may change the numerics (and the
    record of where a run was trained) and what is shown may change at any depth of a record; anything else is
    refused with each change, saved -> now, and what to do."""
    from pkdkit.runid import DISPLAY, HOW_COMPUTED, MAY_CHANGE_NUMERICS, RAN_ON, SAME_WEIGHTS, check_same_run, identity

    saved = {"train": {"lr": 0.01, "epochs": 2, "device": "cpu", "num_workers": 0, "amp": True, "progress": True},
             "preset": "tiny", "gpus": 1, "figures_dir": "a",
             RAN_ON: {"device": "cpu", "torch": "2.0", "threads": 2, "world_size": 1}}
    check_same_run(saved, {"train": {"lr": 0.01, "epochs": 2, "device": "cuda", "num_workers": "auto", "amp": False,
                                     "progress": False},
                           "preset": "tiny", "gpus": 8, "figures_dir": "b"}, "x", "y")
    with pytest.raises(RunMismatchError, match=r"^run holds another \(changed: preset: 'tiny' -> 'small'; "
                                               r"train\.epochs: 2 -> 3\); use another folder$"):
        check_same_run(saved, {**saved, "preset": "small", "train": {**saved["train"], "epochs": 3}}, "run holds another",
                       "use another folder")
    assert {"num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "checkpoint_every"} == SAME_WEIGHTS
    assert {"device", "amp", "channels_last", "gpus"} == MAY_CHANGE_NUMERICS
    assert SAME_WEIGHTS | MAY_CHANGE_NUMERICS | {RAN_ON} == HOW_COMPUTED and {"progress", "figures_dir"} <= DISPLAY
    assert identity(saved) == {"train": saved["train"], "preset": "tiny"}


def test_num_workers_auto_is_the_cpus_per_local_process_on_cuda_and_0_on_a_cpu(monkeypatch):
    """`engine.loader_workers`: on CUDA, the CPUs this process may use over the processes on this machine, less
    the training process, at most 8, at least 1; on a CPU none (the training threads use the cores)."""
    import os

    import torch

    from pkdkit.cli import build_parser
    from pkdkit.engine import MAX_AUTO_WORKERS, TrainConfig, loader_workers
    from pkdkit.errors import ConfigError

    cuda = torch.device("cuda")
    assert TrainConfig().num_workers == "auto" and loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3 == loader_workers(3, cuda)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    for local_ranks, workers in (("1", MAX_AUTO_WORKERS), ("4", 7), ("16", 1), ("64", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
        assert loader_workers("auto", cuda) == workers, local_ranks
    for flag, value in (("auto", "auto"), ("4", 4)):  # the command line reads auto or a number
        assert build_parser().parse_args(["train", "--data", "d", "--out", "o", "--num-workers", flag]).num_workers == value
    for bad in ("many", -1):
        with pytest.raises(ConfigError, match="num_workers"):
            TrainConfig(num_workers=bad)
