"""Distiller, plans and staged runs with hand-over, on real torchvision detectors (tiny sizes)."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, keeps_forward_outputs, tb_scalars, tb_tags

from pkdkit.data import CocoDetection
from pkdkit.data import make_loader
from pkdkit.distill import Distiller, build_distiller, build_head_distill, calibrate_loss_weight, inherit_teacher_head
from pkdkit.engine import TrainConfig, seed_everything, train, train_detector
from pkdkit.errors import ConfigError, RunMismatchError
from pkdkit.models import (DetectorSpec, build_detector, load_checkpoint, load_detector, save_detector,
                           state_fingerprint)
from pkdkit.plan import Plan, PlanError, load_plan, reuse_stages, run_plan, shared_stages

SIZE = dict(fpn_channels=32, min_size=96, max_size=96)
ANCHORS = dict(anchor_sizes=(8, 16, 32, 64, 128))
CFG = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_iters=2,
                  grad_clip=10.0, device="cpu", progress=False)


@pytest.fixture(scope="session")
def label_map(tiny_coco):
    return CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"]).label_map


@pytest.fixture(scope="session")
def teachers(tiny_coco, label_map, tmp_path_factory):
    """Teacher checkpoints written by pkdkit itself (untrained: the mechanics do not need skill)."""
    root = tmp_path_factory.mktemp("teachers")
    n = label_map.num_classes
    specs = {
        "r34": DetectorSpec(arch="retinanet", backbone="resnet34", num_classes=n, **SIZE, **ANCHORS),
        "fcos50": DetectorSpec(arch="fcos", backbone="resnet50", num_classes=n, **SIZE, **ANCHORS),
        "frcnn": DetectorSpec(arch="fasterrcnn", backbone="resnet18", num_classes=n, **SIZE),
        "wrong_classes": DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=3, **SIZE, **ANCHORS),
        "foreign": DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=3, **SIZE, **ANCHORS),
    }
    paths = {}
    for name, spec in specs.items():
        torch.manual_seed(len(name))
        lm = label_map if spec.num_classes == n else type(label_map)(label_map.labels[:2], label_map.cat_ids[:2], label_map.names[:2])
        if name == "foreign":  # categories the data does not have
            lm = type(label_map)((1, 2), (1, 2), ("gizmo", "widget"))
        paths[name] = str(save_detector(root / f"{name}.pt", build_detector(spec), spec, lm))
    return paths


def _student_spec(label_map) -> DetectorSpec:
    return DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=label_map.num_classes, **SIZE, **ANCHORS)


def _plan_dict(tiny_coco, label_map, teachers, out: Path, stages=None) -> dict:
    return {
        "name": "test",
        "out_dir": str(out),
        "student": _student_spec(label_map).to_dict(),
        "data": {"train_images": str(tiny_coco["train_images"]), "train_json": str(tiny_coco["train_json"]),
                 "val_images": str(tiny_coco["val_images"]), "val_json": str(tiny_coco["val_json"])},
        "train": {k: v for k, v in CFG.to_dict().items() if k != "progress"},
        "stages": stages if stages is not None else [
            {"name": "r34", "teacher": teachers["r34"], "loss": "mgd", "loss_weight": "auto", "loss_ratio": 0.5},
            {"name": "fcos50", "teacher": teachers["fcos50"], "loss": "mgd", "loss_params": {"alpha_mgd": 2e-3},
             "train": {"epochs": 2}},
        ],
    }


def _write_plan(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ----------------------------------------------------------------------------------------------------
def test_distiller_adds_one_loss_per_common_level_and_never_trains_the_teacher(tiny_coco, label_map, teachers, tmp_path):
    torch.manual_seed(0)
    student = build_detector(_student_spec(label_map))
    teacher, _, _, _ = load_detector(teachers["frcnn"])  # Faster R-CNN: P2-P6, student RetinaNet: P3-P7
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = build_distiller(student, teacher, "mgd")
    assert list(distiller.losses) == ["p3", "p4", "p5", "p6"]
    assert not any(p is q for p in distiller.parameters() for q in teacher.parameters())
    assert not any(k.startswith("_teacher") for k in distiller.state_dict())
    train_ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    train(distiller, train_ds, CFG, tmp_path)
    _assert_same_state(before, teacher.state_dict())
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert not keeps_forward_outputs(student)  # the distiller's feature taps are gone


def test_distiller_forward_returns_detection_and_distillation_losses(tiny_coco, label_map, teachers):
    student = build_detector(_student_spec(label_map))
    teacher, _, _, _ = load_detector(teachers["r34"])
    distiller = build_distiller(student, teacher, "pkd", levels=["p3", "p5"])
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    images, targets = zip(*[ds[i] for i in range(2)])
    losses = distiller(list(images), list(targets))
    assert set(losses) == {"classification", "bbox_regression", "distill_p3", "distill_p5"}
    sum(losses.values()).backward()
    assert student.backbone.body.features.conv1.weight.grad is not None


def test_teacher_with_other_normalisation_is_refused(label_map, teachers):
    student = build_detector(_student_spec(label_map))
    teacher, _, _, _ = load_detector(teachers["r34"])
    teacher.transform.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="normalises images"):
        Distiller(student, teacher, {})


def test_inherit_teacher_head_copies_neck_and_head_and_reports_skips(label_map, teachers):
    student = build_detector(_student_spec(label_map))
    teacher, _, _, _ = load_detector(teachers["wrong_classes"])  # same arch, 3 classes
    report = inherit_teacher_head(student, teacher)
    assert report["copied"] and all(not k.startswith("backbone.body.") for k in report["copied"])
    assert "head.classification_head.cls_logits.weight" in report["skipped"]  # other class count
    for k in report["copied"]:
        assert torch.equal(student.state_dict()[k], teacher.state_dict()[k])
    assert "backbone.fpn.inner_blocks.0.0.weight" in report["copied"]


# ----------------------------------------------------------------------------------------------------
def test_two_stage_plan_hands_the_student_over_and_reruns_skip(tiny_coco, label_map, teachers, tmp_path):
    plan_path = _write_plan(tmp_path, _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run"))
    summary = run_plan(load_plan(plan_path), progress=False)
    run = tmp_path / "run"
    s1, s2 = run / "stage_1_r34", run / "stage_2_fcos50"
    for d in (s1, s2):
        assert {"last.pt", "student.pt", "history.json", "eval.json", "eval_results.json"} <= {p.name for p in d.iterdir()}
    assert list(summary["rows"]) == ["r34", "fcos50"]  # the paper's protocol: no trained baseline to start from
    assert "| r34 | 1 | initial (random, seed 0) + neck/head of r34" in summary["table"] and "| fcos50 | 3 |" in summary["table"]
    # stage 2 provably starts from stage 1's student
    stage1_student, _, _, _ = load_detector(s1 / "student.pt")
    stage2_config = json.loads((s2 / "eval.json").read_text())["config"]["stage"]
    assert stage2_config["init_from"] == str(s1 / "student.pt")
    assert stage2_config["init_fingerprint"] == state_fingerprint(stage1_student)
    stage1 = json.loads((s1 / "eval.json").read_text())["config"]
    assert stage1["stage"]["inherited"]["copied"] and stage2_config["inherited"] is None  # stage 1 only
    # the stage-1 weight was calibrated so that distillation starts at half the detection loss
    calibration = json.loads((s1 / "calibration.json").read_text())
    assert calibration["ratio"] == 0.5 and stage1["stage"]["loss_weight_used"] == calibration["weight"]
    assert calibration["start_ratio"] == pytest.approx(0.5)
    assert stage1["stage"]["levels_used"] == ["p3", "p4", "p5", "p6", "p7"]  # MGD on RetinaNet: P3-P7
    assert stage1["stage"]["loss_params_used"] == {"alpha_mgd": 2e-5, "lambda_mgd": 0.65}  # RetinaNet defaults
    # epochs accounting: the budget counts the student's epochs from its initialisation
    assert stage1["budget"]["epochs"] == 1 and stage2_config["index"] == 2
    assert json.loads((s2 / "eval.json").read_text())["config"]["budget"]["epochs"] == 3
    # student-only hand-over: no distillation adapters in student.pt
    assert not any(k.startswith("losses.") for k in load_checkpoint(s2 / "student.pt")["model"])
    assert json.loads((s2 / "history.json").read_text())["epochs"][-1]["epoch"] == 2
    # TensorBoard: the stages continue one global step (stage 1: steps 1-2, stage 2: 3-6), each level's term,
    # the ratio and the evaluation at each stage's end
    assert [s for s, _ in tb_scalars(s1, "loss/total")] == [2] and [s for s, _ in tb_scalars(s2, "loss/total")] == [4, 6]
    assert {f"distill/{lvl}" for lvl in ("p3", "p4", "p5", "p6", "p7")} | {"distill/ratio"} <= set(tb_tags(s1)["scalars"])
    assert [s for s, _ in tb_scalars(s1, "eval/bbox/AP")] == [2] and [s for s, _ in tb_scalars(s2, "eval/bbox/AP")] == [6]
    ratio = tb_scalars(s1, "distill/ratio")[0][1]
    assert ratio == pytest.approx(json.loads((s1 / "history.json").read_text())["epochs"][0]["monitor"]["kd_ratio"])
    # alarms: stage 1 trains as it should (none while training; its untrained 1-epoch student's AP 0 is one);
    # stage 2's 100x alpha_mgd makes distillation swamp the detection loss: gradients clipped on every step
    alarms = {name: [a["name"] for a in json.loads((d / "eval.json").read_text())["alarms"]]
              for d, name in ((s1, "r34"), (s2, "fcos50"))}
    assert [e["alarms"] for e in json.loads((s1 / "history.json").read_text())["epochs"]] == [[]]
    assert alarms["r34"] == [] or alarms["r34"] == ["ap_zero"]
    assert alarms["fcos50"][:2] == ["clipped", "clipped"]
    assert all([a["name"] for a in summary["rows"][name]["alarms"]] == alarms[name] for name in alarms)
    assert (run / "plan.yaml").exists() and json.loads((run / "summary.json").read_text())["table"] == summary["table"]
    mtimes = {p: p.stat().st_mtime for p in (s1 / "student.pt", s2 / "student.pt")}
    again = run_plan(load_plan(plan_path), progress=False)
    assert again["table"] == summary["table"]
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())


def test_kill_in_stage_two_and_resume_matches_uninterrupted_run(tiny_coco, label_map, teachers, tmp_path):
    def plan_file(name: str) -> Path:
        d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / name)
        d["stages"][1]["train"] = {"epochs": 3}
        (tmp_path / name).mkdir()
        return _write_plan(tmp_path / name, d)

    cmd = [sys.executable, "-m", "pkdkit.cli", "--quiet", "distill"]
    straight, killed = plan_file("straight"), plan_file("killed")
    subprocess.run([*cmd, str(straight)], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "stage_2_fcos50" / "history.json"
    deadline = time.time() + 300
    while not (metrics.exists() and len(json.loads(metrics.read_text())["epochs"]) >= 1):  # stage 2's epoch 1 saved
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"stage 2 never saved its first epoch (exit status {proc.poll()}, {metrics} missing)")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (metrics.parent / "student.pt").exists(), "stage 2 finished before it could be killed"
    subprocess.run([*cmd, str(killed)], check=True, capture_output=True)
    _assert_same_state(load_checkpoint(tmp_path / "straight" / "stage_2_fcos50" / "student.pt")["model"],
                       load_checkpoint(metrics.parent / "student.pt")["model"])



def test_a_stage_another_plan_trained_identically_is_linked_not_trained_again_and_ends_the_same(
        tiny_coco, label_map, teachers, tmp_path):
    from pkdkit.files import write_json
    from pkdkit.workflow import run_plans

    def plan(name: str, stages: slice = slice(None), **stage_one: object):
        d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / name)
        d["stages"] = d["stages"][stages]
        d["stages"][0].update(stage_one)
        return Plan.from_dict({**d, "name": name})

    one, two = plan("one", slice(0, 1)), plan("two")
    assert shared_stages(two, one) == 1 and shared_stages(two, plan("alone")) == 2
    assert shared_stages(two, plan("other_ratio", loss_ratio=1.0)) == 0
    assert shared_stages(two, replace(one, train=replace(one.train, epochs=2))) == 0  # another schedule
    assert shared_stages(two, replace(one, train=replace(one.train, num_workers=1))) == 1  # resume-free setting
    numerics = dict(device="cuda", amp=False, channels_last=False)  # may change the numbers: recorded, not refused
    assert shared_stages(two, replace(one, train=replace(one.train, **numerics))) == 1
    assert reuse_stages(two, [one], progress=False) == 0  # nothing finished yet: nothing to take

    run_plans([one, two], progress=False)
    for name in ("student.pt", "last.pt", "eval.json", "history.json", "calibration.json"):
        assert (two.stage_dir(0) / name).samefile(one.stage_dir(0) / name)
    handed = json.loads(two.stage_record(1).read_text())["config"]["stage"]
    assert json.loads(two.stage_record(0).read_text())["config"]["ran_on"]["device"] == "cpu"  # where it was trained
    assert handed["init_from"] == str(two.stage_student(0))
    # the same final student as a plan that trained both of its stages itself
    alone = plan("alone")
    run_plan(alone, progress=False)
    assert not alone.stage_student(0).samefile(one.stage_student(0))
    _assert_same_state(load_checkpoint(alone.stage_student(1))["model"], load_checkpoint(two.stage_student(1))["model"])
    # a later write to a linked file replaces the link: the plan it came from keeps its own
    before = one.stage_history(0).read_text()
    write_json({"epochs": []}, two.stage_history(0))
    assert one.stage_history(0).read_text() == before

# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda d, t: d.update(stages=[]), "has no stages"),
    (lambda d, t: d["stages"][0].update(loss="kld"), r"stage 1 \(r34\): unknown loss 'kld'"),
    (lambda d, t: d["stages"][1].update(teacher="/nowhere/teacher.pt"), r"stage 2 \(fcos50\): teacher checkpoint not found: /nowhere/teacher.pt"),
    (lambda d, t: d["stages"][0].update(teacher=t["foreign"], inherit_teacher_head=True),
     r"stage 1 \(r34\): inherit_teacher_head: teacher .*foreign.pt shares no category \(by name\) with the data"),
    (lambda d, t: d["stages"][0].update(levels=["p2"]), r"stage 1 \(r34\): levels \['p2'\] are not in every model"),
    (lambda d, t: d["stages"][0].update(train={"optimizer": "lamb"}), r"stage 1 \(r34\): optimizer must be"),
    (lambda d, t: d["student"].update(num_classes=3), r"student has num_classes=3 but the data"),
    (lambda d, t: d["stages"][0].update(teacher=t["frcnn"], head_loss="kd"),
     r"stage 1 \(r34\): head_loss 'kd' is for dense heads \(retinanet, fcos\); the teacher is a fasterrcnn"),
    (lambda d, t: d["stages"][0].update(head_loss="logits"), r"stage 1 \(r34\): unknown head_loss 'logits'"),
    (lambda d, t: d["stages"][1].update(head_loss="kd"),
     r"stage 2 \(fcos50\): head_loss needs the student's anchors in the teacher: the same detector \(student retinanet, teacher fcos\)"),
])
def test_invalid_plans_fail_early_with_the_stage_and_reason(tiny_coco, label_map, teachers, tmp_path, change, message):
    d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run")
    change(d, teachers)
    with pytest.raises(PlanError, match=message):
        run_plan(load_plan(_write_plan(tmp_path, d)), progress=False)
    assert not (tmp_path / "run" / "stage_1_r34").exists()


def test_plan_files_with_bad_syntax_or_keys_name_the_file(tmp_path, tiny_coco, label_map, teachers):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(PlanError, match="bad.yaml is not valid YAML"):
        load_plan(bad)
    d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run")
    d["stages"][0]["lr"] = 0.1
    with pytest.raises(PlanError, match=r"stage 1 \(r34\): unknown keys \['lr'\]"):
        load_plan(_write_plan(tmp_path, d))
    j = tmp_path / "plan.json"
    j.write_text(json.dumps(_plan_dict(tiny_coco, label_map, teachers, tmp_path / "run")))
    assert [s.name for s in load_plan(j).stages] == ["r34", "fcos50"]


def test_relative_paths_in_a_plan_are_relative_to_the_plan_file(tmp_path, tiny_coco, label_map, teachers):
    d = _plan_dict(tiny_coco, label_map, teachers, Path("run"))
    d["stages"][0]["teacher"] = "teachers/r34.pt"
    plan = load_plan(_write_plan(tmp_path, d))
    assert plan.out_dir == str(tmp_path / "run") and plan.stages[0].teacher == str(tmp_path / "teachers/r34.pt")
    assert replace(plan.stages[1]).teacher == teachers["fcos50"]


def test_torchrun_two_cpu_processes_run_a_plan(tiny_coco, label_map, teachers, tmp_path):
    import os

    d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run", stages=[
        {"name": "r34", "teacher": teachers["r34"], "loss": "mgd"}])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pkdkit.cli", "--quiet", "distill", str(_write_plan(tmp_path, d))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = tmp_path / "run" / "stage_1_r34"
    assert {"student.pt", "eval.json", "last.pt"} <= {p.name for p in stage.iterdir()}
    assert list(json.loads((tmp_path / "run" / "summary.json").read_text())["rows"]) == ["r34"]


def test_a_run_directory_refuses_a_changed_plan(tiny_coco, label_map, teachers, tmp_path):
    d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run", stages=[
        {"name": "r34", "teacher": teachers["r34"], "loss": "mse"}])
    run_plan(load_plan(_write_plan(tmp_path, d)), progress=False)
    d["stages"][0]["train"] = {"epochs": 2}
    with pytest.raises(RunMismatchError, match=r"holds a run of a different plan \(changed: stage 1 \(r34\)"):
        run_plan(load_plan(_write_plan(tmp_path, d)), progress=False)
    d["stages"][0]["train"] = {}
    d["stages"].append({"name": "fcos50", "teacher": teachers["fcos50"], "loss": "mse"})  # appending is fine
    assert list(run_plan(load_plan(_write_plan(tmp_path, d)), progress=False)["rows"]) == ["r34", "fcos50"]


# ----------------------------------------------------------------------------------------------------
# The paper's protocol and the budget of every run
def test_stage_one_starts_from_the_baselines_initialisation_and_inherits_the_head(tiny_coco, label_map, teachers, tmp_path):
    spec = _student_spec(label_map)
    train_ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True, label_map=label_map)
    val_ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    baseline = train_detector(spec, train_ds, val_ds, CFG, tmp_path / "baseline")["config"]["budget"]
    d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run", stages=[
        {"name": "r34", "teacher": teachers["r34"], "loss": "mse", "loss_weight": 0, "head_loss": "kd",
         "head_loss_weight": 2.0, "head_temperature": 2.0}])  # features off: response distillation alone
    record = run_plan(load_plan(_write_plan(tmp_path, d)), progress=False)["rows"]["r34"]["config"]
    stage = record["stage"]
    assert (stage["head_loss"], stage["head_loss_weight"], stage["head_classes_skipped"]) == ("kd", 2.0, [])
    history = json.loads((tmp_path / "run" / "stage_1_r34" / "history.json").read_text())
    assert "distill_head" in json.dumps(history)
    assert stage["init_from"] == "initial" and stage["init_fingerprint"] == baseline["init_fingerprint"]
    assert baseline == {"init": "initial (random, seed 0)", "epochs": 1, "init_fingerprint": baseline["init_fingerprint"]}
    copied = set(stage["inherited"]["copied"])
    assert "head.classification_head.cls_logits.weight" in copied and "backbone.fpn.layer_blocks.0.0.weight" in copied
    assert not any(k.startswith("backbone.body.") for k in copied)
    assert stage["inherited"]["skipped"] == []  # ResNet-34 and -18 have the same widths: everything fits
    assert record["budget"] == {"init": f"initial (random, seed 0) + neck/head of r34 ({len(copied)} tensors)",
                                "epochs": 1}
    assert stage["calibration"] == {"weight": 0.0}  # weight 0: nothing to measure


def test_fine_tuning_a_checkpoint_is_named_and_counts_its_epochs(tiny_coco, label_map, teachers, tmp_path):
    spec = _student_spec(label_map)
    ckpt = save_detector(tmp_path / "trained.pt", build_detector(spec), spec, label_map,
                         config={"budget": {"init": "initial (random, seed 0)", "epochs": 12}})
    d = _plan_dict(tiny_coco, label_map, teachers, tmp_path / "run", stages=[
        {"name": "r34", "teacher": teachers["r34"], "loss": "mse", "loss_weight": 0.5}])
    d["student_init"] = str(ckpt)
    rows = run_plan(load_plan(_write_plan(tmp_path, d)), progress=False)["rows"]
    assert list(rows) == ["baseline", "r34"]
    init = f"fine-tune of {tmp_path.name}/trained.pt"
    assert rows["baseline"]["config"]["budget"] == {"init": init, "epochs": 12}
    assert rows["r34"]["config"]["budget"] == {"init": init, "epochs": 13}
    stage = rows["r34"]["config"]["stage"]
    assert stage["inherited"] is None and stage["loss_weight_used"] == 0.5
    assert stage["calibration"]["start_ratio"] == pytest.approx(0.5 * stage["calibration"]["distillation"]
                                                                / stage["calibration"]["detection"])


def test_calibration_sets_the_start_ratio_and_changes_no_state(tiny_coco, label_map, teachers):
    seed_everything(0)
    distiller = build_distiller(build_detector(_student_spec(label_map)), load_detector(teachers["r34"])[0], "mgd")
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True, label_map=label_map)
    batches = list(make_loader(ds, 4, shuffle=True, seed=0))[:2]
    state = {k: v.clone() for k, v in distiller.state_dict().items()}
    rng = torch.get_rng_state()
    auto = calibrate_loss_weight(distiller, batches, ratio=2.0)
    _assert_same_state(state, distiller.state_dict())  # BatchNorm statistics included
    assert torch.equal(rng, torch.get_rng_state()) and distiller.weight == 1.0
    assert auto["weight"] == pytest.approx(2.0 * auto["detection"] / auto["distillation"])
    distiller.weight = auto["weight"]
    assert calibrate_loss_weight(distiller, batches)["start_ratio"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_loss_weight(distiller, [])


def test_distiller_takes_the_authors_levels_and_weights_for_the_students_family(label_map, teachers):
    n = label_map.num_classes
    frcnn_teacher = load_detector(teachers["frcnn"])[0]  # P2-P6
    mask_student = build_detector(DetectorSpec(arch="maskrcnn", backbone="resnet18", num_classes=n, **SIZE))
    two_stage = build_distiller(mask_student, frcnn_teacher, "mgd")
    assert list(two_stage.losses) == ["p2", "p3", "p4", "p5"]  # the released Mask R-CNN config: P2-P5
    assert (two_stage.losses["p2"].alpha_mgd, two_stage.losses["p2"].lambda_mgd) == (5e-7, 0.45)
    one_stage = build_distiller(build_detector(_student_spec(label_map)), load_detector(teachers["r34"])[0], "mgd",
                                {"lambda_mgd": 0.5})
    assert list(one_stage.losses) == ["p3", "p4", "p5", "p6", "p7"]
    assert (one_stage.losses["p3"].alpha_mgd, one_stage.losses["p3"].lambda_mgd) == (2e-5, 0.5)
    cwd = build_distiller(mask_student, frcnn_teacher, "cwd")
    assert list(cwd.losses) == ["p2", "p3", "p4", "p5", "p6"] and cwd.losses["p2"].loss_weight == 10.0


# ----------------------------------------------------------------------------------------------------
# Response distillation of dense heads
def test_head_distillation_uses_the_name_matched_classes_and_never_trains_the_teacher(tiny_coco, label_map, teachers):
    torch.manual_seed(0)
    student = build_detector(_student_spec(label_map))
    teacher, _, t_map, _ = load_detector(teachers["wrong_classes"])  # 3 classes: the data's first 2 categories
    head = build_head_distill(student, teacher, "kd", 1.0, 2.0, label_map, t_map)
    assert (head.student_cols, head.teacher_cols, head.skipped) == ([1, 2], [1, 2], list(label_map.names[2:]))
    distiller = build_distiller(student, teacher, "mse", levels=["p3"], head=head)
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    images, targets = zip(*[ds[i] for i in range(2)])
    losses = distiller(list(images), list(targets))
    assert set(losses) == {"classification", "bbox_regression", "distill_p3", "distill_head"}
    losses["distill_head"].backward()
    grad = student.head.classification_head.cls_logits.weight.grad.view(-1, label_map.num_classes, *student.head.classification_head.cls_logits.weight.shape[1:])
    assert grad[:, 1:3].abs().sum() > 0 and grad[:, 3:].abs().sum() == 0 and grad[:, 0].abs().sum() == 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not student.head.classification_head._forward_hooks  # the hook is removed after each forward
    same = build_head_distill(student, copy.deepcopy(student))  # same classes without label maps: all but background
    assert same.student_cols == list(range(1, label_map.num_classes))


def test_head_distillation_is_refused_for_two_stage_detectors_and_other_anchors(label_map, teachers):
    student = build_detector(_student_spec(label_map))
    with pytest.raises(ConfigError, match="is for dense heads .*the teacher is a fasterrcnn"):
        build_head_distill(student, load_detector(teachers["frcnn"])[0])
    with pytest.raises(ConfigError, match="same anchors/locations.*anchors per location 9 vs 1"):
        build_head_distill(student, build_detector(replace(_student_spec(label_map), arch="fcos")))
