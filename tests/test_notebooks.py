"""The notebooks, executed for real with papermill on the tiny preset (fewer epochs), and their outputs."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import nbformat
import pytest

from pkdkit.notebooks import NOTEBOOKS, NotebookRunError, notebooks_dir, run_notebooks

FAST = {"epochs": 1, "distill_epochs": 1, "image_size": 64}  # 64 px: the mechanics, fast


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One headless run of every notebook through the CLI, as `make demo` does (shorter training)."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(root / "fiftyone_db")}
    cmd = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", "tiny", "--out", str(root / "report"),
           "--run-dir", str(root / "run"), "--device", "cpu"] + [a for k, v in FAST.items() for a in ("-p", f"{k}={v}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (root / "stdout.txt").write_text(proc.stdout)
    (root / "stderr.txt").write_text(proc.stderr)
    return root


def test_the_run_streams_one_line_per_step_with_the_time_and_no_kernel_noise(demo_run):
    out, err = (demo_run / "stdout.txt").read_text(), (demo_run / "stderr.txt").read_text()
    lines = out.splitlines()
    prefix = r"\[pkdkit\] {} \[\d+:\d\d(, ~\d+:\d\d left)?\] "
    epoch = re.compile(prefix.format("01_data_and_teachers.ipynb") + r"train \S+ epoch 1/1: .*loss=[\d.]+ \(\d+ s\)$")
    assert sum(bool(epoch.match(line)) for line in lines) == 3, out  # the student and two teachers
    stage = re.compile(prefix.format("03_staged_distillation.ipynb") + r"progressive stage 1/\d \(\S+\): evaluated, AP")
    assert any(stage.match(line) for line in lines), out
    assert any("teacher selection: adaptation costs" in line for line in lines), out
    assert all(line.startswith("[pkdkit] ") for line in lines[:-1]), out  # nothing else reaches the terminal
    assert "it/s" not in out and "s/it" not in out  # no line per bar update
    for noise in ("IPKernelApp", "without encryption", "KeyboardInterrupt"):
        assert noise not in out + err


def test_executed_notebooks_hold_text_bars_in_their_final_state_and_no_widgets(demo_run):
    report = demo_run / "report"
    for name in NOTEBOOKS:
        nb = nbformat.read(report / name, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        bars = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
                and re.search(r"\d+%\|", o.data.get("text/plain", ""))]  # tqdm widgets (04's explorer is wanted)
        assert not bars, name
        assert not [o for o in outputs if o.output_type == "stream" and "\r" in o.text], name
    nb01 = nbformat.read(report / NOTEBOOKS[0], as_version=4)
    text = "".join(o.text for c in nb01.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    assert re.search(r"train \S+ epoch 1/1: 100%\|█+\| \d+/\d+ \[", text), text[-2000:]


def test_reports_hold_paths_relative_to_the_report_folder(demo_run):
    report = demo_run / "report"
    for path in [*(report / n for n in NOTEBOOKS), report / "metrics.json"]:
        assert str(demo_run) not in path.read_text(), path.name
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["parameters"]["run_dir"] == "../run" and metrics["parameters"]["figures_dir"] == "figures"


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_inspect_opens_the_app_on_the_dataset_notebook_5_built(demo_run, stop):
    """`pkdkit inspect RUN_DIR` reloads the run's persistent dataset (same predictions), serves the App, and on
    Ctrl-C or SIGTERM stops within seconds with everything it started (the App's server and service process, and
    a database it started). It is started with SIGINT ignored, as a shell starts a background job: the program
    must install its own handler."""
    import queue
    import signal
    import socket
    import threading
    import time
    import urllib.request

    import psutil
    from conftest import free_port

    port = free_port()
    env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(demo_run / "fiftyone_db")}
    proc = subprocess.Popen([sys.executable, "-m", "pkdkit.cli", "inspect", str(demo_run / "run"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []

    def output() -> str:
        while not lines.empty():
            seen.append(lines.get())
        return "".join(seen)

    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C" not in output():
            assert proc.poll() is None and time.monotonic() < deadline, f"no App after 300 s:\n{output()}"
            time.sleep(0.1)
        assert "reloaded FiftyOne dataset pkdkit-run-" in output(), output()
        assert f"FiftyOne App: http://localhost:{port}/" in output(), output()
        with urllib.request.urlopen(f"http://localhost:{port}/", timeout=60) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.laddr.port == port for p in started for c in p.net_connections(kind="tcp")), output()
        proc.send_signal(getattr(signal, stop))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"pkdkit inspect did not stop on {stop} within 30 s:\n{output()}")
    assert proc.returncode == 0, output()
    assert "FiftyOne App stopped" in output(), output()
    _, alive = psutil.wait_procs(started, timeout=20)  # the database's service stops it once its client is gone
    assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
    with pytest.raises(ConnectionRefusedError):  # nothing serves on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    for name in NOTEBOOKS:
        nb = nbformat.read(notebooks_dir() / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, name
        assert nb.cells[0].cell_type == "markdown", f"{name} must start with an explanation"
        assert nb.metadata["kernelspec"]["name"] == "python3" and nb.metadata["language_info"]["name"] == "python"


def test_each_parameters_cell_holds_only_what_its_notebook_uses_under_an_edit_line():
    import papermill as pm

    for name in NOTEBOOKS:
        nb = nbformat.read(notebooks_dir() / name, as_version=4)
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        assert "Edit the next cell" in nb.cells[at - 1].source, name
        rest = "\n".join(c.source for c in nb.cells[at + 1:] if c.cell_type == "code")
        for param in pm.inspect_notebook(str(notebooks_dir() / name)):
            assert param in rest, f"{name}: parameter {param!r} is never used"
        if name != NOTEBOOKS[0]:  # the run's settings are chosen once, in notebook 01
            assert not {"preset", "seed", "epochs", "data_root"} & set(pm.inspect_notebook(str(notebooks_dir() / name)))


def test_every_notebook_executes_headless_and_writes_its_outputs(demo_run):
    report = demo_run / "report"
    for name in NOTEBOOKS:
        nb = nbformat.read(report / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{name}: not every cell ran"
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "run_dir = " in injected[0].source
        # only the parameters the notebook declares: the run's settings reach 02-05 through run_dir
        assert ("distill_epochs = 1" in injected[0].source) == (name == NOTEBOOKS[0]), name
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    for expected in ("01_samples.png", "01_candidates_ap.png", "02_cost_matrix.png", "03_final_ap.png",
                     "03_losses_progressive.png", "04_feature_maps.png", "04_difference_after.png",
                     "04_loss_view.png", "05_pr_curves.png", "05_speed_accuracy.png"):
        assert expected in figures
        assert (report / "figures" / expected).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_metrics_hold_every_section_and_the_parameters(demo_run):
    metrics = json.loads((demo_run / "report" / "metrics.json").read_text())
    assert {"candidates", "selection", "distillation", "comparison", "evaluation", "fiftyone", "profile",
            "parameters"} <= set(metrics)
    assert [p["name"] for p in metrics["profile"]][-1] == "student (progressive)"
    assert all(p["flops"] > 0 and p["torch_cpu_ms"] > 0 and p["ort_cpu_ms"] > 0 for p in metrics["profile"])
    assert metrics["preset"] == "tiny" and metrics["parameters"]["distill_epochs"] == 1
    assert metrics["parameters"]["threads"] == 2 and "notebook_seconds" not in metrics  # timings apart: metrics repeat
    assert set(json.loads((demo_run / "report" / "timings.json").read_text())["notebook_seconds"]) == set(NOTEBOOKS)
    assert set(metrics["evaluation"]) >= {"baseline", "one_shot", "progressive"}
    # the progressive run is exactly the selected order, and every run says its budget and where its order came from
    order = metrics["selection"]["order"]
    runs = metrics["comparison"]["runs"]
    assert runs["progressive"]["order"] == order and runs["progressive"]["source"] == "selection (minimax)"
    assert runs["baseline"]["budget"]["epochs"] == 1 and runs["one_shot"]["budget"]["epochs"] == 1
    assert runs["progressive"]["budget"]["epochs"] == len(order)
    assert runs["progressive"]["budget"]["init"].startswith("initial (random, seed 0) + neck/head of " + order[0])
    # the equal-budget controls exist when some order has S > 1 stages, with S x E = S epochs (whichever the
    # selection chose: 2 teachers, or 1 and a by_ap chain, or 1 alone)
    longest = max(len(r["order"]) for r in runs.values())
    long_runs = {n: runs[n]["budget"]["epochs"] for n in ("baseline_long", "one_shot_long") if n in runs}
    assert long_runs == ({"baseline_long": longest, "one_shot_long": longest} if longest > 1 else {}), runs
    assert metrics["comparison"]["order_check"]["selected"] == order
    # one_shot is trained once, as stage 1 of the run that starts with the final teacher alone: progressive when
    # the selection chose that teacher alone, else reversed (run_reversed is on in the demo)
    same_as = "progressive" if len(order) == 1 else "reversed"
    assert f"/{same_as}/" in runs["one_shot"]["record"].replace(os.sep, "/"), runs["one_shot"]
    assert metrics["evaluation"]["one_shot"] == next(iter(metrics["distillation"][same_as].values()))
    # FiftyOne's counts equal pkdkit's own COCOeval counts (same IoU rule)
    assert metrics["fiftyone"]["pkdkit_counts"] == {k: {c: v[c] for c in ("tp", "fp", "fn")}
                                                    for k, v in metrics["fiftyone"]["counts"].items()}


def test_a_failing_notebook_names_the_notebook_and_the_cell(tmp_path):
    with pytest.raises(NotebookRunError, match=r"01_data_and_teachers.ipynb failed in cell \d+ .*(Value|Config)Error: .*unknown preset 'huge'"):
        run_notebooks("huge", tmp_path / "report", run_dir=tmp_path / "run", only=["01_data_and_teachers.ipynb"])
    assert (tmp_path / "report" / "01_data_and_teachers.ipynb").exists()  # the executed copy shows the error


def test_cli_exits_non_zero_when_a_notebook_fails(tmp_path):
    cmd = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", "tiny", "--out", str(tmp_path),
           "--run-dir", str(tmp_path / "run"), "--only", "02_teacher_selection.ipynb"]
    # a run setting belongs to notebook 01: refused before anything runs, with what notebook 02 takes
    proc = subprocess.run(cmd + ["-p", f"data_root={tmp_path / 'nowhere'}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "unknown notebook parameter 'data_root'" in proc.stderr
    assert "strategy='minimax'" in proc.stderr and "Traceback" not in proc.stderr
    # notebook 02 on a run directory notebook 01 has not set up: fails in its first cell, saying what to run
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "02_teacher_selection.ipynb failed in cell" in proc.stderr and "run notebook 01" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_dir_refuses_other_parameters_before_any_notebook_runs(demo_run, tmp_path):
    cmd = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", "tiny", "--out", str(tmp_path),
           "--run-dir", str(demo_run / "run"), "--only", "02_teacher_selection.ipynb", "-p", "strategy=greedy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "strategy: 'minimax' -> 'greedy'" in proc.stderr
    assert not (tmp_path / "02_teacher_selection.ipynb").exists()


def test_seed_study_notebook_aggregates_reports(demo_run, tmp_path):
    from pkdkit.notebooks import EXPERIMENT_NOTEBOOK, execute

    import numpy as np

    # a second seed's report: the demo's metrics with other numbers (each stat shifted by a different amount)
    first = json.loads((demo_run / "report" / "metrics.json").read_text())
    second = json.loads(json.dumps(first))
    second["parameters"]["seed"] = 1
    for k, stats in enumerate(second["evaluation"].values()):
        stats.update({s: stats[s] + 0.01 * (k + 1) + 0.001 * i for i, s in enumerate(("AP", "AP50", "AP75"))})
    (tmp_path / "seed_1").mkdir()
    (tmp_path / "seed_1" / "metrics.json").write_text(json.dumps(second))
    execute(EXPERIMENT_NOTEBOOK, tmp_path, {"reports": [str(demo_run / "report"), str(tmp_path / "seed_1")],
                                            "figures_dir": str(tmp_path / "figures"),
                                            "summary_path": str(tmp_path / "experiment.json")})
    study = json.loads((tmp_path / "experiment.json").read_text())
    assert set(study["runs"]) == set(first["evaluation"]) >= {"baseline", "one_shot", "progressive"}
    assert study["budgets"]["baseline"]["epochs"] == 1 and len(study["order_checks"]) == 2
    assert "| run | epochs | init |" in study["table"] and "selected was best" in study["order_table"]
    for name, run in study["runs"].items():
        for stat in ("AP", "AP50", "AP75"):
            values = [first["evaluation"][name][stat], second["evaluation"][name][stat]]
            assert run[stat]["values"] == values, (name, stat)
            assert math.isclose(run[stat]["mean"], np.mean(values)) and math.isclose(run[stat]["std"], np.std(values, ddof=1))
            assert f"{100 * run[stat]['mean']:.1f} ± {100 * run[stat]['std']:.1f}" in study["table"]
    assert (tmp_path / "figures" / "06_ap_over_seeds.png").exists()
    nb = nbformat.read(notebooks_dir() / EXPERIMENT_NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
