"""Specification of COCO-format loading: targets, label maps, masks, flips, errors and loaders."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DistributedSampler

from pkdkit.data import CocoDetection, DataError, LabelMap, collate_fn, hflip, item_generator, make_loader

# ---------------------------------------------------------------------------------------------------------
# A hand-made two-image dataset whose masks are known pixel by pixel.
# Image 1 is 20x16 (WxH) with a polygon, an uncompressed-RLE and a compressed-RLE object; image 2 is empty.

W, H = 20, 16
RECT = np.zeros((H, W), np.uint8)
RECT[2:6, 2:8] = 1  # what pycocotools rasterises for the polygon below
BLOB = np.zeros((H, W), np.uint8)
BLOB[8:12, 3:6] = 1
BLOB[10:14, 5:7] = 1
DISC = (np.hypot(*np.mgrid[0:H, 0:W] - np.array([8, 14])[:, None, None]) < 3.5).astype(np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    counts, current, run = [], 0, 0
    for v in mask.flatten(order="F"):
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [int(s) for s in mask.shape], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _dataset_dict() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": 24, "height": 18}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 9, "bbox": [2.0, 2.0, 6.0, 4.0], "area": 24.0,
             "iscrowd": 0, "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},
            {"id": 12, "image_id": 1, "category_id": 4, "bbox": _box(BLOB), "area": float(BLOB.sum()),
             "iscrowd": 0, "segmentation": _uncompressed_rle(BLOB)},
            {"id": 13, "image_id": 1, "category_id": 9, "bbox": _box(DISC), "area": float(DISC.sum()),
             "iscrowd": 0, "segmentation": _compressed_rle(DISC)},
        ],
        "categories": [{"id": 4, "name": "cat", "supercategory": "animal"},
                       {"id": 9, "name": "dog", "supercategory": "animal"}],
    }


def _write(tmp_path, d: dict) -> tuple:
    """Write `d` as JSON and (re)write the images it lists (random pixels); return (image_dir, ann_file)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for img in d["images"]:
        # The JSON may be deliberately broken: fall back to the default size for the pixels.
        h = img["height"] if isinstance(img.get("height"), int) else H
        w = img["width"] if isinstance(img.get("width"), int) else W
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / img["file_name"])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(d, indent=1))
    return image_dir, ann_file


@pytest.fixture
def small(tmp_path):
    return _write(tmp_path, _dataset_dict())


# ---------------------------------------------------------------------------------------------------------
# Targets


def test_item_is_float_image_and_torchvision_target(tiny_coco):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], masks=True)
    image, target = ds[0]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    k = len(target["boxes"])
    assert k > 0
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (k, 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == (k,)
    assert target["image_id"].dtype == torch.int64 and target["image_id"].shape == ()
    assert target["image_id"] == ds.ids[0]
    assert target["area"].dtype == torch.float32 and target["area"].shape == (k,)
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].shape == (k,)
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (k, 96, 96)
    boxes = target["boxes"]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes <= 96).all()


def test_ids_are_sorted_and_keep_images_without_annotations(tiny_coco):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], masks=True)
    assert ds.ids == sorted(ds.coco.imgs) and len(ds) == 16
    empty = [i for i in ds.ids if not ds.coco.imgToAnns.get(i)]
    assert empty, "the synthetic set has an image without objects"
    image, target = ds[ds.ids.index(empty[0])]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 96, 96)
    assert target["image_id"] == empty[0]


def test_boxes_are_xyxy_conversions_of_coco_xywh(small):
    ds = CocoDetection(*small)
    _, target = ds[0]
    assert target["boxes"][0].tolist() == [2.0, 2.0, 8.0, 6.0]
    x, y, w, h = _box(DISC)
    assert target["boxes"][2].tolist() == [x, y, x + w, y + h]
    assert target["area"].tolist() == [24.0, float(BLOB.sum()), float(DISC.sum())]


def test_labels_are_contiguous_and_map_back_to_category_ids(small):
    ds = CocoDetection(*small)
    assert ds.label_map.cat_ids == (4, 9) and ds.label_map.labels == (1, 2)
    assert ds.label_map.num_classes == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 1, 2]
    assert [ds.label_map.to_cat_id(v) for v in target["labels"].tolist()] == [9, 4, 9]


def test_masks_from_polygon_uncompressed_and_compressed_rle(small):
    _, target = CocoDetection(*small, masks=True)[0]
    masks = target["masks"].numpy()
    np.testing.assert_array_equal(masks[0], RECT)
    np.testing.assert_array_equal(masks[1], BLOB)
    np.testing.assert_array_equal(masks[2], DISC)


