"""Specification of the synthetic shapes dataset (real files, real pycocotools)."""
from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pkdkit.synthetic import make_synthetic_coco


def _load(path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def train(tiny_coco) -> dict:
    return _load(tiny_coco["train_json"])


@pytest.fixture(scope="module")
def train_coco(tiny_coco) -> COCO:
    return COCO(str(tiny_coco["train_json"]))


def test_layout_and_returned_paths(tiny_coco):
    root = tiny_coco["root"]
    assert tiny_coco["train_images"] == root / "train"
    assert tiny_coco["val_images"] == root / "val"
    assert tiny_coco["train_json"] == root / "annotations" / "instances_train.json"
    assert tiny_coco["val_json"] == root / "annotations" / "instances_val.json"
    assert len(list((root / "train").glob("*.png"))) == 16
    assert len(list((root / "val").glob("*.png"))) == 8


def test_same_seed_gives_byte_identical_json_and_pngs(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", n_train=5, n_val=2, size=64, seed=3)
    b = make_synthetic_coco(tmp_path / "b", n_train=5, n_val=2, size=64, seed=3)
    for key in ("train_json", "val_json"):
        assert a[key].read_bytes() == b[key].read_bytes()
    for split in ("train_images", "val_images"):
        files = sorted(p.name for p in a[split].glob("*.png"))
        assert files == sorted(p.name for p in b[split].glob("*.png"))
        for name in files:
            assert (a[split] / name).read_bytes() == (b[split] / name).read_bytes()


def test_other_seed_gives_different_data(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", n_train=5, n_val=2, size=64, seed=0)
    b = make_synthetic_coco(tmp_path / "b", n_train=5, n_val=2, size=64, seed=1)
    assert a["train_json"].read_bytes() != b["train_json"].read_bytes()
    assert (a["train_images"] / "000001.png").read_bytes() != (b["train_images"] / "000001.png").read_bytes()


def test_val_split_does_not_depend_on_train_size(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", n_train=2, n_val=2, size=64, seed=0)
    b = make_synthetic_coco(tmp_path / "b", n_train=4, n_val=2, size=64, seed=0)
    assert a["val_json"].read_bytes() == b["val_json"].read_bytes()


def test_json_has_coco_sections_and_valid_ids(train):
    assert set(train) >= {"info", "licenses", "images", "annotations", "categories"}
    image_ids = [img["id"] for img in train["images"]]
    assert image_ids == list(range(1, 17))
    for img in train["images"]:
        assert img["width"] == img["height"] == 96
        assert img["file_name"].endswith(".png")
    ann_ids = [a["id"] for a in train["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) and min(ann_ids) == 1
    assert all(a["iscrowd"] == 0 and a["image_id"] in image_ids for a in train["annotations"])


def test_images_are_rgb_pngs_of_the_declared_size(tiny_coco, train):
    for img in train["images"]:
        with Image.open(tiny_coco["train_images"] / img["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (img["width"], img["height"])


def test_categories_are_non_contiguous_with_names(train):
    cats = train["categories"]
    ids = sorted(c["id"] for c in cats)
    assert len(ids) >= 5
    assert ids != list(range(ids[0], ids[0] + len(ids)))  # gaps, so a label mapping is needed
    assert all(c["name"] and c["supercategory"] for c in cats)
    used = {a["category_id"] for a in train["annotations"]}
    assert used == set(ids)  # every class occurs even in 16 images


def test_objects_span_a_wide_range_of_scales(train):
    areas = np.array([a["area"] for a in train["annotations"]])
    assert (areas < 32**2).sum() > 0
    assert (areas >= 32**2).sum() > 0  # COCO medium even at 96 px
    assert areas.max() / areas.min() > 30


def test_coco_small_medium_and_large_objects_at_256_px(tmp_path):
    d = _load(make_synthetic_coco(tmp_path, n_train=20, n_val=0, size=256, seed=0)["train_json"])
    areas = np.array([a["area"] for a in d["annotations"]])
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    medium = 1 - small - large
    assert small > 0.15 and medium > 0.15 and large > 0.05, (small, medium, large)


def test_some_objects_overlap_and_are_occluded(train, train_coco):
    per_image = defaultdict(list)
    for a in train["annotations"]:
        per_image[a["image_id"]].append(a)
    overlapping_pairs = 0
    for anns in per_image.values():
        for a, b in combinations(anns, 2):
            ax, ay, aw, ah = a["bbox"]
            bx, by, bw, bh = b["bbox"]
            overlapping_pairs += min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)
    assert overlapping_pairs >= 3
    # Occluded shapes are stored as RLE of what is left visible: no two masks of an image share a pixel.
    for image_id, anns in per_image.items():
        total = sum(train_coco.annToMask(a).astype(int) for a in anns)
        assert total.max() == 1, f"image {image_id}: instance masks overlap"


def test_polygon_and_rle_masks_decode_consistent_with_bbox_and_area(train, train_coco):
    kinds = {"polygon": 0, "rle": 0}
    for a in train["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, dict):
            assert isinstance(seg["counts"], str) and seg["size"] == [96, 96]
            kinds["rle"] += 1
        else:
            assert isinstance(seg, list) and len(seg[0]) >= 6
            kinds["polygon"] += 1
        mask = train_coco.annToMask(a)
        ys, xs = np.nonzero(mask)
        x, y, w, h = a["bbox"]
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x, y, x + w, y + h], a["id"]
        assert mask.sum() == a["area"], a["id"]
    assert kinds["polygon"] > 0 and kinds["rle"] > 0, kinds


def test_some_images_have_no_objects(train):
    annotated = {a["image_id"] for a in train["annotations"]}
    empty = [img["id"] for img in train["images"] if img["id"] not in annotated]
    assert 1 <= len(empty) <= 2  # about 1 in 20 images


def test_colour_does_not_determine_class(tiny_coco, train, train_coco):
    colours = defaultdict(list)
    for a in train["annotations"]:
        img = np.asarray(Image.open(tiny_coco["train_images"] / f"{a['image_id']:06d}.png"), dtype=float)
        colours[a["category_id"]].append(img[train_coco.annToMask(a).astype(bool)].mean(0))
    for cat_id, cs in colours.items():
        if len(cs) >= 3:
            assert np.std(cs, axis=0).mean() > 30, f"category {cat_id} has nearly one colour"


def test_rejects_images_too_small_to_hold_shapes(tmp_path):
    with pytest.raises(ValueError, match="size must be >= 32"):
        make_synthetic_coco(tmp_path, n_train=1, n_val=0, size=16)


def test_coco_sizes_as_jpeg_vary_like_coco_with_many_vertex_polygons(tmp_path):
    paths = make_synthetic_coco(tmp_path, n_train=4, n_val=0, size="coco", image_format="jpeg")
    data, coco = _load(paths["train_json"]), COCO(str(paths["train_json"]))
    assert not list(paths["train_images"].glob("*.png"))
    shapes = set()
    for info in data["images"]:
        assert info["file_name"].endswith(".jpg") and max(info["width"], info["height"]) == 640
        with Image.open(paths["train_images"] / info["file_name"]) as img:
            assert img.format == "JPEG" and img.size == (info["width"], info["height"])
        shapes.add((info["width"], info["height"]))
    assert len(shapes) > 1  # sizes vary from image to image
    polygons = [a for a in data["annotations"] if isinstance(a["segmentation"], list)]
    assert polygons and min(len(a["segmentation"][0]) // 2 for a in polygons) >= 20  # many vertices
    for a in data["annotations"]:  # masks, boxes and areas agree at these sizes too
        mask = coco.annToMask(a)
        ys, xs = np.nonzero(mask)
        x, y, w, h = a["bbox"]
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x, y, x + w, y + h] and mask.sum() == a["area"]
    with pytest.raises(ValueError, match="format must be one of"):
        make_synthetic_coco(tmp_path / "other", n_train=1, n_val=0, image_format="gif")
