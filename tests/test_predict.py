"""`pkdkit predict` on a folder of images: COCO results that pycocotools reads against the folder's ground truth,
the drawn images, the same detections from the torchvision export, and the offline error of a weight name."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pkdkit.cli import main
from pkdkit.data import CocoDetection
from pkdkit.models import CheckpointError, DetectorSpec, build_detector, export_model, save_detector
from pkdkit.predict import predict
from pkdkit.viz import plot_predictions


@pytest.fixture(scope="module")
def tiny_model(tiny_coco, tmp_path_factory):
    """A tiny RetinaNet with the tiny dataset's label map, classifier prior 0.5 so that it makes detections."""
    label_map = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"]).label_map
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=label_map.num_classes, fpn_channels=32,
                        min_size=96, max_size=96, anchor_sizes=(8, 16, 32, 64, 128))
    torch.manual_seed(0)
    model = build_detector(spec)
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    return save_detector(tmp_path_factory.mktemp("predict") / "model.pt", model, spec, label_map)


def test_predict_a_folder_writes_results_pycocotools_loads_and_the_drawn_images(tiny_model, tiny_coco, tmp_path,
                                                                              capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred"
    args = ["predict", str(tiny_model), str(tiny_coco["val_images"]), str(bad), "--out", str(out), "--device", "cpu",
            "--score-threshold", "0.05"]
    assert main(["--quiet", *args]) == 0
    assert capsys.readouterr().err.count(f"skipped {bad}") == 1

    gt = COCO(str(tiny_coco["val_json"]))  # ids 1..8: the folder's files in sorted order, as predict numbers them
    results = json.loads((out / "results.json").read_text())
    dt = gt.loadRes(str(out / "results.json"))
    assert len(dt.anns) == len(results) > 0 and {r["image_id"] for r in results} <= set(gt.imgs)
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    assert all(r["category_name"] == names[r["category_id"]] for r in results)
    assert all(gt.imgs[r["image_id"]]["file_name"] == r["file_name"].rsplit("/", 1)[1] for r in results)
    for img in gt.imgs.values():
        with Image.open(out / "drawn" / img["file_name"]) as drawn, \
                Image.open(tiny_coco["val_images"] / img["file_name"]) as source:
            assert drawn.size == source.size and drawn.tobytes() != source.convert("RGB").tobytes()  # boxes drawn

    assert main(["predict", *args[1:]]) == 1 and "not empty" in capsys.readouterr().err  # never overwritten silently
    one = tiny_coco["val_images"] / "000001.png"
    assert main(["--quiet", "predict", str(tiny_model), str(one), "--out", str(out), "--device", "cpu", "--force"]) == 0
    assert [p.name for p in (out / "drawn").iterdir()] == ["000001.png"]  # the earlier drawn images are replaced
    assert {r["file_name"] for r in json.loads((out / "results.json").read_text())} == {str(one)}


def test_predict_in_python_returns_the_detections_and_the_export_gives_the_same(tiny_model, tiny_coco, tmp_path):
    images = sorted(tiny_coco["val_images"].glob("*.png"))[:3]
    found = predict(tiny_model, images, device="cpu", progress=False)
    assert found.results_file is None and list(found.images) == [1, 2, 3] and found.results
    export = export_model(tiny_model, "torchvision", tmp_path / "student.pth")
    again = predict(export, images, device="cpu", batch_size=2, progress=False)
    assert [(r["image_id"], r["category_id"]) for r in again.results] == \
        [(r["image_id"], r["category_id"]) for r in found.results]
    assert [v for r in again.results for v in r["bbox"]] == pytest.approx([v for r in found.results for v in r["bbox"]],
                                                                          abs=0.02)
    fig = plot_predictions([("a", torch.zeros(3, 20, 30, dtype=torch.uint8))] * 4, cols=3)
    assert sum(bool(ax.images) for ax in fig.axes) == 4


def test_a_torchvision_weight_name_offline_says_where_to_put_the_file(tiny_coco, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the download fails at once, with or without a network
    with pytest.raises(CheckpointError, match=r"could not get weights .*\(offline\?\)\. Download https://.* put it at"):
        predict("FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1", tiny_coco["val_images"], device="cpu",
                progress=False)
