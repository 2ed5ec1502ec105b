"""The command line: synth, evaluate and select end to end (train and distill run in test_engine/test_distill)."""
from __future__ import annotations

import json

import torch

from pkdkit.cli import main
from pkdkit.data import CocoDetection
from pkdkit.models import DetectorSpec, build_detector, save_detector
from pkdkit.plan import load_plan

SIZE = dict(fpn_channels=32, min_size=96, max_size=96, anchor_sizes=(8, 16, 32, 64, 128))


def test_synth_writes_the_same_dataset_for_the_same_seed(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["synth", "--out", str(tmp_path / name), "--train", "4", "--val", "2", "--size", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.split("}\n")[0] + "}")
    assert printed["train_json"].endswith("instances_train.json")
    for split in ("train", "val"):
        a = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_bytes()
        assert a == (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_bytes()


def _checkpoints(tiny_coco, tmp_path) -> dict[str, str]:
    lm = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"]).label_map
    paths = {}
    for name, arch, backbone in (("student", "retinanet", "resnet18"), ("t34", "fcos", "resnet34"),
                                 ("t50", "retinanet", "resnet50")):
        torch.manual_seed(len(name))
        spec = DetectorSpec(arch=arch, backbone=backbone, num_classes=lm.num_classes, **SIZE)
        paths[name] = str(save_detector(tmp_path / name / "model.pt", build_detector(spec), spec, lm))
    return paths


def test_evaluate_prints_a_table_and_writes_metrics_per_checkpoint(tiny_coco, tmp_path, capsys):
    ckpts = _checkpoints(tiny_coco, tmp_path)
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--data", str(tiny_coco["root"]), ckpts["student"], ckpts["t34"],
                 "--out", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| student |" in table and "| t34 |" in table
    record = json.loads((out / "student.json").read_text())
    assert record["config"] == {} and len(record["metrics"]["bbox"]["stats"]) == 12
    assert (out / "t34_results.json").exists()


def test_select_writes_selection_json_and_heatmap(tiny_coco, tmp_path, capsys):
    ckpts = _checkpoints(tiny_coco, tmp_path)
    out = tmp_path / "selection"
    assert main(["--quiet", "select", "--data", str(tiny_coco["root"]), "--student", ckpts["student"],
                 "--teachers", f"t34={ckpts['t34']}", f"t50={ckpts['t50']}", "--ap", "t34=0.2", "t50=0.3",
                 "--out", str(out), "--images", "8", "--plan", str(tmp_path / "plan.yaml")]) == 0
    saved = json.loads((out / "selection.json").read_text())
    assert saved["order"][-1] == "t50" and set(saved["cost_matrix"]["names"]) == {"student", "t34", "t50"}
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert "selection written to" in capsys.readouterr().out
    plan = load_plan(tmp_path / "plan.yaml")  # the selection becomes a runnable plan
    assert [s.name for s in plan.stages] == saved["order"] and plan.stages[-1].teacher == ckpts["t50"]
    assert plan.student_init is None and plan.student.arch == "retinanet"  # the paper's protocol
    assert plan.inherits(0) and not any(plan.inherits(k) for k in range(1, len(plan.stages)))


def test_inspect_before_notebook_3_says_what_to_run_first_in_one_line(tiny_coco, tmp_path):
    import os
    import subprocess
    import sys

    from pkdkit import workflow

    workflow.save_settings(tmp_path / "run", workflow.RunSettings(data_root=str(tiny_coco["root"])))
    proc = subprocess.run([sys.executable, "-m", "pkdkit.cli", "inspect", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0] == (f"pkdkit inspect: error: no comparison in {tmp_path / 'run'}: run notebook 03 "
                        "(staged distillation) first")
