"""The real-data path: COCO-2017-layout data with torchvision's COCO detectors as teachers, end to end.

No downloads: `conftest.torch_home` holds stand-in files with torchvision's exact weight file names
(random weights of the right architectures), and `conftest.make_coco_layout` writes synthetic images
under COCO 2017's folder and file names with real COCO category ids and names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pkdkit.notebooks import NOTEBOOKS

TEACHERS = {"retinanet_r50": "RetinaNet_ResNet50_FPN_Weights.COCO_V1", "fcos_r50": "FCOS_ResNet50_FPN_Weights.COCO_V1",
            "retinanet_r50_v2": "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"}


@pytest.fixture(scope="module")
def coco_run(coco_root, torch_home, tmp_path_factory):
    """`pkdkit notebooks run --preset coco` on the COCO-layout folder, 1 epoch everywhere, 96 px images
    (the reversed plan is left out: it is the progressive plan's mechanics in another order)."""
    root = tmp_path_factory.mktemp("coco_run")
    env = {**os.environ, "TORCH_HOME": str(torch_home), "FIFTYONE_DATABASE_DIR": str(root / "fiftyone_db")}
    cmd = [sys.executable, "-m", "pkdkit.cli", "notebooks", "run", "--preset", "coco", "--device", "cpu",
           "--out", str(root / "report"), "--run-dir", str(root / "run"), "-p", f"data_root={coco_root}",
           "-p", "epochs=1", "-p", "distill_epochs=1", "-p", "image_size=96", "-p", "run_reversed=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return root


def test_coco_preset_runs_every_notebook_with_torchvision_teachers(coco_run):
    report = coco_run / "report"
    assert all((report / name).exists() for name in NOTEBOOKS)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["preset"] == "coco" and metrics["parameters"]["image_size"] == 96
    # notebook 01: the baseline student trained on the data, the three torchvision teachers evaluated on it
    assert set(metrics["candidates"]) == {"student", *TEACHERS}
    teacher_eval = json.loads((coco_run / "run" / "models" / "fcos_r50" / "eval.json").read_text())
    assert teacher_eval["config"]["weights"] == TEACHERS["fcos_r50"]
    assert len(teacher_eval["config"]["matched_categories"]) == 80  # COCO's categories, matched by name
    # notebook 02: the cost matrix covers the student and every teacher, the order uses teachers only
    selection = metrics["selection"]
    assert set(selection["matrix"]["names"]) == {"student", *TEACHERS}
    assert selection["order"] and set(selection["order"]) <= set(TEACHERS)
    # notebook 03: every plan ran each stage on a torchvision teacher at the overridden size
    distillation = metrics["distillation"]
    assert "progressive" in distillation and metrics["comparison"]["runs"]["progressive"]["order"] == selection["order"]
    for name, rows in distillation.items():
        plan = yaml.safe_load((coco_run / "run" / "distill" / name / "plan.yaml").read_text())
        assert list(rows) == [s["name"] for s in plan["stages"]] and plan["student_init"] is None  # paper protocol
        assert all(s["teacher"] == TEACHERS[s["name"]] and s["teacher_size"] == [96, 96] for s in plan["stages"])
        assert plan["student"]["num_classes"] == 81 and plan["student"]["min_size"] == 96  # 80 categories + bg
        assert all(0.0 <= r["AP"] <= 1.0 or r["AP"] == -1.0 for r in rows.values())
    # notebook 05: COCO evaluation of the baseline and each plan's final student
    assert {"baseline", "progressive", "one_shot"} <= set(metrics["evaluation"])
    assert "counts" in metrics["fiftyone"]


def test_a_reference_models_record_is_reused_only_for_the_same_weights_size_and_data(use_torch_home, coco_root, tmp_path):
    """A torchvision teacher's evaluation depends on its weights, input size and the validation data only: a
    record made with the same is returned as it is, one made at another size is evaluated again (not stale)."""
    from pkdkit.data import CocoDetection
    from pkdkit.workflow import _evaluate_reference

    val = CocoDetection(coco_root / "val2017", coco_root / "annotations" / "instances_val2017.json")
    record_file = tmp_path / "eval.json"
    first = _evaluate_reference(TEACHERS["retinanet_r50"], (64, 64), val, tmp_path, "cpu", False)
    stamp = record_file.stat().st_mtime_ns
    assert _evaluate_reference(TEACHERS["retinanet_r50"], (64, 64), val, tmp_path, "cpu", False) == first
    assert record_file.stat().st_mtime_ns == stamp
    other = _evaluate_reference(TEACHERS["retinanet_r50"], (96, 96), val, tmp_path, "cpu", False)
    assert first["config"]["spec"]["min_size"] == 64 and other["config"]["spec"]["min_size"] == 96
    assert json.loads(record_file.read_text())["config"]["spec"]["min_size"] == 96


# ----------------------------------------------------------------------------------------------------
# One loader for model references
def test_one_loader_reads_torchvision_weight_names_and_checkpoints(use_torch_home, tmp_path):
    from pkdkit.data import LabelMap
    from pkdkit.models import DetectorSpec, build_detector, is_torchvision_weight, load_model, model_meta, save_detector

    name = TEACHERS["fcos_r50"]
    assert is_torchvision_weight(name) and not is_torchvision_weight(str(tmp_path / "model.pt"))
    model, spec, label_map = load_model(name)
    assert (spec.arch, spec.backbone, spec.num_classes, spec.min_size, spec.max_size) == ("fcos", "resnet50", 91, 800, 1333)
    assert label_map.to_cat_id(18) == 18 and label_map.name_of_label(18) == "dog"
    assert model_meta(name) == (spec, label_map)
    small, small_spec, _ = load_model(name, size=(128, 160))
    assert small.transform.min_size == (128,) and small.transform.max_size == 160 and small_spec.min_size == 128
    own = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=64)
    lm = LabelMap((1, 2), (5, 9), ("dog", "cat"))
    path = save_detector(tmp_path / "model.pt", build_detector(own), own, lm)
    model, spec, loaded = load_model(path, size=(96, 96))
    assert spec.name == own.name and loaded == lm and model.transform.min_size == (96,)
    assert model_meta(path) == (own, lm)


def test_a_cached_weight_file_that_does_not_fit_names_the_file_and_the_weight(tmp_path, monkeypatch):
    import torch
    import torchvision

    from pkdkit.models import CheckpointError, cached_weight_file, load_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_weight(TEACHERS["fcos_r50"])
    path = cached_weight_file(weights)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)  # another architecture under FCOS's file name
    with pytest.raises(CheckpointError, match=rf"cached weight file {path} does not fit {TEACHERS['fcos_r50']}.*Missing key"):
        load_model(TEACHERS["fcos_r50"])
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{path} cannot be read as {TEACHERS['fcos_r50']}.*Delete it"):
        load_model(TEACHERS["fcos_r50"])


