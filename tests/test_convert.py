"""`pkdkit convert`: VOC and YOLO folders written here (tiny images, malformed files among them) through FiftyOne's
importers into COCO 2017-layout data that pkdkit's loader reads and its evaluation scores.

FiftyOne reads FIFTYONE_DATABASE_DIR when it is imported. When tests/test_fiftyone.py is collected too, it has set
its own database folder and imported FiftyOne already (collection comes before any test), and these tests share
that database; run alone, they get a fresh folder of their own, never the user's database.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

if "fiftyone" not in sys.modules:
    os.environ["FIFTYONE_DATABASE_DIR"] = tempfile.mkdtemp(prefix="pkdkit_fiftyone_db_")

from pkdkit.cli import main  # noqa: E402
from pkdkit.convert import convert  # noqa: E402
from pkdkit.data import DataConfig, DataError  # noqa: E402
from pkdkit.errors import ConfigError  # noqa: E402
from pkdkit.evaluate import coco_evaluate  # noqa: E402


def _image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path)


def _voc_xml(w: int, h: int, objects: list[tuple[str, int, int, int, int, int]]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                   f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for n, x0, y0, x1, y1, d in objects)
    return (f"<annotation><filename>x.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{objs}</annotation>")


def make_voc(root: Path) -> Path:
    """VOCdevkit layout, 40x30 images: 2 good train images (one box past the border, one difficult), a malformed
    XML, an XML whose size is not its image's, an XML without its image, 2 good val images."""
    files = {
        "a": _voc_xml(40, 30, [("dog", 2, 3, 20, 25, 0), ("cat", 22, 4, 38, 28, 1)]),
        "b": _voc_xml(40, 30, [("cat", 5, 5, 55, 20, 0)]),  # reaches past x = 40: clipped
        "broken": "<annotation><size><width>40</width>",  # does not parse
        "wrongsize": _voc_xml(64, 64, [("cat", 1, 1, 9, 9, 0)]),
        "noimage": _voc_xml(40, 30, [("cat", 1, 1, 9, 9, 0)]),
        "v1": _voc_xml(40, 30, [("dog", 10, 10, 30, 20, 0)]),
        "v2": _voc_xml(40, 30, [("cat", 0, 0, 12, 12, 0), ("dog", 15, 5, 35, 25, 1)]),
    }
    for stem, xml in files.items():
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
        if stem != "noimage":
            _image(root / "JPEGImages" / f"{stem}.jpg", 40, 30)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nbroken\nwrongsize\nnoimage\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("v1\nv2\n")
    return root


def make_yolo(root: Path) -> Path:
    """YOLO layout, 50x40 images, classes [person, car, bike]: good files, a line of 4 fields, a class id out of
    range, a label file whose image is missing, an image without labels (no objects)."""
    labels = {
        "train/t1": "0 0.5 0.5 0.4 0.5\n2 0.2 0.3 0.2 0.2\n",
        "train/t2": "1 0.5 0.5 0.2\n",  # 4 fields
        "train/t3": "7 0.5 0.5 0.2 0.2\n",  # class 7 of 3
        "train/ghost": "0 0.5 0.5 0.2 0.2\n",  # no image
        "val/v1": "1 0.3 0.4 0.3 0.3\n0 0.7 0.6 0.2 0.4\n",
    }
    for stem, text in labels.items():
        (root / "labels" / stem).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}.txt").write_text(text)
        if stem != "train/ghost":
            _image(root / "images" / f"{stem}.png", 50, 40)
    _image(root / "images" / "val" / "empty.png", 50, 40)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [person, car, bike]\n")
    return root


