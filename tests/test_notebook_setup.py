"""What the notebooks call instead of holding logic (`workflow.start_run` / `open_run` and the readers and texts
of notebooks 02-05), and the process state they leave alone: IPython's formatters at import, os.environ, torch's
thread count, the run-folder locks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nbformat
import pytest
import torch
from matplotlib.figure import Figure

from pkdkit import workflow
from pkdkit.evaluate import STAT_NAMES, EvalRecord
from pkdkit.files import FolderLocks, RunLockedError, run_lock
from pkdkit.models import DetectorSpec, build_detector
from pkdkit.notebooks import NotebookRunError, execute, notebooks_dir
from pkdkit.ordering import STRATEGIES, CostMatrix, Selection, select_teachers, strategies_table
from pkdkit.presets import get_preset
from pkdkit.rundir import RunDir
from pkdkit.selection import adaptation_cost


def _stats(ap: float) -> dict[str, float]:
    return {name: ap for name in STAT_NAMES}


def _record(ap: float) -> dict:
    return {"metrics": {"bbox": {"stats": _stats(ap)}}, "config": {"budget": {"init": "initial", "epochs": 1}}}


def _selection(order: list[str]) -> Selection:
    return Selection(strategy="minimax", student="student", order=order, costs=[0.1] * len(order),
                     total=0.1 * len(order), max_step=0.1, explanation="")


# ----------------------------------------------------------------------------------------------------
# The set-up call
def test_start_run_then_open_run_give_the_run_with_its_figures_and_report(tmp_path):
    figures, metrics = tmp_path / "report" / "figures", tmp_path / "report" / "metrics.json"
    started = workflow.start_run(tmp_path / "run", workflow.RunSettings(image_size=64, distill_epochs=3),
                                 figures_dir=figures, report_metrics=metrics)
    run = workflow.open_run(tmp_path / "run", figures_dir=figures, report_metrics=metrics)
    assert run.settings == started.settings and run.preset.student.min_size == 64
    assert run.data.val_json == started.data.val_json and run.distill_epochs == 3
    assert str(run).startswith(f"run {tmp_path / 'run'}: preset='tiny'") and "preset tiny: " in str(run)
    run.show(Figure(), "one.png")
    assert (figures / "one.png").read_bytes()[:4] == b"\x89PNG"
    run.report(first={"a": 1})
    run.report(second={"b": 2})
    written = json.loads(metrics.read_text())
    assert written["first"] == {"a": 1} and written["second"] == {"b": 2} and written["preset"] == "tiny"
    assert workflow.open_run(tmp_path / "run").distill_epochs == 3  # no figures folder or report: nothing saved
    with pytest.raises(workflow.RunNotStartedError, match="run notebook 01"):
        workflow.open_run(tmp_path / "elsewhere")


def test_a_pkdkit_error_in_a_notebook_fails_papermill_and_shows_one_line(tmp_path):
    import papermill as pm

    out = tmp_path / "02.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as failed:
        pm.execute_notebook(str(notebooks_dir() / "02_teacher_selection.ipynb"), str(out), kernel_name="python3",
                            parameters={"run_dir": str(tmp_path / "no_run")}, progress_bar=False, cwd=str(tmp_path))
    assert failed.value.ename == "RunNotStartedError" and "run notebook 01" in failed.value.evalue
    errors = [o for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert len(errors) == 1
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "".join(errors[0].traceback)).splitlines()  # without colours
    # IPython's hint and the message, not the frames into pkdkit
    assert shown[0] == "An exception has occurred, use %tb to see the full traceback."
    assert len(shown) == 2 and shown[1].startswith("RunNotStartedError: no run in") and "run notebook 01" in shown[1]


def test_the_notebook_runner_leaves_its_environment_alone(tmp_path):
    before = dict(os.environ)
    with pytest.raises(NotebookRunError, match="run notebook 01"):
        execute("02_teacher_selection.ipynb", tmp_path, {"run_dir": str(tmp_path / "no_run")},
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, stream=open(os.devnull, "w"))
    assert dict(os.environ) == before


# ----------------------------------------------------------------------------------------------------
# Readers and texts
def test_candidate_records_are_read_without_training_and_say_what_to_run_when_missing(tmp_path):
    workflow.save_settings(tmp_path, workflow.RunSettings())
    with pytest.raises(workflow.RunNotStartedError, match="'student' has no evaluation record.*run notebook 01"):
        workflow.candidate_records(tmp_path)
    preset = get_preset("tiny")
    names = ["student", *preset.teachers]
    for k, name in enumerate(names):
        RunDir(tmp_path).model_dir(name).mkdir(parents=True)
        RunDir(tmp_path).record(name).write_text(json.dumps(_record(0.1 * k)))
    records = workflow.candidate_records(tmp_path)
    assert list(records) == names and all(isinstance(r, EvalRecord) for r in records.values())
    assert records[names[1]].ap == pytest.approx(0.1)
    assert workflow.candidate_aps(records) == {n: pytest.approx(0.1 * k) for k, n in enumerate(names) if k}
    assert workflow.record_stats(records)[names[1]] == _stats(0.1)


def test_the_selection_reader_says_to_run_notebook_02_first(tmp_path):
    with pytest.raises(workflow.RunNotStartedError, match="run notebook 02"):
        workflow.load_run_selection(tmp_path)


def test_the_strategies_table_has_what_each_strategy_chooses():
    names = ["student", "t1", "t2"]
    matrix = CostMatrix(names=names, matrix=[[0, .3, .9], [.8, 0, .4], [.9, .8, 0]], levels=["p3"])
    aps = {"t1": .2, "t2": .4}
    rows = strategies_table(matrix, "student", aps).splitlines()
    assert rows[0] == "| strategy | order | total cost | largest step |" and len(rows) == 2 + len(STRATEGIES)
    for row, name in zip(rows[2:], STRATEGIES):
        s = select_teachers(matrix, "student", ["t1", "t2"], strategy=name, aps=aps)
        assert row == f"| {name} | {' → '.join(s.order)} | {s.total:.3f} | {s.max_step:.3f} |"
    assert "| minimax | t1 → t2 | 0.700 | 0.400 |" in rows


def test_the_orders_note_explains_a_single_teacher_selection_only():
    aps = {"t1": .2, "t2": .3}
    single = workflow.comparison_orders(_selection(["t2"]), aps)
    note = workflow.orders_note(_selection(["t2"]), single)
    assert note.startswith("**The selection chose a single teacher, `t2`**")
    assert "`by_ap`: an extra order" in note and "`reversed` starts with the same stage" in note
    alone = workflow.comparison_orders(_selection(["t1"]), aps)  # nothing weaker than t1: no extra orders
    assert "by_ap" not in workflow.orders_note(_selection(["t1"]), alone)
    assert "reversed" not in workflow.orders_note(_selection(["t1"]), alone)
    assert workflow.orders_note(_selection(["t1", "t2"]), workflow.comparison_orders(_selection(["t1", "t2"]), aps)) == ""


def test_the_order_check_in_one_sentence():
    """The sentence judges the difference against the single-run noise (`pkdkit.spread.AP_NOISE`)."""
    orders = workflow.comparison_orders(_selection(["t1", "t2"]), {"t1": .2, "t2": .3})
    records = {"progressive": _record(.30), "reversed": _record(.35), "one_shot": _record(.25)}
    text = workflow.order_check_text(workflow.order_check(records, orders))
    assert text.startswith("Selected order t1 → t2: AP 30.0. Best of the orders run: `reversed` (t2 → t1), AP 35.0")
    assert "the selected order was not the best one" in text
    records["progressive"] = _record(.40)
    assert "It is the best of the orders run" in workflow.order_check_text(workflow.order_check(records, orders))
    records["progressive"] = _record(.352)
    assert "no difference shown" in workflow.order_check_text(workflow.order_check(records, orders))
    assert workflow.order_check_text({}) == ""


def test_notebook_03_report_sections_and_plan_tables():
    summaries = {"progressive": {"rows": {"1: t1": _record(.2), "2: t2": _record(.3)}, "table": "| a |"},
                 "reversed": {"rows": {"1: t2": _record(.25)}, "table": "| b |"}}
    comparison = {"runs": {"progressive": {"order": ["t1", "t2"]}}, "order_check": {"selected": ["t1", "t2"]},
                  "records": {}}
    sections = workflow.comparison_sections(summaries, comparison)
    assert sections["distillation"] == {"progressive": {"1: t1": _stats(.2), "2: t2": _stats(.3)},
                                        "reversed": {"1: t2": _stats(.25)}}
    assert sections["comparison"] == {"runs": comparison["runs"], "order_check": comparison["order_check"]}
    assert workflow.plan_tables(summaries) == "**progressive**\n\n| a |\n\n**reversed**\n\n| b |"


def test_the_equal_budget_control_is_not_trained_when_every_order_has_one_stage(tmp_path):
    orders = workflow.comparison_orders(_selection(["t1"]), {"t1": .2, "t2": .3})
    assert workflow.stage_count(orders) == 1
    assert workflow.train_equal_budget_control(None, None, tmp_path, orders, 2) is None
    assert not RunDir(tmp_path).model_dir(workflow.BASELINE_LONG).exists()


# ----------------------------------------------------------------------------------------------------
# Process state
def test_importing_viz_leaves_ipython_formatters_alone_and_enabling_display_is_explicit():
    code = """
