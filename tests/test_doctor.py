"""`pkdkit doctor`: each finding on a real tiny plan (torchvision detectors, pycocotools), and the rules on numbers."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from pkdkit.cli import main
from pkdkit.data import CocoDetection
from pkdkit.distill import build_distiller
from pkdkit.doctor import (REPORT, DoctorSettings, frozen_finding, level_share_finding, lr_finding, ratio_finding,
                           run_doctor, suggested_lr)
from pkdkit.models import DetectorSpec, build_detector, save_detector
from pkdkit.plan import load_plan

SIZE = dict(arch="retinanet", backbone="resnet18", fpn_channels=32, min_size=96, max_size=96,
            anchor_sizes=(8, 16, 32, 64, 128))
# A few images and steps: a 16-image dataset shows the fall of the detection loss within 3 steps on one batch.
FAST = ["--images", "4", "--batches", "1", "--steps", "3", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def checkpoints(tiny_coco, tmp_path_factory):
    """Three teachers: "misfit", whose weights do not fit the spec it names (another FPN width); "blank", untrained (RetinaNet's prior 0.01: every score under the 0.05 threshold, so it
    detects nothing, AP 0), and "detects", the same with the classifier prior at 0.5, so it makes confident
    detections everywhere and some of them hit objects (AP > 0), as a teacher that detects does."""
    labels = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"]).label_map
    spec = DetectorSpec(num_classes=labels.num_classes, **SIZE)
    root = tmp_path_factory.mktemp("doctor_teachers")
    out = {}
    for name in ("blank", "detects"):
        torch.manual_seed(1)
        model = build_detector(spec)
        if name == "detects":  # prior 0.5 for every category (rows a * K + k), background (k = 0) kept
            bias = model.head.classification_head.cls_logits.bias
            with torch.no_grad():
                bias.view(-1, labels.num_classes)[:, 1:] = 0.0
        out[name] = str(save_detector(root / f"{name}.pt", model, spec, labels))
    misfit = build_detector(replace(spec, fpn_channels=16))
    out["misfit"] = str(save_detector(root / "misfit.pt", misfit, spec, labels))
    return spec, out


def _plan_file(tiny_coco, checkpoints, folder: Path, teachers: list[str]) -> Path:
    spec, paths = checkpoints
    plan = {"name": "check", "out_dir": str(folder / "plan"), "student": spec.to_dict(),
            "data": {k: str(tiny_coco[k]) for k in ("train_images", "train_json", "val_images", "val_json")},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "device": "cpu"},
            "stages": [{"name": t, "teacher": paths[t], "loss_weight": "auto"} for t in teachers]}
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _listing(*folders: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def test_teachers_that_detect_nothing_or_do_not_load_fail_naming_the_stage_and_only_the_report_is_written(
        tiny_coco, checkpoints, tmp_path, capsys):
    plan_file = _plan_file(tiny_coco, checkpoints, tmp_path, ["detects", "blank", "misfit"])
    data = Path(tiny_coco["train_json"]).parent.parent
    (tmp_path / "plan").mkdir()  # as a plan's folder exists once it ran
    before = _listing(tmp_path, data)
    assert main(["doctor", str(plan_file), *FAST]) == 1
    out = capsys.readouterr().out
    blank = checkpoints[1]["blank"]
    assert f"FAIL teacher_ap: check stage 2 (blank): teacher {blank} has AP 0 on the first 4 validation images" in out
    assert "detects nothing here" in out and "train it longer" in out
    misfit = next(line for line in out.splitlines() if line.startswith("FAIL load: check stage 3 (misfit)"))
    assert f"teacher {checkpoints[1]['misfit']}: " in misfit and " shape (e.g. backbone.fpn." in misfit
    after = _listing(tmp_path, data)
    assert set(after) - set(before) == {str(tmp_path / "plan" / REPORT)}  # the report, nothing else,
    assert {k: after[k] for k in before} == before  # and nothing changed
    records = json.loads((tmp_path / "plan" / REPORT).read_text())
    assert [r["status"] for r in records if r["check"] == "teacher_ap"] == ["OK", "FAIL"]
    assert all(set(r) == {"check", "status", "stage", "message"} for r in records)
    # one line per finding, the lr rule the two stages share once; then the counts and the report
    assert "OK   lr: check stage 1 (detects); check stage 2 (blank); check stage 3 (misfit): lr 0.01 at batch" in out
    assert len(out.strip().splitlines()) == len(records) - 2 + 2


def test_a_healthy_plan_passes_or_only_warns(tiny_coco, checkpoints, tmp_path, capsys):
    plan_file = _plan_file(tiny_coco, checkpoints, tmp_path, ["detects"])
    assert main(["doctor", str(plan_file), *FAST]) == 0
    records = json.loads((tmp_path / "plan" / REPORT).read_text())
    status = {r["check"]: r["status"] for r in records}
    assert set(status) == {"load", "teacher_ap", "lr", "levels", "loss_ratio", "level_share", "smoke_run",
                           "teacher_frozen"}
    assert "FAIL" not in status.values()
    assert status["teacher_ap"] == status["lr"] == status["levels"] == status["teacher_frozen"] == "OK"
    assert status["loss_ratio"] == "OK"  # loss_weight auto: distillation starts at the detection loss
    smoke = next(r["message"] for r in records if r["check"] == "smoke_run")
    assert "detection loss" in smoke and "steps on one batch of 2 images at lr 0.01" in smoke



def test_plans_sharing_a_stage_check_it_once_and_each_report_names_its_own_plan(tiny_coco, checkpoints, tmp_path):
    """As notebook 3 calls it: the plans of the comparison share teachers and first stages."""
    plan = load_plan(_plan_file(tiny_coco, checkpoints, tmp_path, ["detects"]))
    other = replace(plan, name="other", out_dir=str(tmp_path / "other"), train=plan.train.replace(epochs=3))
    settings = DoctorSettings(images=4, batches=1, steps=2, batch_size=2)
    findings = run_doctor([plan, other], settings, progress=False)
    assert not findings.failed and "| status | check | stage | finding |" in findings._repr_markdown_()
    smoke = [f for f in findings if f.check == "smoke_run"]
    assert len(smoke) == 1 and smoke[0].stage == "check stage 1 (detects); other stage 1 (detects)"
    for p in (plan, other):
        records = json.loads((Path(p.out_dir) / REPORT).read_text())
        assert len(records) == len(findings)
        assert {r["stage"] for r in records} == {None, f"{p.name} stage 1 (detects)"}


def test_one_level_carrying_most_of_the_distillation_term_or_none_of_it_warns():
    # stage 2 of the demo's by_ap plan on 2 cores (issue 22): P3 carries 89% of the term and P7 nothing
    demo = level_share_finding({"p3": 1.24, "p4": 0.14, "p5": 0.008, "p6": 0.005, "p7": 0.0}, "by_ap stage 2")
    assert demo.status == "WARN" and "p3 carries more than 80%" in demo.message and "p7 is 0" in demo.message
    assert "p3 89.0%" in demo.message
    assert level_share_finding({"p3": 0.5, "p4": 0.3, "p5": 0.2}).status == "OK"
    assert level_share_finding({"p3": 0.81, "p4": 0.19}).status == "WARN"
    assert ratio_finding(50.0, 1.0).status == ratio_finding(0.001, 1.0).status == "WARN"
    assert ratio_finding(1.0, 0.3).status == ratio_finding(0.0, 0.0).status == "OK"


@pytest.mark.parametrize("lr, batch, status", [(0.01, 16, "OK"), (0.02, 16, "OK"), (0.002, 8, "WARN"),
                                               (0.01, 4, "WARN"), (0.06, 64, "OK"), (0.5, 64, "WARN")])
def test_the_learning_rate_follows_the_linear_scaling_rule(lr, batch, status):
    finding = lr_finding(lr, batch)
    assert finding.status == status
    if status == "WARN":
        assert f"try lr {suggested_lr(batch):.3g}" in finding.message
    assert suggested_lr(32) == pytest.approx(0.02)
    assert lr_finding(1.0, 2, "adamw").status == "OK"  # the rule is SGD's


def test_a_teacher_in_train_mode_or_with_gradients_fails(checkpoints):
    spec, _ = checkpoints
    distiller = build_distiller(build_detector(spec), build_detector(spec))
    assert frozen_finding(distiller).status == "OK"
    distiller.teacher.train()
    distiller.teacher.head.requires_grad_(True)
    finding = frozen_finding(distiller, "s")
    assert finding.status == "FAIL" and "parameters require gradients" in finding.message
    assert "modules are in train mode" in finding.message