def _gt_as_results_ap(cfg: DataConfig) -> float:
    """AP of the ground truth's own boxes as detections: 1.0 when the files are consistent (a detection on a crowd
    region, a VOC difficult object, is neither a true nor a false positive)."""
    gt = json.loads(Path(cfg.val_json).read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    return coco_evaluate(cfg.val_json, results)["bbox"]["stats"]["AP"]


def test_voc_to_coco_reports_each_malformed_file_and_the_result_loads_and_scores_ap_1(tmp_path, capsys):
    import fiftyone as fo  # here, not at the top: see the module's docstring

    src = make_voc(tmp_path / "VOCdevkit")
    before = set(fo.list_datasets())
    result = convert("voc", src, tmp_path / "coco", progress=False)
    err = capsys.readouterr().err
    assert set(fo.list_datasets()) == before  # its temporary FiftyOne dataset is deleted
    for stem in ("broken", "wrongsize", "noimage", "b"):  # b: its box was clipped
        lines = [line for line in result.problems if f"{stem}.xml" in line]
        assert len(lines) == 1 and lines[0] in err, (stem, result.problems)
    assert "64x64" in next(p for p in result.problems if "wrongsize" in p)
    assert [c["name"] for c in result.categories] == ["cat", "dog"] and [c["id"] for c in result.categories] == [1, 2]
    assert result.images == {"train": 2, "val": 2} and result.annotations == {"train": 3, "val": 3}

    cfg = DataConfig.from_root(tmp_path / "coco")  # the layout pkdkit reads as it is
    train = json.loads(Path(cfg.train_json).read_text())
    by_file = {img["file_name"]: img["id"] for img in train["images"]}
    anns = {(a["image_id"], a["category_id"]): a for a in train["annotations"]}
    assert anns[(by_file["a.jpg"], 1)]["iscrowd"] == 1 and anns[(by_file["a.jpg"], 2)]["iscrowd"] == 0  # difficult
    assert anns[(by_file["b.jpg"], 1)]["bbox"] == [5, 5, 35, 15]  # clipped at the right border (x = 40)
    assert (Path(cfg.train_images) / "a.jpg").samefile(src / "JPEGImages" / "a.jpg")  # hard-linked
    train_ds, val_ds = cfg.train_dataset(), cfg.val_dataset()
    image, target = train_ds[train_ds.ids.index(by_file["a.jpg"])]
    assert image.shape == (3, 30, 40) and target["labels"].tolist() == [2]  # the difficult cat is not trained on
    assert len(val_ds) == 2 and _gt_as_results_ap(cfg) == pytest.approx(1.0)


def test_yolo_to_coco_through_the_cli_names_bad_label_files_and_refuses_a_used_folder(tmp_path, capsys):
    src = make_yolo(tmp_path / "yolo")
    out = tmp_path / "coco"
    assert main(["--quiet", "convert", "--from", "yolo", str(src), "--out", str(out), "--copy"]) == 0
    err = capsys.readouterr().err
    for name, why in (("t2.txt", "4 fields"), ("t3.txt", "class id 7"), ("ghost.txt", "no image")):
        assert len([line for line in err.splitlines() if name in line]) == 1 and why in err, (name, err)
    cfg = DataConfig.from_root(out)
    train, val = (json.loads(Path(p).read_text()) for p in (cfg.train_json, cfg.val_json))
    assert [c["name"] for c in val["categories"]] == ["person", "car", "bike"]
    assert [img["file_name"] for img in train["images"]] == ["t1.png"]
    assert sorted(img["file_name"] for img in val["images"]) == ["empty.png", "v1.png"]
    boxes = {a["category_id"]: a["bbox"] for a in val["annotations"]}
    assert boxes == {2: [7.5, 10.0, 15.0, 12.0], 1: [30.0, 16.0, 10.0, 16.0]}  # (cx, cy, w, h) * (50, 40)
    assert not (Path(cfg.val_images) / "v1.png").samefile(src / "images" / "val" / "v1.png")  # --copy
    assert len(cfg.train_dataset()) == 1 and _gt_as_results_ap(cfg) == pytest.approx(1.0)

    assert main(["convert", "--from", "yolo", str(src), "--out", str(out)]) == 1  # nothing replaced silently
    assert "not empty" in capsys.readouterr().err and (out / "val2017" / "v1.png").is_file()
    assert main(["convert", "--from", "yolo", str(src / "data.yaml"), "--out", str(tmp_path), "--force"]) == 1
    assert "holds the source" in capsys.readouterr().err and (src / "data.yaml").is_file()


def test_fatal_source_problems_write_nothing(tmp_path):
    src = make_yolo(tmp_path / "yolo")
    (src / "data.yaml").write_text("train: images/train\nval: images/val\n")
    with pytest.raises(DataError, match="data.yaml needs `names`"):
        convert("yolo", src, tmp_path / "out", progress=False)
    voc = make_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DataError, match="val.txt does not"):
        convert("voc", voc, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="val-fraction"):
        (voc / "ImageSets" / "Main" / "train.txt").unlink()
        convert("voc", voc, tmp_path / "out", val_fraction=1.5, progress=False)
    assert not (tmp_path / "out").exists()

    # without split files: the seeded split (4 usable images, half of them in val2017)
    result = convert("voc", voc, tmp_path / "out", val_fraction=0.5, seed=3, progress=False)
    cfg = DataConfig.from_root(result.out)
    names = [sorted(p.name for p in Path(d).iterdir()) for d in (cfg.train_images, cfg.val_images)]
    assert result.images == {"train": 2, "val": 2} and sorted(names[0] + names[1]) == ["a.jpg", "b.jpg", "v1.jpg",
                                                                                        "v2.jpg"]