def test_a_data_root_without_the_expected_folders_says_what_is_missing(tmp_path):
    from pkdkit import workflow
    from pkdkit.data import DataError
    from pkdkit.presets import get_preset

    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DataError, match=r"lacks val2017, annotations/instances_train2017.json, annotations/"
                                        r"instances_val2017.json.*found \['annotations/', 'train2017/'\]"):
        workflow.prepare_data(get_preset("coco"), tmp_path / "run", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        workflow.prepare_data(get_preset("coco"), tmp_path / "run", str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------
# Your own data with COCO teachers
@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_head_inheritance_copies_the_classifier_rows_of_categories_matched_by_name(arch):
    import torch

    from pkdkit.data import LabelMap
    from pkdkit.distill import inherit_teacher_head
    from pkdkit.models import DetectorSpec, build_detector

    size = dict(arch=arch, backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)
    teacher_labels = LabelMap((1, 2, 3, 4), (1, 3, 18, 47), ("person", "car", "dog", "cup"))
    student_labels = LabelMap((1, 2, 3), (10, 20, 30), ("Dog", "gizmo", "Person"))  # own ids, own order
    torch.manual_seed(0)
    teacher = build_detector(DetectorSpec(num_classes=5, **size))
    student = build_detector(DetectorSpec(num_classes=4, **size))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit_teacher_head(student, teacher, student_labels, teacher_labels)
    assert report["matched_classes"] == ["Dog", "Person"] and report["skipped_classes"] == ["gizmo"]
    s, t = student.state_dict(), teacher.state_dict()
    pairs = {0: 0, 1: 3, 3: 1}  # student label <- teacher label (0: background)
    if arch == "retinanet":
        name = "head.classification_head.cls_logits.weight"
        rows = lambda w, k, label: w[label::k]  # (A * K, C, 3, 3), row a * K + k  # noqa: E731
    else:
        name = "roi_heads.box_predictor.bbox_pred.weight"
        rows = lambda w, k, label: w[label * 4:(label + 1) * 4]  # (K * 4, C), rows k * 4 .. k * 4 + 3  # noqa: E731
    assert name in report["copied"]
    for mine, theirs in pairs.items():
        assert torch.equal(rows(s[name], 4, mine), rows(t[name], 5, theirs))
    assert torch.equal(rows(s[name], 4, 2), rows(before[name], 4, 2))  # gizmo keeps the student's own row
    assert not any(k.startswith("backbone.body.") for k in report["copied"])
    assert torch.equal(s["backbone.fpn.layer_blocks.0.0.weight"], t["backbone.fpn.layer_blocks.0.0.weight"])


def test_own_five_category_coco_subset_distils_from_a_torchvision_teacher(use_torch_home, tmp_path):
    """A dataset with five of COCO's categories under its own ids and spelling: the student keeps the
    dataset's labels (6 classes), the 91-class FCOS teacher runs at its own input size, stage 1 inherits the
    classifier rows of the five categories by name, and the teacher evaluates on the data through the names."""
    from pkdkit import workflow
    from pkdkit.evaluate import evaluate_detector
    from pkdkit.models import DetectorSpec, load_detector, load_model
    from pkdkit.plan import Plan, Stage, run_plan
    from pkdkit.presets import get_preset
    from conftest import make_coco_layout

    cats = [{"id": i + 1, "name": n} for i, n in enumerate(("Dog", "person", "CAR", "cup", "clock"))]
    root = make_coco_layout(tmp_path / "mydata", n_train=4, n_val=4, size=96, categories=cats, layout="plain")
    data = workflow.prepare_data(get_preset("coco"), tmp_path / "run", str(root))
    val = data.val_dataset()
    assert val.label_map.cat_ids == (1, 2, 3, 4, 5) and val.label_map.num_classes == 6
    student = DetectorSpec(arch="fcos", backbone="resnet18", num_classes=6, fpn_channels=256, min_size=96, max_size=96)
    train = get_preset("coco").distill.replace(epochs=1, batch_size=4, device="cpu", progress=False, warmup_iters=1)
    plan = Plan(name="own", student=student, data=data, out_dir=str(tmp_path / "run"), train=train,
                stages=[Stage(name="fcos", teacher=TEACHERS["fcos_r50"], inherit_teacher_head=True, teacher_size=[160, 160])])
    summary = run_plan(plan, progress=False)
    assert list(summary["rows"]) == ["fcos"]
    stage = summary["rows"]["fcos"]["config"]["stage"]
    assert len(stage["inherited"]["matched_classes"]) == 5 and stage["inherited"]["skipped_classes"] == []
    assert stage["teacher_spec"]["num_classes"] == 91
    model, spec, label_map, _ = load_detector(tmp_path / "run" / "stage_1_fcos" / "student.pt")
    assert spec.num_classes == 6 and label_map == val.label_map
    teacher, _, teacher_labels = load_model(TEACHERS["fcos_r50"], size=(96, 96))
    matched = teacher_labels.onto(val.label_map)
    assert dict(zip(matched.names, matched.cat_ids)) == {"person": 2, "car": 3, "dog": 1, "cup": 4, "clock": 5} or \
        sorted(matched.cat_ids) == [1, 2, 3, 4, 5]
    record = evaluate_detector(teacher, val, matched, device="cpu", progress=False)
    assert record["num_images"] == 4


def test_data_without_coco_categories_still_distils_features_but_refuses_head_inheritance(use_torch_home, tiny_coco, tmp_path):
    import torch

    from pkdkit.data import CocoDetection
    from pkdkit.distill import build_distiller
    from pkdkit.models import DetectorSpec, build_detector, load_model
    from pkdkit.data import DataConfig
    from pkdkit.plan import Plan, PlanError, Stage, validate_plan

    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)  # circle, square, ...
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=ds.label_map.num_classes, fpn_channels=32,
                        min_size=96, max_size=96, anchor_sizes=(8, 16, 32, 64, 128))
    teacher, _, _ = load_model(TEACHERS["retinanet_r50"], size=(96, 96))
    distiller = build_distiller(build_detector(spec), teacher, "mgd")
    images, targets = zip(*[ds[i] for i in range(2)])
    losses = distiller(list(images), list(targets))
    assert {f"distill_p{i}" for i in range(3, 8)} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    data = DataConfig(str(tiny_coco["train_images"]), str(tiny_coco["train_json"]), str(tiny_coco["val_images"]),
                      str(tiny_coco["val_json"]))
    plan = Plan(name="p", student=spec, data=data, out_dir=str(tmp_path),
                stages=[Stage(name="coco", teacher=TEACHERS["retinanet_r50"])])
    validate_plan(plan, ds.label_map)  # feature distillation: no category needs to be shared
    plan.stages[0].inherit_teacher_head = True
    with pytest.raises(PlanError, match=r"stage 1 \(coco\): inherit_teacher_head: teacher RetinaNet_ResNet50_FPN_"
                                        r"Weights.COCO_V1 shares no category \(by name\) with the data"):
        validate_plan(plan, ds.label_map)


