"""An executed report as a person opens it: JupyterLab in headless chromium (Playwright driving Debian's
/usr/bin/chromium; skipped where playwright or chromium is missing)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import free_port, screenshot_dir

EXAMPLE = Path(__file__).resolve().parent.parent / "reports" / "example-tiny"


@contextlib.contextmanager
def served(cmd: list[str], base: str, probe: str, log_path: Path, *, env: dict[str, str] | None = None,
           timeout: float = 60):
    """Start the server `cmd` (output to `log_path`), wait until `base + probe` answers 200, yield `base`; the
    server is stopped afterwards (a start that fails or times out raises with the log's end)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(base + probe, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd[2]} did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab serving a copy of the committed example's notebook 01 (and its figures); yields its URL."""
    shutil.copy(EXAMPLE / "01_data_and_teachers.ipynb", tmp_path / "01_data_and_teachers.ipynb")
    port, token = free_port(), "pkdkit-test"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", f"--ServerApp.token={token}",
           f"--ServerApp.root_dir={tmp_path}", "--ServerApp.ip=127.0.0.1", "--allow-root",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with served(cmd, f"http://127.0.0.1:{port}", f"/api/status?token={token}", tmp_path / "jupyterlab.log", env=env,
                timeout=120) as base:
        yield f"{base}/lab/tree/01_data_and_teachers.ipynb?token={token}"


def test_executed_notebook_01_shows_its_figures_and_tables_in_jupyterlab(jupyterlab, browser_page):
    nb = nbformat.read(EXAMPLE / "01_data_and_teachers.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    n_figures = sum("image/png" in o.get("data", {}) for o in outputs)
    n_tables = sum("text/markdown" in o.get("data", {}) and "|" in o.data["text/markdown"] for o in outputs)
    assert n_figures >= 2 and n_tables >= 1  # what the committed example shows

    page = browser_page
    page.goto(jupyterlab, wait_until="domcontentloaded", timeout=120_000)
    figures = page.locator(".jp-OutputArea-output img")
    tables = page.locator(".jp-OutputArea-output table")  # the output node is the rendered markdown
    page.wait_for_function(f"document.querySelectorAll('.jp-OutputArea-output img').length >= {n_figures}",
                           timeout=120_000)
    page.wait_for_function(f"document.querySelectorAll('.jp-OutputArea-output table').length >= {n_tables}",
                           timeout=60_000)  # markdown renders after the images
    assert figures.count() == n_figures and tables.count() == n_tables
    for k in range(n_figures):  # each figure decoded, with a real size
        assert figures.nth(k).evaluate("img => img.complete && img.naturalWidth > 100"), k
    assert tables.first.locator("th").count() >= 2 and tables.first.locator("td").count() >= 2
    assert "Error displaying widget" not in page.inner_text("body")
    shots = screenshot_dir()
    if shots:
        figures.first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "jupyterlab_01_figure.png"))
        tables.first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "jupyterlab_01_table.png"))


@pytest.fixture
def tensorboard_server(tiny_run, tmp_path):
    """`tensorboard --logdir` on the folder holding a finished tiny run (as `--logdir <run_dir>` shows every run
    under it); yields its URL and stops the server afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tiny_run["dir"].parent), "--port", str(port),
           "--host", "127.0.0.1"]
    with served(cmd, f"http://127.0.0.1:{port}", "/data/logdir", tmp_path / "tensorboard.log", timeout=60) as base:
        yield base


def test_tensorboard_shows_the_loss_chart_of_a_finished_run(tensorboard_server, tiny_run, browser_page):
    page = browser_page
    page.goto(f"{tensorboard_server}/#timeseries", wait_until="domcontentloaded", timeout=60_000)
    page.locator("metrics-tag-filter input").fill("loss/total")  # the cards below the fold render lazily
    card = page.locator("scalar-card", has=page.locator('tb-truncated-path[title="loss/total"]'))
    card.wait_for(timeout=60_000)
    assert card.locator("line-chart").count() == 1  # the chart, and its data table: the run and its step
    page.wait_for_function("document.querySelector('scalar-card tb-data-table') !== null", timeout=30_000)
    table = card.locator("tb-data-table").inner_text()
    assert tiny_run["dir"].name in table and "2" in table.split()
    shots = screenshot_dir()
    if shots:
        page.screenshot(path=str(shots / "tensorboard_loss.png"))
