"""The notebooks, executed for real with papermill on the tiny preset (fewer epochs), and their outputs."""
from __future__ import annotations

import json
import os
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
    return root


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
        assert injected and "distill_epochs = 1" in injected[0].source
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    for expected in ("01_samples.png", "01_candidates_ap.png", "02_cost_matrix.png", "03_final_ap.png",
                     "03_losses_progressive.png", "04_feature_maps.png", "04_difference_after.png",
                     "04_loss_view.png", "05_pr_curves.png"):
        assert expected in figures
        assert (report / "figures" / expected).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_metrics_hold_every_section_and_the_parameters(demo_run):
    metrics = json.loads((demo_run / "report" / "metrics.json").read_text())
    assert {"candidates", "selection", "distillation", "comparison", "evaluation", "fiftyone", "parameters"} <= set(metrics)
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
    if len(order) > 1 or "by_ap" in runs:
        assert runs["baseline_long"]["budget"]["epochs"] == runs["one_shot_long"]["budget"]["epochs"] == 2
    assert metrics["comparison"]["order_check"]["selected"] == order
    # FiftyOne's counts equal pkdkit's own COCOeval counts (same IoU rule)
    assert metrics["fiftyone"]["pkdkit_counts"] == {k: {c: v[c] for c in ("tp", "fp", "fn")}
                                                    for k, v in metrics["fiftyone"]["counts"].items()}


def test_a_failing_notebook_names_the_notebook_and_the_cell(tmp_path):
    with pytest.raises(NotebookRunError, match=r"01_data_and_teachers.ipynb failed in cell \d+ .*ValueError: unknown preset 'huge'"):
        run_notebooks("huge", tmp_path / "report", run_dir=tmp_path / "run", only=["01_data_and_teachers.ipynb"])
    assert (tmp_path / "report" / "01_data_and_teachers.ipynb").exists()  # the executed copy shows the error


def test_cli_exits_non_zero_when_a_notebook_fails(tmp_path):
    cmd = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", "tiny", "--out", str(tmp_path),
           "--run-dir", str(tmp_path / "run"), "--only", "02_teacher_selection.ipynb",
           "-p", f"data_root={tmp_path / 'nowhere'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "02_teacher_selection.ipynb failed in cell" in proc.stderr and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_dir_refuses_other_parameters_before_any_notebook_runs(demo_run, tmp_path):
    cmd = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", "tiny", "--out", str(tmp_path),
           "--run-dir", str(demo_run / "run"), "--only", "02_teacher_selection.ipynb", "-p", "strategy=greedy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "strategy: 'minimax' -> 'greedy'" in proc.stderr
    assert not (tmp_path / "02_teacher_selection.ipynb").exists()


def test_seed_study_notebook_aggregates_reports(demo_run, tmp_path):
    from pkdkit.notebooks import EXPERIMENT_NOTEBOOK, execute

    report = str(demo_run / "report")
    execute(EXPERIMENT_NOTEBOOK, tmp_path, {"reports": [report, report], "figures_dir": str(tmp_path / "figures"),
                                            "summary_path": str(tmp_path / "experiment.json")})
    study = json.loads((tmp_path / "experiment.json").read_text())
    assert set(study["runs"]) >= {"baseline", "one_shot", "progressive"}
    assert study["budgets"]["baseline"]["epochs"] == 1 and len(study["order_checks"]) == 2
    assert "| run | epochs | init |" in study["table"] and "selected was best" in study["order_table"]
    assert study["runs"]["progressive"]["AP"]["std"] == 0.0 and len(study["runs"]["progressive"]["AP"]["values"]) == 2
    assert (tmp_path / "figures" / "06_ap_over_seeds.png").exists()
    nb = nbformat.read(notebooks_dir() / EXPERIMENT_NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
