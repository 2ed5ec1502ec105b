"""What makes two runs the same run: the one rule behind every resume, reuse and "already finished" shortcut.

A run is identified by everything in its recorded settings (the detector spec, the training settings, the
data and its content fingerprints, the initialisation, a plan's stages, the notebooks' parameters) except
the settings named here, in two categories:

- `HOW_COMPUTED`: how a run is computed, not what it computes (device, GPUs, loader workers, memory layout,
  checkpoint interval): a resumed run, or a finished run reused, may change them;
- `DISPLAY`: what is shown, or where it is written (progress, figure and report paths, the image looked at).

`check_same_run(saved, now, ...)` compares two recorded settings (nested dicts, compared as JSON by
`pkdkit.config.config_diff`) up to these and raises `RunMismatchError` naming each differing setting and
what to do. Training (`engine`), plans (`plan`), the run settings of notebook 1 (`workflow.save_settings`),
the notebooks' parameters (`notebooks`) and the torchrun path (`launch`) all use it, so a setting is free
to change in all of them or in none.

This is its own small module rather than part of `pkdkit.config`: `config` checks values against types
(a mechanism every configuration dataclass uses), while this is a policy on which settings matter, one
level above it, with its own categories to grow (e.g. settings that may change the numerics but not the
weights' meaning).
"""
from __future__ import annotations

from typing import Any

from pkdkit.config import config_diff
from pkdkit.errors import RunMismatchError

# How a run is computed: may change when a run is resumed or reused.
HOW_COMPUTED = frozenset({"device", "gpus", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
                          "channels_last", "checkpoint_every"})
# What is shown or where it goes: never part of what a run is.
DISPLAY = frozenset({"progress", "run_dir", "figures_dir", "report_metrics", "image_index", "mode", "launch_app",
                     "fiftyone_dataset", "iou", "log_every"})
# The settings that do not identify a run (a key is matched by its last part: "train.device" is "device").
NOT_IDENTITY = HOW_COMPUTED | DISPLAY


def identity(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without its top-level keys that do not identify a run (what a run folder records)."""
    return {k: v for k, v in settings.items() if k not in NOT_IDENTITY}


def run_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings identifying a run that differ between `saved` and `now`, as ``"train.lr: 0.001 -> 0.1"``."""
    return config_diff(saved, now, ignore=NOT_IDENTITY)


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