def test_masks_are_left_out_unless_asked_for(small):
    _, target = CocoDetection(*small)[0]
    assert "masks" not in target


def test_synthetic_masks_agree_with_boxes(tiny_coco):
    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"], masks=True)
    for i in range(len(ds)):
        _, target = ds[i]
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_crowd_annotations_are_left_out_of_targets(tmp_path):
    d = _dataset_dict()
    d["annotations"][1]["iscrowd"] = 1
    ds = CocoDetection(*_write(tmp_path, d), masks=True)
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 2] and target["masks"].shape[0] == 2
    assert target["iscrowd"].tolist() == [0, 0]


def test_degenerate_boxes_are_skipped_with_one_warning_counting_them(tmp_path):
    d = _dataset_dict()
    base = {"image_id": 1, "category_id": 4, "iscrowd": 0, "area": 1.0, "segmentation": [[0, 0, 1, 0, 1, 1]]}
    d["annotations"] += [
        {**base, "id": 21, "bbox": [5.0, 5.0, 0.0, 4.0]},  # zero width
        {**base, "id": 22, "bbox": [5.0, 5.0, 3.0, -1.0]},  # negative height
        {**base, "id": 23, "bbox": [30.0, 2.0, 4.0, 4.0]},  # entirely right of the 20 px image
        {**base, "id": 24, "bbox": [-2.0, 10.0, 4.0, 20.0]},  # partly outside: clipped, kept
        {**base, "id": 25, "image_id": 2, "bbox": [1.0, 1.0, 2.0, 0.0]},  # zero height, other image
    ]
    image_dir, ann_file = _write(tmp_path, d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(image_dir, ann_file)
        ds[0], ds[1]
    ours = [w for w in caught if issubclass(w.category, UserWarning) and "degenerate" in str(w.message)]
    assert len(ours) == 1
    assert "skipped 4 annotations with degenerate boxes" in str(ours[0].message)
    assert str(ann_file) in str(ours[0].message)
    _, target = ds[0]
    assert target["boxes"].shape == (4, 4)
    assert target["boxes"][3].tolist() == [0.0, 10.0, 2.0, 16.0]
    assert ds[1][1]["boxes"].shape == (0, 4)


# ---------------------------------------------------------------------------------------------------------
# Label maps


def test_label_map_from_categories_sorts_by_id_and_round_trips():
    cats = [{"id": 20, "name": "star"}, {"id": 1, "name": "circle"}, {"id": 7, "name": "triangle"}]
    lm = LabelMap.from_categories(cats)
    assert lm.labels == (1, 2, 3) and lm.cat_ids == (1, 7, 20) and lm.names == ("circle", "triangle", "star")
    assert lm.num_classes == 4
    for label in lm.labels:
        assert lm.to_label(lm.to_cat_id(label)) == label
    assert lm.name_of_label(3) == "star"
    with pytest.raises(KeyError, match="category id 5"):
        lm.to_label(5)


def test_label_map_identity_uses_category_ids_as_labels():
    lm = LabelMap.identity([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}])
    assert lm.labels == lm.cat_ids == (1, 90)
    assert lm.num_classes == 91 and lm.to_label(90) == 90 and lm.name_of_label(1) == "person"


def test_label_map_dict_survives_json_and_weights_only_torch_load(tmp_path):
    lm = LabelMap.from_categories([{"id": 3, "name": "square"}, {"id": 12, "name": "cross"}])
    assert LabelMap.from_dict(json.loads(json.dumps(lm.to_dict()))) == lm
    torch.save({"label_map": lm.to_dict()}, tmp_path / "lm.pt")
    loaded = torch.load(tmp_path / "lm.pt", weights_only=True)["label_map"]
    assert LabelMap.from_dict(loaded) == lm


def test_label_map_rejects_inconsistent_fields():
    with pytest.raises(DataError, match="as many"):
        LabelMap((1, 2), (3,), ("a", "b"))
    with pytest.raises(DataError, match="background"):
        LabelMap((0,), (3,), ("a",))
    with pytest.raises(DataError, match="cat_ids"):
        LabelMap.from_dict({"labels": [1], "names": ["a"]})


def test_forced_label_map_is_used_for_targets(small):
    lm = LabelMap.identity(_dataset_dict()["categories"])
    ds = CocoDetection(*small, label_map=lm)
    assert ds.label_map is lm
    assert ds[0][1]["labels"].tolist() == [9, 4, 9]


