"""Files a run writes: atomic writes, links to another run's files, and the run-folder lock.

Every checkpoint, metrics JSON and plan goes through `atomic_write`, so a crash or a kill never leaves a
half-written file in place of a good one; the temp file a killed write leaves behind is removed by the next
write of the same file. `run_lock(folder)` keeps two runs from writing into one folder at the same time (the
locks a process holds are in one `FolderLocks`, `LOCKS`).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import socket
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from pkdkit.errors import ConfigError, PkdkitError

_HOST = socket.gethostname().replace(".", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove `folder/.<name>.<host>-<pid>.*.tmp` files of dead processes on this host (killed atomic writes)."""
    removed = []
    for tmp in Path(folder).glob(f"{glob.escape(f'.{name}.{_HOST}-')}*.tmp"):
        try:
            pid = int(tmp.name[len(f".{name}.{_HOST}-"):].split(".")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _temp_path(path: Path) -> Path:
    """The temp file a write of `path` goes through (`remove_stale_temp_files` knows its name)."""
    return path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"


class WriteError(PkdkitError, OSError):
    """A file could not be written (no space left, a read-only folder, ...); the message names the file and the
    cause, and the file keeps its previous content."""


class _RecordingFile:
    """The temp file as `write` sees it, remembering the first OSError of a write: torch.save reports a failed
    write (a full disk) as a RuntimeError "unexpected pos" that names neither the file nor the cause."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_failure(path: Path, error: OSError) -> WriteError:
    """The one-line error of a failed write of `path`: "no space left on device" (ENOSPC, EDQUOT), "file too
    large" (EFBIG), else the system's own words (a read-only folder: "Permission denied")."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = f"no space left on device in {path.parent}; free some space and run again"
    elif error.errno in (errno.EEXIST, errno.ENOTDIR):
        cause = "a part of its folder's path is a file, not a folder"
    elif error.errno == errno.EFBIG:
        cause = "file too large (the file system's or the process's file size limit, ulimit -f)"
    else:
        cause = error.strerror or str(error)
    return WriteError(f"cannot write {path}: {cause} (the file keeps its previous content, if it had one)")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temp file in `path`'s folder, fsync it, then `os.replace` it onto `path`.

    On any error the temp file is removed and `path` keeps its old content; an error of the file system (no
    space left, a read-only folder) becomes a `WriteError` naming `path` and the cause. Temp files left by
    writers that were killed (SIGKILL, power loss) are removed by the next write of the same name. The file
    gets the user's normal permissions (0666 minus the umask), like a file opened with `open(path, "w")`.
    """
    path = Path(path)
    tmp = None
    recorder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent, path.name)
        tmp = _temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        error = e if isinstance(e, OSError) else recorder.error if recorder is not None else None
        if error is not None and not isinstance(e, WriteError):
            raise write_failure(path, error) from e
        raise
    return path


def check_name(name: Any, what: str) -> str:
    """`name` if it can be one file or folder name inside a run folder (a stage, a plan, a teacher, a model):
    a non-empty string without path separators, not "." or "..", so that nothing is written outside the run
    folder. Else ConfigError naming `what`."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{what} {name!r} is not a valid name: it becomes a folder or file name, so it must be "
                          f"one non-empty path component (no '/', no '\\', not '.' or '..')")
    return name


def write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """JSON, atomically (values JSON does not know are written with `str`)."""
    data = json.dumps(obj, indent=indent, default=str).encode()
    return atomic_write(path, lambda f: f.write(data))


def write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def link_files(source: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Put each file of folder `source` into folder `target` as a hard link (a copy where the file system has
    none), replacing a file of the same name atomically. Every later write of these files goes through
    `atomic_write`, which replaces the link rather than writing through it, so the two folders stay independent."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    linked = []
    for src in sorted(p for p in Path(source).iterdir() if p.is_file() and not p.name.startswith(".")):
        tmp = _temp_path(target / src.name)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, target / src.name)
        linked.append(target / src.name)
    return linked


# ----------------------------------------------------------------------------------------------------
# Run-folder lock
LOCK_NAME = ".pkdkit.lock"


class RunLockedError(PkdkitError):
    """Another process is writing into the run folder."""


class FolderLocks:
    """The run-folder locks one process holds: {folder: (file descriptor, depth)}. A lock is re-entrant
    within its process (a training inside a locked run); `run_lock` uses the process's one table, `LOCKS`."""

    def __init__(self) -> None:
        self._held: dict[Path, tuple[int, int]] = {}

    def held(self) -> list[Path]:
        """The folders whose lock is held now."""
        return list(self._held)

    @contextmanager
    def hold(self, folder: str | os.PathLike) -> Iterator[Path]:
        """`run_lock`: hold `folder`'s lock for the block (taken once, counted when asked again)."""
        folder = Path(folder).resolve()
        if folder in self._held:
            fd, depth = self._held[folder]
            self._held[folder] = (fd, depth + 1)
            try:
                yield folder
            finally:
                fd, depth = self._held[folder]
                self._held[folder] = (fd, depth - 1)
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = _lock_file(folder / LOCK_NAME)
        except OSError as e:
            raise PkdkitError(f"cannot write to the run folder {folder}: {e.strerror or e}") from e
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._held[folder] = (fd, 1)
        try:
            yield folder
        finally:
            fd, depth = self._held[folder]
            if depth > 1:
                self._held[folder] = (fd, depth - 1)
            else:
                del self._held[folder]
                (folder / LOCK_NAME).unlink(missing_ok=True)  # before closing: whoever opened it will retry
                os.close(fd)


LOCKS = FolderLocks()


def run_lock(folder: str | os.PathLike) -> AbstractContextManager[Path]:
    """Hold `folder`'s lock for the block: a second process that asks for it fails at once with
    `RunLockedError` naming the folder and the process that holds it.

    The lock is an advisory `flock` on `folder/.pkdkit.lock` (removed when the block ends), released by the
    kernel when the holder exits, so a killed run never leaves a folder locked. Re-entrant within one process (a training inside a locked run).
    Checks first that the folder can be created and written to, so an unwritable output fails before any work.
    """
    return LOCKS.hold(folder)


def _lock_file(path: Path) -> int:
    """Open and flock `path`; the lock counts only if `path` is still that file (not unlinked by its holder
    meanwhile), else retry. Raises RunLockedError naming the holder when another process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"{path.parent} is in use by another run ({holder}); wait for it to finish, "
                                     f"or use another output folder") from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)
