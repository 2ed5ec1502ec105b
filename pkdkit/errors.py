"""pkdkit's own exceptions share one base, so the command line can print them as one clear message.

Each module keeps the error it raises (`DataError` in `data`, `CheckpointError` in `models`, `PlanError` in
`plan`, ...); they all derive from `PkdkitError`. Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class PkdkitError(Exception):
    """Bad input or a refused operation; the message says what was expected, what was found, and where."""


class ConfigError(PkdkitError, ValueError):
    """A setting of the wrong type or out of range (training settings, detector spec, command-line values)."""


class RunMismatchError(PkdkitError, RuntimeError):
    """A run folder holds a run made with other settings; resuming or reusing it would mix the two."""


def reason(e: BaseException) -> str:
    """An exception as the text after "cannot read X: ": its message, or its type where the message is empty
    or a bare value (``KeyError: 5``, ``EOFError``), so an error message never ends in nothing or a number."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    if isinstance(e, KeyError) or text.lstrip("-").replace(".", "", 1).isdigit():
        return f"{type(e).__name__}: {text}"
    return text