# ----------------------------------------------------------------------------------------------------
# Teacher and student at different input sizes
def test_a_teacher_at_twice_the_students_size_sees_the_batch_at_its_size_and_its_maps_come_back_at_the_students(tiny_coco):
    import torch

    from pkdkit.data import CocoDetection
    from pkdkit.distill import build_distiller
    from pkdkit.features import backbone_features, extract_features, features_at, input_scale
    from pkdkit.models import DetectorSpec, build_detector
    from pkdkit.selection import cost_matrix

    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=ds.label_map.num_classes, fpn_channels=32,
                        min_size=96, max_size=96, anchor_sizes=(8, 16, 32, 64, 128))
    torch.manual_seed(0)
    student = build_detector(spec)
    teacher = build_detector(DetectorSpec(**{**spec.to_dict(), "backbone": "resnet34", "min_size": 192, "max_size": 192}))
    assert input_scale(teacher, student) == 2.0
    seen = []
    hook = teacher.backbone.register_forward_pre_hook(lambda _m, inp: seen.append(tuple(inp[0].shape)))
    try:
        distiller = build_distiller(student, teacher, "mse")
        images, targets = zip(*[ds[i] for i in range(2)])
        losses = distiller(list(images), list(targets))
    finally:
        hook.remove()
    student.eval()
    with torch.no_grad():
        s_feats, batch = extract_features(student, list(images))
    assert seen[-1][-2:] == (2 * batch.tensors.shape[-2], 2 * batch.tensors.shape[-1])
    assert all(torch.isfinite(v) for v in losses.values()) and "distill_p3" in losses
    sizes = {k: tuple(v.shape[-2:]) for k, v in s_feats.items()}
    with torch.no_grad():
        t_feats = features_at(teacher.eval(), batch.tensors, 2.0, sizes)
        same = features_at(student, batch.tensors, 1.0, sizes)
    assert {k: tuple(v.shape[-2:]) for k, v in t_feats.items()} == sizes
    for k, v in backbone_features(student, batch.tensors).items():
        assert torch.equal(v, same[k])
    # teacher selection compares models of different input sizes the same way
    matrix = cost_matrix({"student": student, "teacher": teacher}, [ds[i][0] for i in range(8)], batch_size=4)
    assert matrix.names == ["student", "teacher"] and 0.0 <= matrix.cost("student", "teacher") <= 1.5


