"""Several command lines at once: on this machine, or as SLURM jobs through submitit; how
`pkdkit notebooks experiment --jobs N` / `--launcher slurm` spread its seeds.

A `Job` is one command line (each seed's `pkdkit notebooks run ...`), the environment it adds and a log file
that gets its stdout and stderr (appended: a requeued job adds to it), so parallel jobs never interleave on the
terminal; one progress line (`pkdkit.progress.step`) says when each ends. `run_jobs` runs them all and waits:

- launcher "pool": up to N at once here, each in a subprocess; with `gpus` (the visible GPUs) a job gets one of
  them as its only `CUDA_VISIBLE_DEVICES`, the one of its slot (slot k of N uses GPU k mod len(gpus)), so no two
  running jobs share a GPU while N <= len(gpus).
- launcher "slurm": each job submitted with `sbatch` by submitit (`Slurm`: partition, GPUs, time limit, account),
  its logs in `folder`. The submitted callable is a `submitit.helpers.Checkpointable`: when SLURM preempts a job or
  its time limit is near, submitit calls `checkpoint()`, which returns the same call, and requeues the job; the
  command then runs again in the same run folder, where training resumes exactly from its last checkpoint.
- launcher "local": the same submission through submitit's local executor (all jobs at once on this machine, one
  GPU each in turn, requeued the same way): the cluster path without a cluster.

A failed job does not stop the others; when all have ended, `JobsFailed` names each failed one and its log.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any, Sequence

import submitit

from pkdkit.errors import ConfigError, PkdkitError
from pkdkit.progress import step

LAUNCHERS = ("pool", "slurm", "local")
STOP_GRACE_S = 60  # a stopped job's command gets this long to stop its notebook kernel before it is killed


class JobsFailed(PkdkitError, RuntimeError):
    """Some jobs failed (the others ran to their end); the message names each and its log."""


@dataclass
class Job:
    """One command line to run: `argv`, with `env` added to the environment, its output appended to `log`."""
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Slurm:
    """The SLURM resources of each job (`--slurm-*` options): partition, GPUs, time limit (minutes; a job that
    reaches it is requeued and resumes, up to submitit's 3 timeouts), account, CPUs per task."""
    partition: str | None = None
    gpus: int = 1
    time_min: int = 240
    account: str | None = None
    cpus: int | None = None


def run_command(job: Job, running: set[subprocess.Popen] | None = None,
                ignore: tuple[signal.Signals, ...] = ()) -> None:
    """Run `job` to its end, its output appended to its log after a line with its command; raises `JobsFailed`
    on a non-zero exit status.

    If this is interrupted (Ctrl-C, or submitit's requeue ending the job), the command gets SIGTERM, on which
    `pkdkit` stops its notebook kernel and exits, and is killed after `STOP_GRACE_S`. `running` (if given) holds
    the process while it runs; the command starts with the signals `ignore` ignored."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        print(f"$ {shlex.join(job.argv)}", file=log, flush=True)
        ignored = (lambda: [signal.signal(s, signal.SIG_IGN) for s in ignore]) if ignore else None
        proc = subprocess.Popen(job.argv, env={**os.environ, **job.env}, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=ignored)
        if running is not None:
            running.add(proc)
        try:
            code = proc.wait()
        except BaseException:
            stop(proc)
            raise
        finally:
            if running is not None:
                running.discard(proc)
    if code:
        raise JobsFailed(f"{job.name} failed (exit status {code}); its log: {job.log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after `STOP_GRACE_S`."""
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SubmittedJob(submitit.helpers.Checkpointable):
    """What submitit runs on a node: `run_command(job)`. On preemption or near its time limit, submitit calls
    `checkpoint()` and requeues the returned call: the same command, which resumes from the checkpoints its
    run folder holds (the training resume is exact). SLURM sends the requeue signal (USR2) to every process of
    the job; the command ignores it, so that only this process answers it (and then stops the command)."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self) -> str:
        run_command(self.job, ignore=(signal.SIGUSR2,))
        return self.job.name

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def run_jobs(jobs: Sequence[Job], *, launcher: str = "pool", at_once: int = 1, gpus: Sequence[str] = (),
             folder: str | os.PathLike | None = None, slurm: Slurm | None = None) -> None:
    """Run every job and wait for all (see the module's docstring); one progress line per job as it ends.
    at_once: the pool's number of jobs at a time; gpus: the visible GPUs ("0", "1", ... or UUIDs) handed out,
    one per job (pool and local); folder: submitit's logs and pickles (slurm and local)."""
    t0 = time.monotonic()
    if launcher == "pool":
        failed = _run_pool(jobs, at_once, gpus, t0)
    elif launcher in ("slurm", "local"):
        failed = _run_submitit(jobs, launcher, Path(folder or "submitit"), slurm or Slurm(), gpus, t0)
    else:
        raise ValueError(f"launcher {launcher!r}: one of {LAUNCHERS}")
    if failed:
        raise JobsFailed(f"{len(failed)} of {len(jobs)} jobs failed: " + "; ".join(m for _, m in sorted(failed)))


def _job_error(text: str) -> str:
    """The job's own error in submitit's `FailedJobError` message: the last line of the traceback it quotes
    between two rules of dashes, without the class of a `JobsFailed`; else the message's first line."""
    lines = [line for line in text.splitlines() if line.strip()]
    rules = [k for k, line in enumerate(lines) if set(line.strip()) == {"-"}]
    error = lines[rules[1] - 1] if len(rules) >= 2 else lines[0]
    return error.removeprefix(f"{JobsFailed.__module__}.{JobsFailed.__name__}: ")


def _on_gpu(job: Job, gpus: Sequence[str], k: int) -> Job:
    """`job` with `CUDA_VISIBLE_DEVICES` set to GPU k mod len(gpus) (unchanged without GPUs)."""
    if not gpus:
        return job
    return Job(job.name, job.argv, job.log, {**job.env, "CUDA_VISIBLE_DEVICES": str(gpus[k % len(gpus)])})


def _ended(job: Job, t0: float, done: int, total: int, error: str | None = None) -> None:
    from pkdkit.notebooks import _clock

    what = f"{job.name} done, log: {job.log}" if error is None else \
        error if error.startswith(job.name) else f"{job.name} failed: {error}"
    step(f"{what} [{done}/{total}, {_clock(time.monotonic() - t0)}]")


def _run_pool(jobs: Sequence[Job], at_once: int, gpus: Sequence[str], t0: float) -> list[tuple[int, str]]:
    """Up to `at_once` jobs at a time, each in a thread waiting on its command; the failed ones as (index, error)."""
    slots: Queue[int] = Queue()  # a job takes a free slot, and that slot's GPU
    for k in range(max(1, at_once)):
        slots.put(k)
    running: set[subprocess.Popen] = set()

    def one(job: Job) -> None:
        slot = slots.get()
        try:
            run_command(_on_gpu(job, gpus, slot), running)
        finally:
            slots.put(slot)

    failed = []
    with ThreadPoolExecutor(max_workers=max(1, at_once)) as pool:
        futures = {pool.submit(one, job): k for k, job in enumerate(jobs)}
        try:
            for n, future in enumerate(as_completed(futures), 1):
                k, error = futures[future], future.exception()
                job = jobs[k]
                if error is not None:
                    failed.append((k, str(error)))
                _ended(job, t0, n, len(jobs), str(error) if error else None)
        except BaseException:  # stopped: cancel what has not started, stop what runs
            for future in futures:
                future.cancel()
            while running:
                running.pop().terminate()
            raise
    return failed


def make_executor(cluster: str, folder: Path, slurm: Slurm) -> submitit.AutoExecutor:
    """submitit's executor for `cluster` ("slurm" or "local"), one task of `slurm`'s resources per job."""
    if cluster == "slurm" and shutil.which("srun") is None:
        raise ConfigError("--launcher slurm: SLURM's srun is not on this machine's PATH; run the command on the "
                          "cluster's login node, or use --launcher local or --jobs N here")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(timeout_min=slurm.time_min, nodes=1, tasks_per_node=1,
                               **({"cpus_per_task": slurm.cpus} if slurm.cpus else {}))
    if cluster == "slurm":  # SLURM sets each job's CUDA_VISIBLE_DEVICES to the GPUs it allocated
        executor.update_parameters(gpus_per_node=slurm.gpus, **{f"slurm_{k}": v for k, v in
                                   (("partition", slurm.partition), ("account", slurm.account)) if v})
    else:  # the local executor would hide every GPU (gpus_per_node 0): each job's own is in its environment
        executor.update_parameters(gpus_per_node=0)
    return executor


def _run_submitit(jobs: Sequence[Job], cluster: str, folder: Path, slurm: Slurm, gpus: Sequence[str],
                  t0: float) -> list[tuple[int, str]]:
    """Every job submitted at once with submitit; the failed ones as (index, error)."""
    executor = make_executor(cluster, folder, slurm)
    submitted = {}
    try:
        for k, job in enumerate(jobs):
            submitted[executor.submit(SubmittedJob(_on_gpu(job, gpus, k) if cluster == "local" else job))] = k
        failed = []
        poll = 0.5 if cluster == "local" else 30.0
        for n, sjob in enumerate(submitit.helpers.as_completed(list(submitted), poll_frequency=poll), 1):
            k = submitted[sjob]
            job = jobs[k]
            try:
                sjob.result()
                error = None
            except Exception as e:  # submitit's error holds the job's traceback between two rules
                error = _job_error(str(e))
                error += ("" if str(job.log) in error else f"; its log: {job.log}") + \
                    f" (submitit's log: {sjob.paths.stderr})"
                failed.append((k, error if error.startswith(job.name) else f"{job.name}: {error}"))
            _ended(job, t0, n, len(jobs), error)
    except BaseException:
        for sjob in submitted:
            if not sjob.done():
                sjob.cancel(check=False)
        raise
    return failed
