"""Atomic file writes: every checkpoint, metrics JSON and plan goes through `atomic_write`, so a crash or a
kill never leaves a half-written file in place of a good one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temp file in `path`'s folder, fsync it, then `os.replace` it onto `path`.
    On any error the temp file is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """JSON, atomically (values JSON does not know are written with `str`)."""
    data = json.dumps(obj, indent=indent, default=str).encode()
    return atomic_write(path, lambda f: f.write(data))


def write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
