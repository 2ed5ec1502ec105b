"""Progress output: text progress bars, and one line per meaningful step that headless runs can stream.

Two kinds of output, for two readers:

- `bar(...)`: a tqdm bar for a person watching. Always a *text* bar (`tqdm.std`), also in notebooks: a widget
  bar (`tqdm.auto`) lives in the kernel, so a saved notebook reopened later shows "Error displaying widget: model
  not found" where it was, while a text bar's final state stays readable in the saved notebook. Inside a
  notebook kernel bars go to stdout (stderr is shown on a red background) and are kept when they finish.
- `step(message)`: one line per step worth a line in a log (a model's epoch and its loss, a distillation stage,
  an evaluation), printed with the prefix `MARK`. `pkdkit notebooks run` streams these lines from the
  running notebook to the terminal with the elapsed time and an estimate of the time left
  (`pkdkit.notebooks.ProgressPrinter`); everything else a notebook prints stays in the notebook.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm.std import tqdm

MARK = "[pkdkit] "


def in_kernel() -> bool:
    """True inside a Jupyter kernel (a notebook, JupyterLab or papermill), where stdout is the cell's output."""
    return "ipykernel" in sys.modules and type(sys.stdout).__module__.startswith("ipykernel")


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A text tqdm bar (same arguments as `tqdm.tqdm`); in a notebook on stdout and kept when it finishes."""
    if in_kernel():
        kwargs.update(file=sys.stdout, leave=True)
    return tqdm(iterable, **kwargs)


def step(message: str) -> None:
    """Print one progress line, `MARK + message` (one line: newlines are replaced), for logs and headless runs."""
    print(MARK + " ".join(message.split("\n")), flush=True)
