"""Detector factory, feature taps and checkpoints on real torchvision detectors (tiny sizes)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import keeps_forward_outputs
from torchvision.models import detection

from pkdkit.data import LabelMap
from pkdkit.features import FeatureTap, common_levels, extract_features, feature_levels
from pkdkit.models import (BACKBONES, CheckpointError, DetectorSpec, atomic_save, build_detector, load_checkpoint,
                           load_detector, save_detector, torchvision_label_map)

TINY = dict(num_classes=4, fpn_channels=32, min_size=64, max_size=64)
ONE_STAGE_ANCHORS = (8, 16, 32, 64, 128)


def _spec(arch: str, backbone: str = "resnet18", **kw) -> DetectorSpec:
    anchors = ONE_STAGE_ANCHORS if arch in ("retinanet", "fcos") else (16, 32, 64, 128, 256)
    return DetectorSpec(arch=arch, backbone=backbone, anchor_sizes=anchors, **{**TINY, **kw})


def _batch(n: int = 2, masks: bool = False):
    images = [torch.rand(3, 64, 64) for _ in range(n)]
    targets = []
    for _ in range(n):
        t = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([2])}
        if masks:
            m = torch.zeros(1, 64, 64, dtype=torch.uint8)
            m[0, 8:36, 8:40] = 1
            t["masks"] = m
        targets.append(t)
    return images, targets


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn", "maskrcnn"])
def test_every_arch_trains_and_predicts_with_named_levels(arch):
    torch.manual_seed(0)
    model = build_detector(_spec(arch))
    images, targets = _batch(masks=arch == "maskrcnn")
    with FeatureTap(model) as tap:
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    expected = ["p3", "p4", "p5", "p6", "p7"] if arch in ("retinanet", "fcos") else ["p2", "p3", "p4", "p5", "p6"]
    assert list(tap.features) == expected
    assert tap.features["p3"].shape == (2, 32, 8, 8)  # stride 8 of the 64 px batch
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert {"boxes", "scores", "labels"} <= set(out[0])
    assert ("masks" in out[0]) == (arch == "maskrcnn")


@pytest.mark.parametrize("backbone", sorted(set(BACKBONES) - {"resnet18"}))
def test_every_backbone_builds_an_fpn_with_the_same_level_names(backbone):
    model = build_detector(_spec("retinanet", backbone))
    levels = feature_levels(model, size=64)
    assert levels == {f"p{i}": 32 for i in range(3, 8)}


def test_retinanet_student_and_faster_rcnn_teacher_share_p3_to_p6():
    student = feature_levels(build_detector(_spec("retinanet")))
    teacher = feature_levels(build_detector(_spec("fasterrcnn", "mobilenet_v3_large")))
    assert common_levels({"student": student, "teacher": teacher}) == ["p3", "p4", "p5", "p6"]
    with pytest.raises(ValueError, match=r"levels \['p2'\] are not in every model \(student: \['p3'"):
        common_levels({"student": student, "teacher": teacher}, ["p2"])


def test_feature_tap_removes_hooks_on_exit_and_on_error():
    model = build_detector(_spec("retinanet"))
    with FeatureTap(model):
        assert keeps_forward_outputs(model)  # the tap holds what it captured
    assert not keeps_forward_outputs(model)
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTap(model):
            raise RuntimeError("boom")
    assert not keeps_forward_outputs(model)


def test_extract_features_matches_the_tap_during_a_forward():
    model = build_detector(_spec("fcos")).eval()
    images, _ = _batch()
    with torch.no_grad():
        feats, batch = extract_features(model, images)
        with FeatureTap(model) as tap:
            model(images)
    assert batch.tensors.shape == tap.images.tensors.shape == (2, 3, 64, 64)
    for k in feats:
        torch.testing.assert_close(feats[k], tap.features[k])


def test_checkpoint_round_trip_keeps_weights_spec_label_map_and_config(tmp_path):
    spec = _spec("retinanet")
    model = build_detector(spec)
    lm = LabelMap.from_categories([{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 12, "name": "c"}])
    path = save_detector(tmp_path / "m.pt", model, spec, lm, config={"lr": 0.1})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    loaded, spec2, lm2, payload = load_detector(path)
    assert spec2 == spec and lm2 == lm and payload["config"] == {"lr": 0.1}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_loading_into_another_class_count_or_arch_says_which(tmp_path):
    spec = _spec("retinanet")
    lm = LabelMap.from_categories([{"id": i, "name": str(i)} for i in (1, 2, 3)])
    path = save_detector(tmp_path / "m.pt", build_detector(spec), spec, lm)
    with pytest.raises(CheckpointError, match=r"num_classes=4.*num_classes=9"):
        load_detector(path, expected=replace(spec, num_classes=9))
    with pytest.raises(CheckpointError, match=r"arch='retinanet'.*arch='fcos'"):
        load_detector(path, expected=replace(spec, arch="fcos"))
    with pytest.raises(CheckpointError, match=r"num_classes=4.*num_classes=9"):
        build_detector(replace(spec, num_classes=9, weights=str(path)))


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = atomic_save({"x": torch.ones(2)}, tmp_path / "c.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_torchvision_weights_offline_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = DetectorSpec(arch="retinanet", backbone="resnet50", num_classes=91, min_size=64, max_size=64,
                        weights="RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(CheckpointError, match=r"Download https://.*retinanet_resnet50_fpn_coco.*put it at .*checkpoints"):
        build_detector(spec)


def test_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """With the file where torchvision looks for it, the published architecture loads it unchanged."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    url = detection.FCOS_ResNet50_FPN_Weights.COCO_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(url).name)
    model = build_detector(DetectorSpec(arch="fcos", backbone="resnet50", num_classes=91, min_size=64, max_size=64,
                                        weights="FCOS_ResNet50_FPN_Weights.COCO_V1"))
    saved, loaded = reference.state_dict(), model.state_dict()
    assert set(loaded) <= set(saved)  # FrozenBatchNorm has no num_batches_tracked
    for k, v in loaded.items():
        assert torch.equal(v, saved[k]), k
    assert feature_levels(model, size=64) == {f"p{i}": 256 for i in range(3, 8)}


def test_torchvision_weights_with_a_wrong_spec_say_what_they_are():
    with pytest.raises(ValueError, match="fcos on resnet50 with 91 classes"):
        build_detector(DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=91,
                                    weights="FCOS_ResNet50_FPN_Weights.COCO_V1"))


def test_torchvision_label_map_uses_coco_category_ids():
    lm = torchvision_label_map("RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    assert len(lm.cat_ids) == 80 and lm.num_classes == 91
    assert lm.to_cat_id(1) == 1 and lm.name_of_label(1) == "person" and 12 not in lm.cat_ids  # 12 is "N/A"


def test_unknown_arch_backbone_or_weights_are_clear_errors():
    with pytest.raises(ValueError, match="unknown arch"):
        DetectorSpec(arch="yolo")
    with pytest.raises(ValueError, match="unknown backbone"):
        DetectorSpec(backbone="vgg16")
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectorSpec(arch="fcos", fpn_channels=16)
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        build_detector(replace(_spec("retinanet"), backbone_weights="ResNet18_Weights.NOPE"))


def test_backbone_weights_offline_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"Download https://.*resnet18-.*\.pth and put it at .*checkpoints"):
        build_detector(replace(_spec("retinanet"), backbone_weights="ResNet18_Weights.IMAGENET1K_V1"))
