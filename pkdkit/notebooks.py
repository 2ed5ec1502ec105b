"""Run the walk-through notebooks headless with papermill, in order, sharing one run directory.

`run_notebooks("tiny", "reports/demo")` executes every notebook of `notebooks/` with the preset's parameters
and writes, into the report folder: the executed notebooks, `figures/*.png`, `metrics.json` (each notebook
adds its section, together with the preset, run directory and parameters that produced it) and `timings.json`
(seconds per notebook, kept apart so that two runs of the same settings write identical metrics). A failing
cell stops the run with `NotebookRunError` naming the notebook and the cell.

The kernels run with a fixed number of CPU threads (`threads`, recorded with the parameters): floating-point
sums depend on how work is split between threads, so the same seed and thread count give the same numbers.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pkdkit.config import config_diff
from pkdkit.errors import PkdkitError, RunMismatchError
from pkdkit.files import run_lock, write_json

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


def execute(name: str, out: Path, parameters: dict[str, Any]) -> float:
    """Execute `notebooks/<name>` with papermill into `out/<name>`; returns the seconds it took.
    Runs in the notebooks folder (so relative defaults work) on the "python3" kernel of this interpreter."""
    import papermill as pm

    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env_path])
    tic = time.time()
    print(f"[pkdkit] running {name} ...", flush=True)
    try:
        pm.execute_notebook(str(notebooks_dir() / name), str(out / name), parameters=parameters,
                            kernel_name="python3", language="python", cwd=str(notebooks_dir()), progress_bar=False)
    except pm.PapermillExecutionError as e:
        raise NotebookRunError(f"{name} failed in cell {e.exec_count} (executed copy: {out / name}): "
                               f"{e.ename}: {e.evalue}") from None
    finally:
        os.environ["PATH"] = env_path
    seconds = round(time.time() - tic, 1)
    print(f"[pkdkit] {name} done in {seconds} s", flush=True)
    return seconds


DEFAULT_THREADS = 2


def run_notebooks(preset: str, out: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
                  device: str = "auto", parameters: dict[str, Any] | None = None,
                  only: list[str] | None = None, progress: bool = False,
                  threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Execute the notebooks with papermill; returns {"out", "notebooks": {name: seconds}}.

    run_dir: shared run directory (default `runs/<preset>`, so checkpoints stay out of the report).
    parameters: extra values for every notebook's `parameters` cell. Before any notebook runs, each name
    must be a parameter of one of the notebooks and each value of the type of its default
    (NotebookParameterError lists the valid ones), and a `run_dir` that holds a run made with other settings
    (`epochs`, `seed`, ...; recorded in `run_dir/parameters.json`) is refused with the settings that differ.
    The run and report folders are locked while the notebooks run (`pkdkit.files.run_lock`).
    threads: CPU threads of each kernel (OMP_NUM_THREADS), for numbers that repeat exactly; 0 leaves torch's
    default.
    """
    out = Path(out).resolve()
    run_dir = Path(run_dir or Path("runs") / preset).resolve()
    names = list(NOTEBOOKS)
    if only:
        unknown = sorted(set(only) - set(NOTEBOOKS))
        if unknown:
            raise NotebookParameterError(f"unknown notebooks {unknown}; available: {list(NOTEBOOKS)}")
        names = [n for n in NOTEBOOKS if n in only]
    defaults = check_parameters(names, parameters or {})
    params = {"preset": preset, "run_dir": str(run_dir), "device": device, "progress": progress,
              "figures_dir": str(out / "figures"), "report_metrics": str(out / "metrics.json"), **(parameters or {})}
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with run_lock(run_dir), run_lock(out):
        _check_same_run_parameters(run_dir, {**defaults, **params})
        if threads:
            os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        try:
            timings = {name: execute(name, out, params) for name in names}
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        metrics = out / "metrics.json"
        summary = json.loads(metrics.read_text()) if metrics.exists() else {}
        summary.update({"parameters": {**params, "threads": threads or None}})
        write_json(summary, metrics)
        write_json({"notebook_seconds": timings, "threads": threads or None}, out / "timings.json")
    return {"out": str(out), "run_dir": str(run_dir), "notebooks": timings}


