"""Run the walk-through notebooks headless with papermill, in order, sharing one run directory.

`run_notebooks("tiny", "runs/demo")` executes every notebook of `notebooks/` with the preset's parameters
and writes, into the report folder: the executed notebooks, `figures/*.png`, `metrics.json` (each notebook
adds its section, together with the preset, run directory and parameters that produced it) and `timings.json`
(seconds per notebook, kept apart so that two runs of the same settings write identical metrics). A failing
cell stops the run with `NotebookRunError` naming the notebook and the cell.

The kernels run with a fixed number of CPU threads (`threads`, recorded with the parameters): floating-point
sums depend on how work is split between threads, so the same seed and thread count give the same numbers.
"""
from __future__ import annotations

import ast
import io
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, TextIO

from pkdkit.errors import ConfigError, PkdkitError
from pkdkit.files import run_lock, write_json
from pkdkit.jobs import Job, Slurm, run_jobs
from pkdkit.progress import MARK
from pkdkit.runid import check_same_run, identity

NOTEBOOKS = (
    "01_data_and_teachers.ipynb",
    "02_teacher_selection.ipynb",
    "03_staged_distillation.ipynb",
    "04_feature_maps.ipynb",
    "05_evaluation_and_fiftyone.ipynb",
)


class NotebookRunError(PkdkitError, RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


def notebooks_dir() -> Path:
    """The repository's `notebooks/` folder (pkdkit is installed from the repository, editable)."""
    here = Path(__file__).resolve().parent.parent / "notebooks"
    if not (here / NOTEBOOKS[0]).exists():
        raise FileNotFoundError(f"notebooks not found in {here}: run from a clone of the pkdkit repository")
    return here


def execute(name: str, out: Path, parameters: dict[str, Any], *, reference: list[float] | None = None,
            stream: TextIO | None = None, env: dict[str, str] | None = None) -> float:
    """Execute `notebooks/<name>` with papermill into `out/<name>`; returns the seconds it took.

    The kernel runs in `out` (so the executed notebook's relative paths work where it lies), on the "python3"
    kernel of this interpreter, over IPC sockets (a TCP kernel logs a warning about unencrypted transport to
    the terminal), and shut down without an interrupt (`_kernel_manager`). Its environment is this process's
    with `env` added and this interpreter's folder first on PATH (so the programs it starts, such as torchrun,
    are this environment's); this process's own environment is left as it is. The notebook's progress
    lines (`pkdkit.progress.step`) are streamed to `stream` (default stdout) while it runs, with the elapsed
    time and an estimate of the time left from `reference` (the seconds of each cell in an earlier run; see
    `ProgressPrinter`). The executed copy is tidied by `tidy_executed`."""
    import papermill as pm
    from traitlets.config import Config

    kernel_env = {**(env or {}), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    stream = stream or sys.stdout
    n_cells = len(json.loads((notebooks_dir() / name).read_text())["cells"]) + 1  # + papermill's injected cell
    printer = ProgressPrinter(name, n_cells, reference=reference, out=stream)
    printer.start()
    try:
        pm.execute_notebook(str(notebooks_dir() / name), str(out / name), parameters=parameters,
                            kernel_name="python3", language="python", cwd=str(out), progress_bar=False,
                            stdout_file=printer, config=Config({"KernelManager": {"transport": "ipc"}}),
                            kernel_manager_class=_kernel_manager(kernel_env), on_cell_start=printer.cell_started)
    except pm.PapermillExecutionError as e:
        raise NotebookRunError(f"{name} failed in cell {e.exec_count} (executed copy: {out / name}): "
                               f"{e.ename}: {e.evalue}") from None
    finally:
        if (out / name).exists():
            roots = [notebooks_dir().parent] + [out / v for k, v in parameters.items()
                                                if k in PATH_PARAMETERS and isinstance(v, str)]
            tidy_executed(out / name, out, roots=roots)
    seconds = round(printer.elapsed(), 1)
    print(f"{MARK}{name} done in {_clock(seconds)}", file=stream, flush=True)
    return seconds


def _kernel_manager(env: dict[str, str]) -> type:
    """jupyter_client's kernel manager that starts the kernel with `env` added to this process's environment,
    and shuts it down without the interrupt it sends before every shutdown.

    `KernelManager.shutdown_kernel` first interrupts the kernel (SIGINT) to stop code that may still run; a
    papermill kernel has finished its last cell by then, and ipykernel logs the interrupt to the terminal as
    "ERROR | KeyboardInterrupt caught in kernel". The shutdown request that follows ends the kernel the same way.
    """
    from jupyter_client.manager import AsyncKernelManager

    class QuietShutdownKernelManager(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw: Any) -> tuple[list[str], dict[str, Any]]:
            kw["env"] = {**kw.get("env", os.environ), **env}
            return await super()._async_pre_start_kernel(**kw)

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return QuietShutdownKernelManager


def _clock(seconds: float) -> str:
    """12:05 (minutes:seconds), 1:02:05 past an hour."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class ProgressPrinter:
    """Streams a running notebook's progress lines to a terminal: the lines of its stdout that start with
    `pkdkit.progress.MARK`, each prefixed with the notebook, the elapsed time and the time left.

    papermill writes the kernel's stdout here as it arrives (`stdout_file`), and nbclient calls
    `cell_started` around each cell. The time left is an estimate from `reference`, the seconds each cell
    took in an earlier run (from the executed notebook's papermill metadata), scaled by this run's speed on
    the cells done so far: left = (reference seconds of the cells still to run) x (actual / reference seconds
    of the cells done) - (time already spent in the current cell). Without a reference of the same cell count none is shown.
    """

    def __init__(self, name: str, n_cells: int, *, reference: list[float] | None = None,
                 out: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.name, self.out, self.clock = name, out or sys.stdout, clock
        self.reference = reference if reference is not None and len(reference) == n_cells else None
        self.t0 = self.cell_t0 = clock()
        self.current = 0
        self._partial = ""

    def start(self) -> None:
        expected = f", about {_clock(sum(self.reference))} in an earlier run" if self.reference else ""
        self._print(f"{MARK}running {self.name}{expected} ...")

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def cell_started(self, cell: Any = None, cell_index: int = 0, **_: Any) -> None:
        self.current, self.cell_t0 = cell_index, self.clock()

    def time_left(self) -> float | None:
        """Estimated seconds until the notebook ends; None without a reference."""
        if self.reference is None:
            return None
        ref_done = sum(self.reference[:self.current])
        spent = self.cell_t0 - self.t0
        speed = spent / ref_done if ref_done >= 1.0 and spent > 0 else 1.0
        in_cell = self.clock() - self.cell_t0
        ahead = sum(self.reference[self.current + 1:]) * speed
        return ahead + max(self.reference[self.current] * speed - in_cell, 0.0)

    def line(self, message: str) -> str:
        """The terminal line for one progress message."""
        left = self.time_left()
        when = _clock(self.elapsed()) + (f", ~{_clock(left)} left" if left is not None else "")
        return f"{MARK}{self.name} [{when}] {message}"

    # the file interface papermill writes the kernel's stdout to
    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.rsplit("\r", 1)[-1]  # a text bar redrawn before the line: only what is shown last
            if line.startswith(MARK):
                self._print(self.line(line[len(MARK):]))
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def tidy_executed(path: Path, out: Path, roots: list[Path] = ()) -> None:
    """Make an executed notebook read as it looked at the end and hold no absolute paths of this machine.

    Consecutive stream outputs of a cell are merged and text progress bars (lines redrawn with carriage
    returns) keep only their last state, as a notebook front-end shows them; papermill's `input_path` and
    `output_path` are made relative to the report folder `out`, and so are the absolute paths of `roots`
    (the run directory, the repository: printed data paths, warnings' file names) in the outputs' text."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    relative = _path_rewriter(out, roots)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list[Any] = []
        for output in cell.outputs:
            last = merged[-1] if merged else None
            if (output.output_type == "stream" and last is not None and last.output_type == "stream"
                    and last.name == output.name):
                last.text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = relative(_final_text(output.text))
            elif output.output_type == "error":
                output.evalue = relative(output.evalue)
                output.traceback = [relative(line) for line in output.traceback]
            for mime in ("text/plain", "text/markdown", "text/html"):
                if mime in output.get("data", {}):
                    output.data[mime] = relative(output.data[mime])
        cell.outputs = merged
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = os.path.relpath(meta[key], out)
    nbformat.write(nb, path)


def _path_rewriter(out: Path, roots: list[Path]) -> Callable[[str], str]:
    """A function replacing each absolute root path in a text by its path relative to `out` (deepest first)."""
    pairs = sorted({(str(Path(r).resolve()), os.path.relpath(Path(r).resolve(), out)) for r in roots},
                   key=lambda pair: -len(pair[0]))

    def rewrite(text: str) -> str:
        for absolute, rel in pairs:
            text = text.replace(absolute, rel)
        return text
    return rewrite


def _final_text(text: str) -> str:
    """What a terminal shows of `text`: each line after its last carriage return."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


DEFAULT_THREADS = 2


def default_run_dir(preset: str) -> Path:
    """Where `run_notebooks` keeps a preset's run (data, models, selection, distillation) unless told: `runs/<preset>`."""
    return Path("runs") / preset


def run_notebooks(preset: str, out: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
                  device: str = "auto", parameters: dict[str, Any] | None = None,
                  only: list[str] | None = None, progress: bool = True,
                  threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Execute the notebooks with papermill; returns {"out", "run_dir", "notebooks": {name: seconds}}.

    run_dir: shared run directory (default `runs/<preset>`, so checkpoints stay out of the report).
    parameters: values for the notebooks' `parameters` cells (each notebook gets those it declares; the run's
    settings, chosen in notebook 01, reach the others through `run_dir`). Before any notebook runs, each name
    must be a parameter of one of the notebooks and each value of the type of its default
    (NotebookParameterError lists the valid ones), and a `run_dir` that holds a run made with other settings
    (`epochs`, `seed`, ...; recorded in `run_dir/parameters.json`) is refused with the settings that differ.
    The run and report folders are locked while the notebooks run (`pkdkit.files.run_lock`).
    threads: CPU threads of each kernel (OMP_NUM_THREADS in the kernel's environment), for numbers that repeat
    exactly; 0 leaves torch's default.
    progress: text progress bars in the notebooks and progress lines streamed to stdout (see `execute`).

    The notebooks get the run directory, the figures folder, the metrics file and a relative `data_root`
    as paths relative to the report folder (their kernels run there), so the executed notebooks and
    `metrics.json` hold no absolute paths of this machine and still work when opened where they lie.
    The time left shown while a notebook runs is estimated from the seconds of each of its cells in the
    previous executed copy in `out`, else in the committed example `reports/example-<preset>/`, when that run
    did the same work (same parameters but for display and paths); else no estimate is shown.
    """
    out = Path(out).resolve()
    run_dir = Path(run_dir or default_run_dir(preset)).resolve()
    names = list(NOTEBOOKS)
    if only:
        unknown = sorted(set(only) - set(NOTEBOOKS))
        if unknown:
            raise NotebookParameterError(f"unknown notebooks {unknown}; available: {list(NOTEBOOKS)}")
        names = [n for n in NOTEBOOKS if n in only]
    defaults = check_parameters(names, parameters or {})
    parameters = dict(parameters or {})
    for key in PATH_PARAMETERS & set(parameters):
        if isinstance(parameters[key], str):
            parameters[key] = str(Path(parameters[key]).resolve())
    params = {"preset": preset, "run_dir": str(run_dir), "device": device, "progress": progress,
              "figures_dir": str(out / "figures"), "report_metrics": str(out / "metrics.json"), **parameters}
    relative = {k: os.path.relpath(v, out) if k in PATH_PARAMETERS and isinstance(v, str) else v
                for k, v in params.items()}
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    with run_lock(run_dir), run_lock(out):
        _check_same_run_parameters(run_dir, {**defaults, **params})
        timings = {}
        for name in names:
            own = notebook_parameters([name])  # each notebook gets only what its parameters cell declares
            reference = _reference_timings(preset, out, name, relative, defaults)
            timings[name] = execute(name, out, {k: v for k, v in relative.items() if k in own},
                                    reference=reference, stream=None if progress else io.StringIO(), env=env)
        metrics = out / "metrics.json"
        summary = json.loads(metrics.read_text()) if metrics.exists() else {}
        summary.update({"parameters": {**relative, "threads": threads or None}})
        write_json(summary, metrics)
        write_json({"notebook_seconds": timings, "threads": threads or None}, out / "timings.json")
    return {"out": str(out), "run_dir": str(run_dir), "notebooks": timings}


def example_dir(preset: str) -> Path:
    """The committed example report of a preset: `reports/example-<preset>/` (`make example` rewrites it)."""
    return notebooks_dir().parent / "reports" / f"example-{preset}"


def _reference_timings(preset: str, out: Path, name: str, params: dict[str, Any],
                       defaults: dict[str, Any]) -> list[float] | None:
    """Seconds of each cell of notebook `name` (papermill records them in the executed copy) in an earlier run
    that did the same work: the copy in `out` if it ran there before, else the committed example of the
    preset, whichever report's `metrics.json` parameters equal `params` (with the notebooks' `defaults` for
    those not given) but for display and path parameters; None if neither fits."""
    work = identity({**defaults, **params})
    for folder in (out, example_dir(preset)):
        path, metrics = folder / name, folder / "metrics.json"
        if not (path.exists() and metrics.exists()):
            continue
        before = {**defaults, **json.loads(metrics.read_text()).get("parameters", {})}
        if any(before.get(k) != v for k, v in work.items()):
            continue
        nb = json.loads(path.read_text())
        seconds = [c.get("metadata", {}).get("papermill", {}).get("duration") for c in nb["cells"]]
        if any(seconds):
            return [float(s or 0.0) for s in seconds]
    return None


class NotebookParameterError(PkdkitError, ValueError):
    """A `-p NAME=VALUE` that no notebook takes, or of the wrong type."""


# Parameters set by run_notebooks' own arguments (--preset, --run-dir, ...), not by -p.
_SET_BY_OPTIONS = {"preset": "--preset", "run_dir": "--run-dir", "device": "--device",
                   "figures_dir": "--out", "report_metrics": "--out"}
RUN_PARAMETERS = "parameters.json"
# Parameters that are paths: given to the notebooks relative to the report folder (their working directory).
PATH_PARAMETERS = {"run_dir", "figures_dir", "report_metrics", "data_root"}


def notebook_parameters(names: list[str] | tuple[str, ...] = NOTEBOOKS) -> dict[str, Any]:
    """{parameter: default value} of the `parameters` cells of the named notebooks (papermill's inspection)."""
    import papermill as pm

    found: dict[str, Any] = {}
    for name in names:
        for param, info in pm.inspect_notebook(str(notebooks_dir() / name)).items():
            try:
                found.setdefault(param, ast.literal_eval(info["default"]))
            except (ValueError, SyntaxError):
                found.setdefault(param, None)
    return found


# The declared types of the parameters whose default is None (the default says nothing of the type); notebook
# 01's run settings are typed, and checked for range, by `pkdkit.workflow.RunSettings`.
NONE_DEFAULT_TYPES = {"loss": "str | None", "fiftyone_dataset": "str | None"}


def parameter_types(defaults: dict[str, Any]) -> dict[str, str]:
    """{parameter: type annotation} of the notebooks' parameters: RunSettings' field for notebook 01's settings,
    `NONE_DEFAULT_TYPES`, else the type of the default (a float default also takes an int)."""
    from pkdkit.workflow import RunSettings

    declared = {**{f.name: f.type for f in fields(RunSettings)}, **NONE_DEFAULT_TYPES}
    types = {}
    for key, default in defaults.items():
        if key in declared:
            types[key] = declared[key]
        elif default is not None:
            types[key] = "float" if isinstance(default, float) else type(default).__name__
    return types


def _matches(value: Any, annotation: str) -> bool:
    """Whether `value` is of the type `annotation` ("int | None", "float", "list[str]", ...); an int is a float,
    a bool is only a bool."""
    kinds = {"int": int, "float": (int, float), "str": str, "list": list, "dict": dict, "None": type(None)}
    for alt in annotation.split("|"):
        base = alt.strip().split("[")[0]
        if base == "bool" or isinstance(value, bool):
            if base == "bool" and isinstance(value, bool):
                return True
        elif isinstance(value, kinds.get(base, ())):
            return True
    return False


def check_parameters(names: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
    """Fail before any notebook runs, and so before anything is written: each parameter must be one of the
    notebooks' (not one set by an option), of its declared type (`parameter_types`; None only where the type
    allows it), and notebook 01's run settings in range (`pkdkit.workflow.RunSettings`).
    Returns the notebooks' defaults."""
    from pkdkit.errors import ConfigError
    from pkdkit.workflow import RunSettings

    defaults = notebook_parameters(names)
    types = parameter_types(defaults)
    valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items() if k not in _SET_BY_OPTIONS)
    for key, value in parameters.items():
        if key in _SET_BY_OPTIONS:
            raise NotebookParameterError(f"parameter {key!r} is set with {_SET_BY_OPTIONS[key]}, not -p")
        if key not in defaults:
            raise NotebookParameterError(f"unknown notebook parameter {key!r}; the notebooks take: {valid}")
        if key not in types:
            raise NotebookParameterError(f"notebook parameter {key!r} has no declared type (its default is None): "
                                         f"declare it in pkdkit.notebooks.NONE_DEFAULT_TYPES")
        if not _matches(value, types[key]):
            kind = " or ".join(alt.strip() for alt in types[key].split("|"))
            raise NotebookParameterError(f"notebook parameter {key!r} should be {'an' if kind[0] in 'aeiou' else 'a'} "
                                         f"{kind} (its default is {defaults[key]!r}), got {value!r} "
                                         f"({type(value).__name__})")
    settings = {f.name: parameters[f.name] for f in fields(RunSettings) if f.name in parameters}
    try:
        RunSettings(**settings)
    except ConfigError as e:
        raise NotebookParameterError(f"notebook parameters: {e}") from None
    return defaults


def _check_same_run_parameters(run_dir: Path, params: dict[str, Any]) -> None:
    """A run directory holds one run: refuse parameters that change what its models are (epochs, seed, loss,
    ...) against those it was made with (how it is computed and what is shown may change: `pkdkit.runid`);
    record them on its first use."""
    record = run_dir / RUN_PARAMETERS
    now = identity(params)
    if record.exists():
        check_same_run(json.loads(record.read_text()), now, f"{run_dir} holds a run made with other notebook parameters",
                       "use another --run-dir, or delete it to start over")
    else:
        write_json(now, record)


EXPERIMENT_NOTEBOOK = "06_seed_study.ipynb"


def run_experiment(preset: str, seeds: list[int], out: str | os.PathLike, *, run_root: str | os.PathLike | None = None,
                   device: str = "auto", parameters: dict[str, Any] | None = None,
                   threads: int = DEFAULT_THREADS, jobs: int = 1, launcher: str = "pool",
                   slurm: Slurm | None = None) -> dict[str, Any]:
    """The progressive-vs-one-shot experiment: the whole walk-through once per seed (teachers, baseline,
    selection, distillation all re-trained with that seed) into `out/seed_<k>`, then
    `06_seed_study.ipynb` aggregates them into `out` (mean and spread of AP per run type).

    With the default `jobs=1, launcher="pool"` the seeds run one after another in this process. Otherwise each
    seed is the command `pkdkit notebooks run` of its report and run folders (`seed_job`), run by
    `pkdkit.jobs.run_jobs`: `jobs` seeds at once here ("pool"; on CUDA one visible GPU per job, on CPU the
    `threads` divided among the jobs: max(1, threads // jobs) each), or one SLURM job per seed ("slurm", `slurm`
    its resources; "local": submitit's local executor), its output in `out/seed_<k>/run.log`, submitit's files
    in `out/submitit/`. The study starts when every seed has finished; a failed seed makes `JobsFailed` name it
    and its log once the others are done, and no study is written."""
    out = Path(out).resolve()
    run_root = Path(run_root or Path("runs") / f"{preset}_experiment").resolve()
    if "seed" in (parameters or {}):
        raise NotebookParameterError("parameter 'seed' is set with --seeds, not -p")
    check_parameters(list(NOTEBOOKS), parameters or {})
    seed_dirs = [out / f"seed_{seed}" for seed in seeds]
    with run_lock(out):
        if jobs == 1 and launcher == "pool":
            for seed, report in zip(seeds, seed_dirs):
                run_notebooks(preset, report, run_dir=run_root / f"seed_{seed}", device=device,
                              parameters={**(parameters or {}), "seed": seed}, threads=threads)
        else:
            gpus = visible_gpus(device, jobs if launcher == "pool" else 1) if launcher != "slurm" else []
            at_once = min(jobs, len(seeds)) if launcher == "pool" else len(seeds)
            if not gpus and launcher != "slurm":  # CPU: the threads shared by the jobs that run at once
                threads = max(1, (threads or len(os.sched_getaffinity(0))) // at_once)
            run_jobs([seed_job(preset, seed, report, run_root / f"seed_{seed}", device, parameters or {}, threads)
                      for seed, report in zip(seeds, seed_dirs)],
                     launcher=launcher, at_once=at_once, gpus=gpus, folder=out / "submitit",
                     slurm=replace(slurm or Slurm(), cpus=threads or None))
        execute(EXPERIMENT_NOTEBOOK, out, {"reports": [os.path.relpath(d, out) for d in seed_dirs],
                                           "figures_dir": "figures", "summary_path": "experiment.json"})
    return {"out": str(out), "seeds": [str(d) for d in seed_dirs]}


def seed_job(preset: str, seed: int, report: Path, run_dir: Path, device: str, parameters: dict[str, Any],
             threads: int) -> Job:
    """One seed of the experiment as a command: `python -m pkdkit.cli notebooks run` into `report` with
    `run_dir`, the parameters (paths made absolute) and `seed`; its output goes to `report/run.log`."""
    argv = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", preset, "--out", str(report),
            "--run-dir", str(run_dir), "--device", device, "--threads", str(threads)]
    for key, value in {**parameters, "seed": seed}.items():
        if key in PATH_PARAMETERS and isinstance(value, str):
            value = str(Path(value).resolve())
        argv += ["-p", f"{key}={_yaml_value(value)}"]
    return Job(f"seed {seed}", argv, report / "run.log")


def _yaml_value(value: Any) -> str:
    """`value` as `-p NAME=VALUE` takes it (YAML, one line): 1e-05 is written 1.0e-05, which YAML reads as a float."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()


def visible_gpus(device: str, jobs: int) -> list[str]:
    """The GPUs jobs on `device` are spread over: those in CUDA_VISIBLE_DEVICES (else every GPU) on CUDA, none on
    CPU. A `cuda:<index>` device names one GPU, which several jobs would share: refused for more than one job."""
    from pkdkit.engine import resolve_device

    if resolve_device(device).type != "cuda":
        return []
    if device.startswith("cuda:") and jobs > 1:
        raise ConfigError(f"--device {device} with {jobs} jobs: give --device cuda (or auto) and choose the GPUs "
                          f"with CUDA_VISIBLE_DEVICES")
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g.strip() for g in listed.split(",") if g.strip()] if listed else [str(k) for k in range(torch.cuda.device_count())]
