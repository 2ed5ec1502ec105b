"""Progress output: the library's step lines and text bars, the runner's streaming with elapsed time and time
left, and the tidying of executed notebooks (final bar states, relative paths). The real headless run of the
notebooks (tests/test_notebooks.py) checks the same on the terminal output of `pkdkit notebooks run`."""
from __future__ import annotations

import io
import json

import nbformat

from pkdkit.notebooks import ProgressPrinter, tidy_executed
from pkdkit.progress import MARK, bar, step


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_step_prints_one_marked_line(capsys):
    step("train r18 epoch 1/2: loss=0.5\n(extra)")
    assert capsys.readouterr().out == MARK + "train r18 epoch 1/2: loss=0.5 (extra)\n"


def test_bars_are_text_bars(capsys):
    for _ in bar(range(3), desc="predict"):
        pass
    err = capsys.readouterr().err
    assert "predict: 100%" in err and "3/3" in err


def test_only_progress_lines_are_streamed_with_elapsed_time_and_time_left():
    clock, out = Clock(), io.StringIO()
    # an earlier run: cell 1 took 10 s, cell 2 took 100 s, cell 3 took 10 s
    printer = ProgressPrinter("01_x.ipynb", 4, reference=[0, 10, 100, 10], out=out, clock=clock)
    printer.start()
    printer.cell_started(cell_index=1)
    clock.now = 20.0  # this run is twice as slow
    printer.cell_started(cell_index=2)
    clock.now = 70.0  # 50 s into a cell that should take 200 s now
    printer.write("a table\n" + MARK + "train r18 epoch 1/4: lo")
    printer.write("ss=0.5\n\r 50%|#####     | 4/8\r100%|##########| 8/8\n")
    lines = out.getvalue().splitlines()
    assert lines[0] == MARK + "running 01_x.ipynb, about 2:00 in an earlier run ..."
    # left: (200 - 50) s of this cell + 10 s x 2 of the last one = 170 s
    assert lines[1:] == [MARK + "01_x.ipynb [1:10, ~2:50 left] train r18 epoch 1/4: loss=0.5"]


def test_without_an_earlier_run_no_time_left_is_guessed():
    clock, out = Clock(), io.StringIO()
    printer = ProgressPrinter("02_y.ipynb", 3, reference=[1.0, 2.0], out=out, clock=clock)  # other cell count
    clock.now = 65
    printer.write(MARK + "stage 1/2 (r34): evaluated, AP 0.100\n")
    assert out.getvalue().splitlines()[-1] == MARK + "02_y.ipynb [1:05] stage 1/2 (r34): evaluated, AP 0.100"


def test_executed_notebooks_keep_the_final_state_of_text_bars_and_relative_paths(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="\rtrain:   0%|          | 0/8"),
                    nbformat.v4.new_output("stream", name="stdout", text="\rtrain: 100%|##########| 8/8\n"),
                    nbformat.v4.new_output("stream", name="stdout", text=MARK + "train epoch 1/1: loss=0.5\n"),
                    nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>"}),
                    nbformat.v4.new_output("stream", name="stdout", text=f"data: {tmp_path}/run/data/val.json\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="a\rb\r\nc")]
    nb.cells = [cell]
    nb.metadata["papermill"] = {"input_path": str(tmp_path / "notebooks" / "01.ipynb"),
                                "output_path": str(tmp_path / "report" / "01.ipynb")}
    (tmp_path / "report").mkdir()
    path = tmp_path / "report" / "01.ipynb"
    nbformat.write(nb, path)
    tidy_executed(path, tmp_path / "report", roots=[tmp_path / "run"])
    tidy = nbformat.read(path, as_version=4)
    outputs = tidy.cells[0].outputs
    assert [o.output_type for o in outputs] == ["stream", "display_data", "stream", "stream"]  # order kept
    assert outputs[0].text == "train: 100%|##########| 8/8\n" + MARK + "train epoch 1/1: loss=0.5\n"
    assert outputs[2].text == "data: ../run/data/val.json\n"
    assert tidy.metadata.papermill == {"input_path": "../notebooks/01.ipynb", "output_path": "01.ipynb"}
    assert outputs[3].text == "b\nc"  # each line as a terminal shows it: after its last carriage return


def test_the_time_left_comes_from_an_earlier_executed_copy_that_did_the_same_work(tmp_path):
    from pkdkit.notebooks import _reference_timings

    nb = nbformat.v4.new_notebook()
    # the run's parameters, as the runner records them in the report's metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"parameters": {"preset": "tiny", "epochs": 2,
                                                                      "run_dir": "../elsewhere", "threads": 2}}))
    nb.cells = [nbformat.v4.new_code_cell("a", metadata={"papermill": {"duration": 1.5}}),
                nbformat.v4.new_markdown_cell("b", metadata={"papermill": {"duration": None}})]
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    defaults = {"preset": "tiny", "epochs": None, "seed": 0, "run_dir": "../runs/tiny"}
    same = {"preset": "tiny", "epochs": 2, "run_dir": "/here", "seed": 0}  # paths and defaults do not matter
    assert _reference_timings("no-such-preset", tmp_path, "01_x.ipynb", same, defaults) == [1.5, 0.0]
    assert _reference_timings("no-such-preset", tmp_path, "01_x.ipynb", {**same, "epochs": 1}, defaults) is None
    assert _reference_timings("no-such-preset", tmp_path, "01_x.ipynb", {**same, "seed": 1}, defaults) is None
    assert _reference_timings("no-such-preset", tmp_path, "02_y.ipynb", same, defaults) is None