class NotebookParameterError(PkdkitError, ValueError):
    """A `-p NAME=VALUE` that no notebook takes, or of the wrong type."""


# Parameters set by run_notebooks' own arguments (--preset, --run-dir, ...), not by -p.
_SET_BY_OPTIONS = {"preset": "--preset", "run_dir": "--run-dir", "device": "--device",
                   "figures_dir": "--out", "report_metrics": "--out"}
# Parameters that change how results are shown or where, not what is trained: a run directory may be
# re-used with other values of these.
_DISPLAY_PARAMETERS = {"run_dir", "device", "progress", "figures_dir", "report_metrics", "image_index", "mode",
                       "launch_app", "fiftyone_dataset", "iou"}
RUN_PARAMETERS = "parameters.json"


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


def check_parameters(names: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
    """Fail before any notebook runs: each parameter must be one of the notebooks' (not one set by an option)
    and of its default's type (an int where the default is a float is fine; a None default takes any value).
    Returns the notebooks' defaults."""
    defaults = notebook_parameters(names)
    valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items() if k not in _SET_BY_OPTIONS)
    for key, value in parameters.items():
        if key in _SET_BY_OPTIONS:
            raise NotebookParameterError(f"parameter {key!r} is set with {_SET_BY_OPTIONS[key]}, not -p")
        if key not in defaults:
            raise NotebookParameterError(f"unknown notebook parameter {key!r}; the notebooks take: {valid}")
        default = defaults[key]
        if default is None or value is None:
            continue
        ok = isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool)
        ok = ok or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise NotebookParameterError(f"notebook parameter {key!r} should be a {type(default).__name__} like "
                                         f"its default {default!r}, got {value!r} ({type(value).__name__})")
    return defaults


def _check_same_run_parameters(run_dir: Path, params: dict[str, Any]) -> None:
    """A run directory holds one run: refuse parameters that change what its models are (epochs, seed, loss,
    ...) against those it was made with; record them on its first use."""
    record = run_dir / RUN_PARAMETERS
    now = {k: v for k, v in params.items() if k not in _DISPLAY_PARAMETERS}
    if record.exists():
        saved = json.loads(record.read_text())
        diff = config_diff(saved, now)
        if diff:
            raise RunMismatchError(f"{run_dir} holds a run made with other notebook parameters ({'; '.join(diff)}); "
                                   f"use another --run-dir, or delete it to start over")
    else:
        write_json(now, record)


EXPERIMENT_NOTEBOOK = "06_seed_study.ipynb"


def run_experiment(preset: str, seeds: list[int], out: str | os.PathLike, *, run_root: str | os.PathLike | None = None,
                   device: str = "auto", parameters: dict[str, Any] | None = None,
                   threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """The progressive-vs-one-shot experiment: the whole walk-through once per seed (teachers, baseline,
    selection, distillation all re-trained with that seed) into `out/seed_<k>`, then
    `06_seed_study.ipynb` aggregates them into `out` (mean and spread of AP per run type)."""
    out = Path(out).resolve()
    run_root = Path(run_root or Path("runs") / f"{preset}_experiment").resolve()
    if "seed" in (parameters or {}):
        raise NotebookParameterError("parameter 'seed' is set with --seeds, not -p")
    check_parameters(list(NOTEBOOKS), parameters or {})
    seed_dirs = []
    with run_lock(out):
        for seed in seeds:
            report = out / f"seed_{seed}"
            run_notebooks(preset, report, run_dir=run_root / f"seed_{seed}", device=device,
                          parameters={**(parameters or {}), "seed": seed}, threads=threads)
            seed_dirs.append(str(report))
        execute(EXPERIMENT_NOTEBOOK, out, {"reports": seed_dirs, "figures_dir": str(out / "figures"),
                                           "summary_path": str(out / "experiment.json")})
    return {"out": str(out), "seeds": seed_dirs}