def test_forced_label_map_must_cover_dataset_categories(small):
    partial = LabelMap.from_categories([{"id": 4, "name": "cat"}])
    with pytest.raises(DataError, match=r"category ids \[9\]") as err:
        CocoDetection(*small, label_map=partial)
    assert "instances.json" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Horizontal flip


def test_train_flip_mirrors_image_boxes_and_masks(tiny_coco):
    plain = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], masks=True)
    flipped = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], masks=True, train=True,
                            hflip_prob=1.0)
    image, target = plain[0]
    f_image, f_target = flipped[0]
    assert torch.equal(f_image, image.flip(-1))
    assert torch.equal(f_target["masks"], target["masks"].flip(-1))
    assert torch.equal(f_target["boxes"][:, 0], 96 - target["boxes"][:, 2])
    assert torch.equal(f_target["boxes"][:, 2], 96 - target["boxes"][:, 0])
    assert torch.equal(f_target["boxes"][:, 1::2], target["boxes"][:, 1::2])
    for box, mask in zip(f_target["boxes"], f_target["masks"]):  # flipped boxes still hug flipped masks
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert torch.equal(f_target["labels"], target["labels"])


def test_train_flip_probability_zero_and_eval_mode_never_flip(small):
    image, target = CocoDetection(*small)[0]
    for ds in (CocoDetection(*small, train=True, hflip_prob=0.0), CocoDetection(*small, train=False)):
        f_image, f_target = ds[0]
        assert torch.equal(f_image, image) and torch.equal(f_target["boxes"], target["boxes"])


def test_hflip_of_empty_target_keeps_shapes():
    image = torch.rand(3, 5, 7)
    out, target = hflip(image, {"boxes": torch.zeros((0, 4)), "masks": torch.zeros((0, 5, 7), dtype=torch.uint8)})
    assert out.shape == image.shape and target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 5, 7)


# ---------------------------------------------------------------------------------------------------------
# Bad input: every error names the file and the offending id

