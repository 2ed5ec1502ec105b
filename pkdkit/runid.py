"""What makes two runs the same run: the one rule behind every resume, reuse and "already finished" shortcut.

A run is identified by everything in its recorded settings (the detector spec, the training settings, the
data and its content fingerprints, the initialisation, a plan's stages, the notebooks' parameters) except
the settings named here, in three categories:

- `SAME_WEIGHTS`: how fast a run goes and when it saves, never what it computes: loader worker processes
  (`num_workers`, also "auto"), pinned memory, persistent workers, prefetch, the checkpoint interval. Every
  random draw of loading and augmentation comes from a generator seeded by (seed, epoch, image index)
  (`pkdkit.data.ItemKey`) and a model's own draws from one seeded by (seed, step) (`pkdkit.engine.step_seed`),
  so the weights are bit-identical whatever these are (tests/test_loader.py);
- `MAY_CHANGE_NUMERICS`: where a run is computed, which may change its numbers but not what it is: the device
  (another kernel, another summation order), AMP (float16 autocast on CUDA), channels-last (other convolution
  kernels on CUDA) and `gpus`, the number of training processes. `gpus` changes more than round-off: under DDP
  each process trains `batch_size` images per step, so the world size multiplies the effective batch and divides
  the steps per epoch; it is here rather than in what identifies a run because it is a property of the
  machine a session gets (the notebooks move a run between a laptop and a GPU server, `workflow.RunSettings`),
  and a longer run resumed on more GPUs is still that run. A resume and a stage reuse (`plan.reuse_stages`,
  `engine.finished_detector`) accept a change of these, and each record keeps where its run was trained under
  `RAN_ON` (`engine.ran_on`: device name, torch version, threads, AMP, channels-last, world size), so a reader
  can tell runs computed elsewhere apart;
- `DISPLAY`: what is shown, or where it is written (progress, figure and report paths, the image looked at).

`check_same_run(saved, now, ...)` compares two recorded settings (nested dicts, compared as JSON by
`pkdkit.config.config_diff`) up to these and raises `RunMismatchError` naming each differing setting and
what to do. Training (`engine`), plans (`plan`), the run settings of notebook 1 (`workflow.save_settings`),
the notebooks' parameters (`notebooks`) and the torchrun path (`launch`) all use it, so a setting is free
to change in all of them or in none.

This is its own small module rather than part of `pkdkit.config`: `config` checks values against types
(a mechanism every configuration dataclass uses), while this is a policy on which settings matter, one
level above it.
"""
from __future__ import annotations

from typing import Any

from pkdkit.config import config_diff
from pkdkit.errors import RunMismatchError

# How fast a run goes and when it saves: the weights are bit-identical whatever these are.
SAME_WEIGHTS = frozenset({"num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "checkpoint_every"})
# Where a run is computed: may change its numbers, not what it is; recorded under RAN_ON.
MAY_CHANGE_NUMERICS = frozenset({"device", "amp", "channels_last", "gpus"})
# The record of where a run was trained (`pkdkit.engine.ran_on`): a top-level key of each detector and stage record.
RAN_ON = "ran_on"
# How a run is computed: may change when a run is resumed or reused.
HOW_COMPUTED = SAME_WEIGHTS | MAY_CHANGE_NUMERICS | {RAN_ON}
# What is shown or where it goes: never part of what a run is.
DISPLAY = frozenset({"progress", "run_dir", "figures_dir", "report_metrics", "image_index", "mode", "launch_app",
                     "fiftyone_dataset", "iou", "log_every"})
# The settings that do not identify a run (a key is matched by its last part: "train.device" is "device").
NOT_IDENTITY = HOW_COMPUTED | DISPLAY


def identity(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without its top-level keys that do not identify a run (what a run folder records)."""
    return {k: v for k, v in settings.items() if k not in NOT_IDENTITY}


def run_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings identifying a run that differ between `saved` and `now`, as ``"train.lr: 0.001 -> 0.1"``
    (the `RAN_ON` record, a dict at the top level, left out whole)."""
    return config_diff(*({k: v for k, v in d.items() if k != RAN_ON} for d in (saved, now)), ignore=NOT_IDENTITY)


def mismatch(diff: list[str], what: str, todo: str) -> RunMismatchError:
    """The error refusing a run folder, on one line: ``"<what> (changed: <setting>: <saved> -> <now>; ...);
    <todo>"``."""
    return RunMismatchError(f"{what} (changed: {'; '.join(diff)}); {todo}")


def check_same_run(saved: dict[str, Any], now: dict[str, Any], what: str, todo: str) -> None:
    """Refuse to resume or reuse a run recorded with `saved` settings for a run of `now` settings, up to the
    settings that do not identify a run; RunMismatchError says `what` holds the other run, each differing
    setting, and `todo` (what to do instead)."""
    diff = run_diff(saved, now)
    if diff:
        raise mismatch(diff, what, todo)