# ----------------------------------------------------------------------------------------------------
# A deployable student
@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory):
    """A student whose classifier prior is 0.5, so that an untrained model makes many detections."""
    import torch

    from pkdkit.data import LabelMap
    from pkdkit.models import DetectorSpec, build_detector, save_detector

    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=4, fpn_channels=32, min_size=96, max_size=96,
                        anchor_sizes=(8, 16, 32, 64, 128))
    torch.manual_seed(0)
    model = build_detector(spec)
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    path = tmp_path_factory.mktemp("export") / "student.pt"
    return save_detector(path, model, spec, LabelMap((1, 2, 3), (2, 5, 9), ("a", "b", "c")))


def test_export_torchvision_state_dict_loads_into_torchvisions_own_classes_with_the_same_detections(student_checkpoint, tmp_path):
    import torch

    from pkdkit.cli import main
    from pkdkit.models import load_model

    out = tmp_path / "student.pth"
    assert main(["export", str(student_checkpoint), "--format", "torchvision", "--out", str(out)]) == 0
    meta = json.loads(out.with_name("student.pth.json").read_text())
    assert "pkdkit" not in meta["build"] and meta["label_map"]["cat_ids"] == [2, 5, 9]
    namespace: dict = {}
    exec(meta["build"], namespace)  # torchvision only
    tv = namespace["model"]
    tv.load_state_dict(torch.load(out, weights_only=True))
    ours = load_model(student_checkpoint)[0].eval()
    images = [torch.rand(3, 80, 96), torch.rand(3, 96, 72)]
    with torch.no_grad():
        expected, got = ours(images), tv.eval()(images)
    assert all(len(e["boxes"]) > 10 for e in expected)
    for e, g in zip(expected, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(e[key], g[key]), key


def test_export_onnx_matches_the_pytorch_model(student_checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import torch

    from pkdkit.cli import main
    from pkdkit.models import load_model

    out = tmp_path / "student.onnx"
    assert main(["export", str(student_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_model(student_checkpoint)[0].eval()
    image = torch.rand(3, 72, 96)  # another size than the export's example
    boxes, scores, labels = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = model([image])[0]
    assert len(boxes) == len(expected["boxes"]) > 10
    # the same detections, in an order that may differ where scores tie within float error
    ours = torch.cat([expected["boxes"], expected["scores"][:, None], expected["labels"][:, None].float()], 1)
    theirs = torch.cat([torch.from_numpy(boxes), torch.from_numpy(scores)[:, None],
                        torch.from_numpy(labels)[:, None].float()], 1)
    distance = torch.cdist(theirs, ours, p=float("inf"))  # largest difference of box, score or label
    assert distance.min(1).values.max() < 1e-3 and distance.min(0).values.max() < 1e-3


# ----------------------------------------------------------------------------------------------------
# Several GPUs from the notebooks: training steps as torchrun subprocesses (2 CPU processes on gloo here)
def test_gpus_2_distils_under_torchrun_streaming_its_output_and_a_failing_step_raises_its_error(tiny_coco, tmp_path, capfd):
    from pkdkit import workflow
    from pkdkit.engine import TrainConfig
    from pkdkit.launch import LaunchError, train_detector_distributed
    from pkdkit.models import DetectorSpec
    from pkdkit.data import DataConfig
    from pkdkit.plan import Plan, Stage

    data = DataConfig(str(tiny_coco["train_images"]), str(tiny_coco["train_json"]), str(tiny_coco["val_images"]),
                      str(tiny_coco["val_json"]))
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=6, fpn_channels=32, min_size=96, max_size=96,
                        anchor_sizes=(8, 16, 32, 64, 128))
    cfg = TrainConfig(epochs=1, batch_size=4, optimizer="adamw", lr=1e-3, warmup_iters=1, device="cpu")
    from pkdkit.data import CocoDetection
    from pkdkit.models import build_detector, save_detector

    teacher = DetectorSpec(**{**spec.to_dict(), "backbone": "resnet34"})  # untrained: the mechanics need no skill
    save_detector(tmp_path / "teacher" / "model.pt", build_detector(teacher), teacher,
                  CocoDetection(data.val_images, data.val_json).label_map)
    plan = Plan(name="p", student=spec, data=data, out_dir=str(tmp_path / "plan"), train=cfg,
                stages=[Stage(name="t", teacher=str(tmp_path / "teacher" / "model.pt"), loss="mse")])
    summaries = workflow.run_plans([plan], progress=True, gpus=2)
    assert list(summaries["p"]["rows"]) == ["t"]
    out = capfd.readouterr().out
    assert "--nproc_per_node 2 -m pkdkit.launch" in out and "stage 1/1 t" in out  # the subprocess's progress
    # a training step (teachers, baseline) that fails on a rank fails here with the rank's error
    with pytest.raises(LaunchError, match=r"failed with exit code 1: ConfigError: spec has num_classes=3 but the data .*instances_train"
                                          r".json has 5 categories(.|\n)*last lines of its output(.|\n)*Traceback"):
        train_detector_distributed(DetectorSpec(**{**spec.to_dict(), "num_classes": 3}), data, cfg, tmp_path / "bad", 2)


def test_cli_select_takes_torchvision_weight_names_as_teachers(use_torch_home, tiny_coco, tmp_path):
    from pkdkit.cli import main
    from pkdkit.data import CocoDetection
    from pkdkit.models import DetectorSpec, build_detector, save_detector
    from pkdkit.ordering import load_selection

    label_map = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"]).label_map
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=6, fpn_channels=32, min_size=96, max_size=96)
    student = save_detector(tmp_path / "student.pt", build_detector(spec), spec, label_map)
    assert main(["--quiet", "select", "--data", str(tiny_coco["root"]), "--student", str(student), "--teachers",
                 f"fcos={TEACHERS['fcos_r50']}", "--images", "4", "--out", str(tmp_path / "sel"),
                 "--plan", str(tmp_path / "plan.yaml")]) == 0
    selection, matrix, config = load_selection(tmp_path / "sel" / "selection.json")
    assert selection.order == ["fcos"] and matrix.names == ["student", "fcos"]
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["stages"][0]["teacher"] == TEACHERS["fcos_r50"]