BAD_JSON = {
    "missing_top_level_key": (lambda d: d.pop("categories"), "'categories'"),
    "image_missing_height": (lambda d: d["images"][1].pop("height"), "image id 2 is missing ['height']"),
    "image_without_id": (lambda d: d["images"][1].pop("id"), "image #1 (no id) is missing ['id']"),
    "annotation_missing_bbox": (lambda d: d["annotations"][1].pop("bbox"), "annotation id 12 is missing ['bbox']"),
    "annotation_unknown_image": (lambda d: d["annotations"][2].update(image_id=77),
                                 "annotation id 13 points at unknown image id 77"),
    "annotation_unknown_category": (lambda d: d["annotations"][0].update(category_id=5),
                                    "annotation id 11 has unknown category id 5"),
    "duplicate_image_ids": (lambda d: d["images"][1].update(id=1), "duplicate image id 1"),
    "duplicate_annotation_ids": (lambda d: d["annotations"][2].update(id=11), "duplicate annotation id 11"),
    "bbox_not_four_numbers": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 11 bbox"),
    "non_integer_width": (lambda d: d["images"][0].update(width="20"), "image id 1 width and height"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_annotation_json_raises_data_error_naming_file_and_id(tmp_path, case):
    d = _dataset_dict()
    mutate, expected = BAD_JSON[case]
    mutate(d)
    image_dir, ann_file = _write(tmp_path, d)
    with pytest.raises(DataError) as err:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(err.value)
    assert expected in str(err.value)


def test_malformed_json_names_file_line_and_column(tmp_path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": [\n  {"id": 1,, "file_name": "a.png"}]}')
    with pytest.raises(DataError, match="line 2 column 12") as err:
        CocoDetection(tmp_path, ann_file)
    assert str(ann_file) in str(err.value)


def test_unreadable_annotation_file_names_path(tmp_path):
    with pytest.raises(DataError, match="cannot read annotation file") as err:
        CocoDetection(tmp_path, tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(err.value)


def test_top_level_must_be_an_object(tmp_path):
    ann_file = tmp_path / "list.json"
    ann_file.write_text("[]")
    with pytest.raises(DataError, match="JSON object at top level"):
        CocoDetection(tmp_path, ann_file)


def test_missing_image_file_names_path_and_id(small):
    image_dir, ann_file = small
    (image_dir / "b.png").unlink()
    ds = CocoDetection(image_dir, ann_file)
    ds[0]  # the other image still loads
    with pytest.raises(DataError, match="image file not found") as err:
        ds[1]
    assert str(image_dir / "b.png") in str(err.value) and "image id 2" in str(err.value)


def test_corrupt_image_names_path_and_id(small):
    image_dir, ann_file = small
    (image_dir / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataError, match="cannot decode image") as err:
        CocoDetection(image_dir, ann_file)[0]
    assert str(image_dir / "a.png") in str(err.value) and "image id 1" in str(err.value)


def test_image_size_mismatch_names_both_sizes(tmp_path):
    d = _dataset_dict()
    image_dir, ann_file = _write(tmp_path, d)
    d["images"][0]["width"] = 30
    ann_file.write_text(json.dumps(d))
    with pytest.raises(DataError, match="is 20x16 .* says 30x16") as err:
        CocoDetection(image_dir, ann_file)[0]
    assert "image id 1" in str(err.value) and str(ann_file) in str(err.value)


def test_rle_of_wrong_size_names_annotation_and_image(tmp_path):
    d = _dataset_dict()
    d["annotations"][2]["segmentation"] = _compressed_rle(np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="annotation id 13 RLE size") as err:
        CocoDetection(*_write(tmp_path, d), masks=True)[0]
    assert "image id 1" in str(err.value)


def test_missing_segmentation_is_an_error_only_when_masks_are_requested(tmp_path):
    d = _dataset_dict()
    del d["annotations"][0]["segmentation"]
    paths = _write(tmp_path, d)
    assert CocoDetection(*paths)[0][1]["boxes"].shape == (3, 4)
    with pytest.raises(DataError, match="annotation id 11 .* no segmentation"):
        CocoDetection(*paths, masks=True)[0]


# ---------------------------------------------------------------------------------------------------------
# Batching and loaders


def _order(loader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return [t["i"] for _, targets in loader for t in targets]


TOY = [(torch.zeros(1), {"i": i}) for i in range(20)]


def test_collate_fn_returns_lists_of_images_and_targets(tiny_coco):
    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert images[0].shape == (3, 96, 96) and targets[1]["image_id"] == ds.ids[1]


def test_make_loader_shuffles_deterministically_per_seed_and_epoch():
    loader = make_loader(TOY, batch_size=3, shuffle=True, seed=5)
    assert isinstance(loader.sampler, DistributedSampler)
    assert loader.sampler.num_replicas == 1 and loader.sampler.rank == 0
    first = _order(loader, 0)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert _order(make_loader(TOY, batch_size=3, shuffle=True, seed=5), 0) == first
    assert _order(loader, 1) != first
    assert _order(loader, 0) == first  # going back to an epoch replays it (resume)
    assert _order(make_loader(TOY, batch_size=3, shuffle=True, seed=6), 0) != first


def test_make_loader_without_shuffle_keeps_dataset_order_and_drop_last():
    assert _order(make_loader(TOY, batch_size=3, shuffle=False), 0) == list(range(20))
    loader = make_loader(TOY, batch_size=3, shuffle=False, drop_last=True)
    assert len(loader) == 6 and _order(loader, 0) == list(range(18))


def test_make_loader_does_not_consume_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _order(make_loader(TOY, batch_size=4, shuffle=True), 0)
    assert torch.equal(torch.rand(3), expected)


class _RandomDraws(torch.utils.data.Dataset):
    """Each item is a draw from its own generator (`item_generator`), like a random flip."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.rand(1, generator=item_generator(i)), {"i": i}


def test_item_randomness_depends_on_seed_epoch_and_index_only_not_on_the_workers():
    def draws(seed, epoch, num_workers=1):
        loader = make_loader(_RandomDraws(), batch_size=2, shuffle=False, seed=seed, num_workers=num_workers)
        loader.sampler.set_epoch(epoch)
        return torch.cat([img for images, _ in loader for img in images])

    assert torch.equal(draws(0, 1), draws(0, 1))
    assert torch.equal(draws(0, 1, num_workers=0), draws(0, 1, num_workers=2))  # the process does not matter
    assert not torch.equal(draws(0, 1), draws(0, 2))
    assert not torch.equal(draws(0, 1), draws(1, 1))
    assert len(set(draws(0, 1).tolist())) == 6  # each image its own stream


def test_loader_over_coco_detection_yields_batches(tiny_coco):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    loader = make_loader(ds, batch_size=5, shuffle=True, seed=0)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [5, 5, 5, 1]
    ids = sorted(int(t["image_id"]) for _, targets in batches for t in targets)
    assert ids == ds.ids
