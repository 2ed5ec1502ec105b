"""Training steps as `torchrun` subprocesses: how the notebooks train on several GPUs (`gpus > 1`).

A notebook kernel is one process, and DDP needs one process per GPU. So a training step (a teacher or the
baseline student: `train_detector`; a distillation plan: `run_plan`) is written as a small JSON job and run
as ``torchrun --standalone --nproc_per_node N -m pkdkit.launch job.json``. Its output (progress bars
included) streams into the notebook as it comes; a failing rank makes `LaunchError` carry the subprocess's
exit code and the end of its output (the traceback). Results are read back from the files the step writes
(`eval.json`, `summary.json`), exactly as a single-process run writes them.

Across several machines, start torchrun on each node yourself (see the README), e.g. on every node
``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id pkd --rdzv_backend c10d --rdzv_endpoint node0:29400 -m pkdkit.cli distill plan.yaml``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from pkdkit.engine import TrainConfig, detector_files, detector_run, finished_detector, train_detector
from pkdkit.errors import ConfigError, PkdkitError
from pkdkit.evaluate import EvalRecord
from pkdkit.files import write_json
from pkdkit.models import DetectorSpec
from pkdkit.data import DataConfig
from pkdkit.plan import Plan, run_plan


class LaunchError(PkdkitError, RuntimeError):
    """A torchrun subprocess failed; the message holds its command, exit code and last output lines."""


FAILED = "[pkdkit.launch] failed:"


def torchrun(job: dict[str, Any], job_file: str | os.PathLike, nproc: int, *, tail: int = 60) -> None:
    """Write `job` to `job_file` and run it under ``torchrun --nproc_per_node nproc``, streaming its output
    to this process's stdout. Raises LaunchError with the last `tail` lines when it exits non-zero."""
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    job_file = write_json(job, job_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "pkdkit.launch", str(job_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"[pkdkit] {' '.join(cmd[2:])}", flush=True)
    lines: deque[str] = deque(maxlen=tail)
    failures: list[str] = []  # "ValueError: ..." as each failing rank reports it
    partial = ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        assert proc.stdout is not None
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
                text = chunk.decode(errors="replace")
                sys.stdout.write(text)  # \r-updated progress bars redraw in place in a notebook
                sys.stdout.flush()
                partial += text
                *done, partial = partial.replace("\r", "\n").split("\n")
                lines.extend(line for line in done if line.strip())
                failures.extend(line.split(FAILED, 1)[1].strip() for line in done if FAILED in line)
        except BaseException:  # an interrupted notebook cell stops the ranks too (torchrun forwards SIGTERM)
            proc.terminate()
            proc.wait(timeout=60)
            raise
        code = proc.wait()
    if partial.strip():
        lines.append(partial)
    if code != 0:
        cause = f": {failures[0]}" if failures else ""
        raise LaunchError(f"{' '.join(cmd[2:])} failed with exit code {code}{cause}"
                          "\n--- last lines of its output ---\n" + "\n".join(lines))


def train_detector_distributed(spec: DetectorSpec, data: DataConfig, cfg: TrainConfig, out_dir: str | os.PathLike,
                               nproc: int, *, config: dict[str, Any] | None = None) -> EvalRecord:
    """`pkdkit.engine.train_detector` on `nproc` processes; returns the evaluation record (`eval.json`).
    A finished run in `out_dir` is returned without starting torchrun only when it was made with these
    settings, as `train_detector` does (`pkdkit.engine.finished_detector`): else RunMismatchError, before any
    process starts."""
    out = Path(out_dir).resolve()
    model_file, record_file = detector_files(out)
    if model_file.exists() and record_file.exists():
        _, full = detector_run(spec, data.train_dataset(), data.val_dataset(), cfg, config)
        return finished_detector(out, full)
    job = {"step": "train", "spec": spec.to_dict(), "data": asdict(data), "train": cfg.to_dict(),
           "out": str(out), "config": config or {}}
    torchrun(job, out / "launch.json", nproc)
    return EvalRecord.read(record_file)


def run_plan_distributed(plan: Plan, nproc: int, *, progress: bool = True) -> dict[str, Any]:
    """`pkdkit.plan.run_plan` on `nproc` processes; returns the plan's summary (`summary.json`)."""
    out = Path(plan.out_dir)
    torchrun({"step": "plan", "plan": plan.to_dict(), "progress": progress}, out / "launch.json", nproc)
    return json.loads(plan.summary_file.read_text())


def _train_step(job: dict[str, Any]) -> None:
    data = DataConfig(**job["data"])
    train_detector(DetectorSpec.from_dict(job["spec"]), data.train_dataset(), data.val_dataset(),
                   TrainConfig.from_dict(job["train"]), job["out"], config=job["config"])


def _plan_step(job: dict[str, Any]) -> None:
    run_plan(Plan.from_dict(job["plan"]), progress=job.get("progress", True))


STEPS: dict[str, Callable[[dict[str, Any]], None]] = {"train": _train_step, "plan": _plan_step}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of each torchrun rank: ``python -m pkdkit.launch job.json``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m pkdkit.launch JOB.json (written by pkdkit.launch.torchrun)")
    job = json.loads(Path(args[0]).read_text())
    if job.get("step") not in STEPS:
        raise SystemExit(f"{args[0]}: unknown step {job.get('step')!r}; expected one of {sorted(STEPS)}")
    try:
        STEPS[job["step"]](job)
    except Exception as e:  # name the error on one line the launching process finds, then fail as usual
        print(f"{FAILED} {type(e).__name__}: {e}", flush=True)
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