from IPython.core.interactiveshell import InteractiveShell
from matplotlib.figure import Figure
shell = InteractiveShell.instance()
png = shell.display_formatter.formatters["image/png"]
def registered():
    try:
        png.lookup_by_type(Figure)
        return True
    except KeyError:
        return False
from pkdkit import viz
assert not registered(), "importing viz registered a formatter"
assert viz.enable_notebook_display() and registered()
assert png(Figure())[:4] == b"\\x89PNG"
assert not viz.enable_notebook_display()  # an existing formatter wins
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_an_sgd_adaptation_cost_restores_the_thread_count():
    torch.manual_seed(0)
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=8, min_size=64, max_size=64)
    a, b = build_detector(spec).eval(), build_detector(spec).eval()
    images = [torch.rand(3, 64, 64) for _ in range(4)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        adaptation_cost(a, b, images, levels=["p3"], method="sgd", sgd_steps=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_folder_locks_are_held_by_their_table_and_released_after_an_error(tmp_path):
    locks = FolderLocks()
    with pytest.raises(RuntimeError):
        with locks.hold(tmp_path / "a") as folder:
            with locks.hold(tmp_path / "a"):  # re-entrant
                assert locks.held() == [folder]
            assert locks.held() == [folder]
            raise RuntimeError("stop")
    assert locks.held() == [] and not (tmp_path / "a" / ".pkdkit.lock").exists()
    with run_lock(tmp_path / "b"):
        with pytest.raises(RunLockedError):  # another table is another holder: refused like another process
            with FolderLocks().hold(tmp_path / "b"):
                pass
