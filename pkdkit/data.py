"""COCO-format detection data for torchvision detectors.

`CocoDetection` reads any COCO instances JSON (the synthetic shapes set or real COCO 2017) and returns
torchvision targets: `boxes` xyxy float pixels, contiguous `labels`, `image_id`, `area`, `iscrowd` and
optionally instance `masks`. Category ids are mapped to contiguous model labels once, here, by a
`LabelMap` that travels with checkpoints so predictions can be written back as dataset category ids.

Bad input fails early with a `DataError` that names the file and the offending id: the JSON is validated
before pycocotools sees it, and each image is checked against its JSON entry when it is loaded.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pkdkit.config import check_types
from pkdkit.errors import ConfigError, PkdkitError, reason


class DataError(PkdkitError, ValueError):
    """Bad input data (annotation file, image file, label map); the message names the file and the id."""


@dataclass(frozen=True)
class LabelMap:
    """Contiguous model labels <-> dataset category ids.

    `labels[i]` is the model's class index for dataset category `cat_ids[i]` named `names[i]`. Label 0 is
    background (torchvision detectors reserve it), so labels start at 1.
    """

    labels: tuple[int, ...]
    cat_ids: tuple[int, ...]
    names: tuple[str, ...]
    _to_cat: dict = field(init=False, repr=False, compare=False)
    _to_label: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Accept lists (e.g. from JSON) but store tuples so the map stays hashable and immutable.
        labels, cat_ids = tuple(int(v) for v in self.labels), tuple(int(v) for v in self.cat_ids)
        names = tuple(str(v) for v in self.names)
        if not len(labels) == len(cat_ids) == len(names):
            raise DataError(f"label map needs as many labels, category ids and names; found "
                            f"{len(labels)}, {len(cat_ids)} and {len(names)}")
        if len(set(labels)) != len(labels) or len(set(cat_ids)) != len(cat_ids):
            raise DataError(f"label map labels and category ids must be unique; found labels {labels}, "
                            f"category ids {cat_ids}")
        if any(v < 1 for v in labels):
            raise DataError(f"label map labels must be >= 1 (0 is background); found {labels}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "cat_ids", cat_ids)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_to_cat", dict(zip(labels, cat_ids)))
        object.__setattr__(self, "_to_label", dict(zip(cat_ids, labels)))

    @property
    def num_classes(self) -> int:
        """Number of model classes including background: `max(labels) + 1`."""
        return max(self.labels, default=0) + 1

    def check_num_classes(self, num_classes: int, model: str, source: str | os.PathLike) -> None:
        """The one check that a model of `num_classes` (with background) fits this map, the classes of the
        data at `source`: ConfigError naming `model` (e.g. "student") and both counts."""
        if num_classes != self.num_classes:
            raise ConfigError(f"{model} has num_classes={num_classes} but the data {source} has "
                              f"{len(self.cat_ids)} categories (num_classes={self.num_classes} with background)")

    def to_cat_id(self, label: int) -> int:
        try:
            return self._to_cat[int(label)]
        except KeyError:
            raise KeyError(f"model label {label} is not in the label map (labels {self.labels})") from None

    def to_label(self, cat_id: int) -> int:
        try:
            return self._to_label[int(cat_id)]
        except KeyError:
            raise KeyError(f"category id {cat_id} is not in the label map (category ids {self.cat_ids})") from None

    def name_of_label(self, label: int) -> str:
        return self.names[self.labels.index(int(label))]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> LabelMap:
        """Labels 1..K for the categories sorted by id (the usual mapping for training from scratch)."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(range(1, len(cats) + 1)), tuple(int(c["id"]) for c in cats),
                   tuple(str(c.get("name", c["id"])) for c in cats))

    @classmethod
    def identity(cls, categories: list[dict]) -> LabelMap:
        """Label == category id: the mapping of torchvision's COCO weights (91 classes with gaps)."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        ids = tuple(int(c["id"]) for c in cats)
        return cls(ids, ids, tuple(str(c.get("name", c["id"])) for c in cats))

    def match_by_name(self, other: LabelMap) -> dict[int, int]:
        """{label here: label in `other`} for the categories both have, names compared case-insensitively:
        how a torchvision COCO detector's "dog" finds your dataset's "Dog", whatever the category ids."""
        theirs = {n.strip().lower(): label for n, label in zip(other.names, other.labels)}
        return {label: theirs[n.strip().lower()] for n, label in zip(self.names, self.labels)
                if n.strip().lower() in theirs}

    def onto(self, dataset: LabelMap) -> LabelMap:
        """This (model's) label map pointing at `dataset`'s category ids, matched by name; categories the
        dataset lacks are left out, so `pkdkit.evaluate.predict` drops their detections. This is how a
        model trained on other data (a torchvision COCO teacher) is scored on your own data."""
        matched = self.match_by_name(dataset)
        return LabelMap(tuple(matched), tuple(dataset.to_cat_id(v) for v in matched.values()),
                        tuple(dataset.name_of_label(v) for v in matched.values()))

    def to_dict(self) -> dict:
        """Plain lists of ints and strs: safe for JSON and `torch.load(weights_only=True)`."""
        return {"labels": list(self.labels), "cat_ids": list(self.cat_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        missing = {"labels", "cat_ids", "names"} - set(d)
        if missing:
            raise DataError(f"label map dict is missing {sorted(missing)}; found keys {sorted(d)}")
        return cls(tuple(d["labels"]), tuple(d["cat_ids"]), tuple(d["names"]))


def load_coco(ann_file) -> COCO:
    """Read and validate a COCO instances JSON, then index it with pycocotools.

    Checked before pycocotools sees the data (which would fail with a bare KeyError or silently
    overwrite): readable file and valid JSON, the top-level lists, required keys of every image,
    annotation and category, unique ids, and annotations pointing at known images and categories.
    Annotations whose bbox holds NaN or infinity are left out, as if absent, with one warning naming them:
    training never sees them and evaluation (COCOeval reads this object) does not count them.
    """
    ann_file = Path(ann_file)
    try:
        text = ann_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file {ann_file}: {reason(e)}") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON in {ann_file} at line {e.lineno} column {e.colno}: {e.msg}") from e
    _validate(d, ann_file)
    _drop_non_finite_boxes(d, ann_file)
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _validate(d, ann_file: Path) -> None:
    if not isinstance(d, dict):
        raise DataError(f"{ann_file}: expected a JSON object at top level, found {type(d).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(d.get(key), list):
            found = "nothing" if key not in d else type(d[key]).__name__
            raise DataError(f"{ann_file}: expected top-level key {key!r} with a list, found {found}")

    def check_keys(entry, required, kind, index):
        if not isinstance(entry, dict):
            raise DataError(f"{ann_file}: {kind} #{index} should be an object, found {type(entry).__name__}")
        missing = [k for k in required if k not in entry]
        if missing:
            where = f"id {entry['id']}" if "id" in entry else f"#{index} (no id)"
            raise DataError(f"{ann_file}: {kind} {where} is missing {missing}")

    def check_unique(ids, kind):
        if len(set(ids)) != len(ids):
            seen, dup = set(), None
            for i in ids:
                if i in seen:
                    dup = i
                    break
                seen.add(i)
            raise DataError(f"{ann_file}: duplicate {kind} id {dup}")

    for i, cat in enumerate(d["categories"]):
        check_keys(cat, ("id", "name"), "category", i)
    for i, img in enumerate(d["images"]):
        check_keys(img, ("id", "file_name", "width", "height"), "image", i)
    for i, ann in enumerate(d["annotations"]):
        check_keys(ann, ("id", "image_id", "category_id", "bbox"), "annotation", i)
    def check_int(entry, key, kind):
        if not _is_int(entry[key]):
            where = f"{kind} id {entry['id']!r}" if key != "id" else kind
            raise DataError(f"{ann_file}: {where} has {key} {entry[key]!r} ({type(entry[key]).__name__}); COCO ids "
                            f"are integers (convert string ids to numbers)")

    for cat in d["categories"]:
        check_int(cat, "id", "category")
    for img in d["images"]:
        check_int(img, "id", "image")
        if not all(_is_int(img[k]) and img[k] > 0 for k in ("width", "height")):
            raise DataError(f"{ann_file}: image id {img['id']} width and height should be positive integers, "
                            f"found {img['width']!r} x {img['height']!r}")
        _check_file_name(img, ann_file)
    for ann in d["annotations"]:
        for key in ("id", "image_id", "category_id"):
            check_int(ann, key, "annotation")
    check_unique([c["id"] for c in d["categories"]], "category")
    check_unique([img["id"] for img in d["images"]], "image")
    check_unique([a["id"] for a in d["annotations"]], "annotation")

    image_ids = {img["id"] for img in d["images"]}
    cat_ids = {c["id"] for c in d["categories"]}
    for ann in d["annotations"]:
        if ann["image_id"] not in image_ids:
            raise DataError(f"{ann_file}: annotation id {ann['id']} points at unknown image id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise DataError(f"{ann_file}: annotation id {ann['id']} has unknown category id "
                            f"{ann['category_id']} (known: {sorted(cat_ids)})")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{ann_file}: annotation id {ann['id']} bbox should be 4 numbers [x, y, w, h], "
                            f"found {bbox!r}")
        _check_polygons(ann, ann_file)


def _drop_non_finite_boxes(d: dict, ann_file: Path) -> None:
    """Remove the annotations whose bbox has a NaN or infinite value from `d`, with one warning naming them."""
    bad = [a["id"] for a in d["annotations"] if not all(math.isfinite(v) for v in a["bbox"])]
    if bad:
        d["annotations"] = [a for a in d["annotations"] if all(math.isfinite(v) for v in a["bbox"])]
        warnings.warn(f"skipped {len(bad)} annotations with non-finite bbox values (NaN or infinity) in {ann_file}, "
                      f"annotation ids {bad[:5]}{' ...' if len(bad) > 5 else ''}: left out of training and evaluation",
                      stacklevel=3)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_file_name(img: dict, ann_file: Path) -> None:
    """`file_name` must be a relative path inside the image folder: no absolute path, no `..` out of it."""
    name = img["file_name"]
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{ann_file}: image id {img['id']} file_name should be a non-empty string, found {name!r}")
    parts = PurePosixPath(os.path.normpath(name.replace("\\", "/"))).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (parts and parts[0] == ".."):
        raise DataError(f"{ann_file}: image id {img['id']} file_name {name!r} points outside the image folder; "
                        f"file names must be relative to it (like '000001.png' or 'sub/000001.png')")


def _check_polygons(ann: dict, ann_file: Path) -> None:
    """A polygon segmentation is a list of flat [x0, y0, x1, y1, ...] lists of at least 3 points."""
    seg = ann.get("segmentation")
    if not isinstance(seg, list):
        return  # absent, or RLE (checked when masks are loaded)
    for k, poly in enumerate(seg):
        where = f"{ann_file}: annotation id {ann['id']} (image id {ann['image_id']}) polygon {k}"
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and math.isfinite(v) for v in poly):
            raise DataError(f"{where} should be a flat list of numbers [x0, y0, x1, y1, ...], found {poly!r:.80}")
        if len(poly) % 2 or len(poly) < 6:
            raise DataError(f"{where} has {len(poly)} coordinates; a polygon needs an even number, at least 6 "
                            f"(3 points)")


class CocoDetection(Dataset):
    """A COCO-format detection dataset returning `(image (3, H, W) float in [0, 1], target dict)`.

    Target: `boxes` float32 `(K, 4)` xyxy pixels, `labels` int64 `(K,)` (model labels via `label_map`),
    `image_id` int64 scalar, `area` float32 `(K,)`, `iscrowd` int64 `(K,)` and, with `masks=True`, `masks`
    uint8 `(K, H, W)`. Crowd annotations are left out (COCOeval reads them from the JSON) and so are boxes
    with no extent inside the image (one warning per dataset with the count). Images without annotations
    are kept, with empty `(0, 4)` boxes. `train=True` flips image, boxes and masks horizontally with
    probability `hflip_prob`, drawn from the item's own generator (`item_generator`: seeded by the seed, epoch and
    index an `ItemKey` carries, as `make_loader` asks for items), never from torch's global RNG: the same
    epoch flips the same images in the training process and in any number of loader workers.
    """

    def __init__(self, image_dir, ann_file, *, train: bool = False, masks: bool = False,
                 label_map: LabelMap | None = None, hflip_prob: float = 0.5):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.train = train
        self.masks = masks
        self.hflip_prob = hflip_prob
        self.coco = load_coco(self.ann_file)
        categories = self.coco.dataset["categories"]
        if label_map is None:
            label_map = LabelMap.from_categories(categories)
        else:
            missing = sorted({c["id"] for c in categories} - set(label_map.cat_ids))
            if missing:
                raise DataError(f"label map does not cover category ids {missing} of {self.ann_file} "
                                f"(it maps category ids {list(label_map.cat_ids)})")
        self.label_map = label_map
        self.ids = sorted(self.coco.imgs)
        self._anns = self._usable_annotations()
        if train and not any(self._anns.values()):
            n = len(self.coco.dataset["annotations"])
            raise DataError(f"no usable training annotations in {self.ann_file}: {len(self.ids)} images, {n} "
                            f"annotations, none of them a non-crowd box with an extent inside its image")

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the annotation file: which data a run was trained on, beyond its path."""
        return hashlib.sha256(self.ann_file.read_bytes()).hexdigest()[:16]

    def check_images(self) -> None:
        """Every image file exists (not decoded: that happens when loaded). Run before a long job, so that a
        missing validation image fails at the start rather than after training."""
        missing = [(i, self.image_dir / self.coco.imgs[i]["file_name"]) for i in self.ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            image_id, path = missing[0]
            raise DataError(f"{len(missing)} of {len(self.ids)} image files of {self.ann_file} are missing from "
                            f"{self.image_dir}, e.g. {path} (image id {image_id})")

    def _usable_annotations(self) -> dict[int, list[tuple[dict, list[float]]]]:
        """Per image id: (annotation, clipped xyxy box) for every non-crowd annotation with a real box."""
        usable, skipped = {}, []
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            w, h = info["width"], info["height"]
            usable[image_id] = []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue
                x, y, bw, bh = ann["bbox"]
                box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
                if box[2] > box[0] and box[3] > box[1]:  # also False for NaN
                    usable[image_id].append((ann, box))
                else:
                    skipped.append(ann["id"])
        if skipped:
            warnings.warn(f"skipped {len(skipped)} annotations with degenerate boxes (no extent inside the image) in "
                          f"{self.ann_file}, annotation ids {skipped[:5]}{' ...' if len(skipped) > 5 else ''}",
                          stacklevel=3)
        return usable

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        """Item `index`: an int, or the `ItemKey` a loader's sampler yields (its seed and epoch pick the flip)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        anns = self._anns[image_id]
        target = {
            "boxes": torch.tensor([box for _, box in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.label_map.to_label(a["category_id"]) for a, _ in anns],
                                   dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([a.get("area", (b[2] - b[0]) * (b[3] - b[1])) for a, b in anns],
                                 dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = self._load_masks(info, [a for a, _ in anns])
        if self.train and torch.rand(1, generator=item_generator(index)).item() < self.hflip_prob:
            image, target = hflip(image, target)
        return image, target

    def _load_image(self, info: dict) -> torch.Tensor:
        path = self.image_dir / info["file_name"]
        where = f"image id {info['id']} of {self.ann_file}"
        if not path.is_file():
            raise DataError(f"image file not found: {path} ({where})")
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated / unknown files
            raise DataError(f"cannot decode image {path} ({where}): {reason(e)}") from e
        if img.size != (info["width"], info["height"]):
            raise DataError(f"image {path} ({where}) is {img.size[0]}x{img.size[1]} (WxH) but the JSON says "
                            f"{info['width']}x{info['height']}")
        return to_tensor_image(img, f"{path} ({where})")

    def _load_masks(self, info: dict, anns: list[dict]) -> torch.Tensor:
        """Instance masks `(K, H, W)` uint8 from polygons or (un)compressed RLE (pycocotools annToMask)."""
        h, w = info["height"], info["width"]
        masks = []
        for ann in anns:
            seg = ann.get("segmentation")
            if not seg:
                raise DataError(f"{self.ann_file}: annotation id {ann['id']} (image id {info['id']}) has no "
                                f"segmentation but masks were requested")
            if isinstance(seg, dict) and list(seg.get("size", [])) != [h, w]:
                raise DataError(f"{self.ann_file}: annotation id {ann['id']} RLE size {seg.get('size')} does not "
                                f"match image id {info['id']} size [{h}, {w}] (height, width)")
            try:
                masks.append(self.coco.annToMask(ann))
            except Exception as e:  # pycocotools raises bare TypeError/ValueError on malformed segmentations
                raise DataError(f"{self.ann_file}: cannot decode segmentation of annotation id {ann['id']} "
                                f"(image id {info['id']}): {reason(e)}") from e
        if not masks:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack(masks)).to(torch.uint8)


@dataclass
class DataConfig:
    """Where the COCO-format data is. `masks` loads instance masks (Mask R-CNN students). `labels`:
    "contiguous" maps categories to labels 1..K; "identity" uses the category id as label (COCO with
    torchvision's 91-class COCO detectors)."""

    train_images: str
    train_json: str
    val_images: str
    val_json: str
    masks: bool = False
    labels: str = "contiguous"

    def __post_init__(self) -> None:
        check_types(self, "data")
        if self.labels not in ("contiguous", "identity"):
            raise ConfigError(f"data.labels must be 'contiguous' or 'identity', not {self.labels!r}")

    @classmethod
    def from_root(cls, root: str | os.PathLike, masks: bool = False) -> "DataConfig":
        """The synthetic layout (`pkdkit synth`): root/{train,val}, root/annotations/instances_{split}.json;
        COCO 2017 uses the same names with train2017/val2017 folders."""
        root = Path(root)
        split = ("train2017", "val2017") if (root / "train2017").is_dir() else ("train", "val")
        cfg = cls(str(root / split[0]), str(root / "annotations" / f"instances_{split[0]}.json"),
                  str(root / split[1]), str(root / "annotations" / f"instances_{split[1]}.json"), masks)
        missing = [p for p in (cfg.train_images, cfg.val_images) if not Path(p).is_dir()]
        missing += [p for p in (cfg.train_json, cfg.val_json) if not Path(p).is_file()]
        if missing:
            found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) if root.is_dir() else None
            raise DataError(f"data root {root} lacks {', '.join(str(Path(p).relative_to(root)) for p in missing)}. "
                            "Expected train2017/, val2017/, annotations/instances_train2017.json and "
                            "annotations/instances_val2017.json (COCO 2017), or the same with train/ and val/; "
                            + (f"found {found[:12]}" if found is not None else "the folder does not exist"))
        return cfg

    def train_dataset(self, label_map: LabelMap | None = None) -> CocoDetection:
        return self._dataset(self.train_images, self.train_json, True, label_map)

    def val_dataset(self, label_map: LabelMap | None = None) -> CocoDetection:
        return self._dataset(self.val_images, self.val_json, False, label_map)

    def _dataset(self, images: str, ann: str, train: bool, label_map: LabelMap | None) -> CocoDetection:
        ds = CocoDetection(images, ann, train=train, masks=self.masks, label_map=label_map)
        ds.check_images()  # a missing image fails now, not after an epoch of training
        if label_map is None and self.labels == "identity":
            ds.label_map = LabelMap.identity(ds.coco.dataset["categories"])
        return ds


def to_tensor_image(img: Image.Image, where: str = "image") -> torch.Tensor:
    """A PIL image as `(3, H, W)` float in [0, 1]. 16-bit grey images (PIL mode "I;16") are scaled by 65535,
    not clipped at 255 (which would turn them almost white); 32-bit integer and float images ("I", "F") have
    no known range and are refused."""
    if img.mode.startswith("I;16"):
        grey = torch.from_numpy(np.asarray(img).astype(np.float32) / 65535.0)
        return grey.expand(3, *grey.shape).contiguous()
    if img.mode in ("I", "F"):
        raise DataError(f"{where} has 32-bit {'float' if img.mode == 'F' else 'integer'} pixels (PIL mode "
                        f"{img.mode!r}) whose range is unknown; convert it to 8-bit or 16-bit")
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror `image (3, H, W)` and its target left-right: boxes `x -> W - x`, masks `(K, H, W)` flipped."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate_fn(batch) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images and targets as lists: torchvision detectors take images of different sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class ItemKey(int):
    """A dataset index that carries the `seed` and `epoch` of the pass asking for it: `make_loader`'s sampler
    yields these, so an item's random augmentation (`item_generator`) depends on (seed, epoch, index) alone, not
    on which process loads it. It is an int, so any dataset indexes with it as with its index; with the index,
    the epoch also reaches persistent workers, whose copy of the dataset the training process cannot update."""

    seed: int
    epoch: int

    def __new__(cls, index: int, seed: int = 0, epoch: int = 0) -> "ItemKey":
        key = super().__new__(cls, index)
        key.seed, key.epoch = int(seed), int(epoch)
        return key

    def __reduce__(self):  # to loader workers and back: the seed and epoch travel with the index
        return ItemKey, (int(self), self.seed, self.epoch)

    def __repr__(self) -> str:
        return f"ItemKey({int(self)}, seed={self.seed}, epoch={self.epoch})"


def mixed_seed(*keys: int) -> int:
    """A 64-bit seed from non-negative ints (numpy's `SeedSequence`): nearby keys, e.g. consecutive steps or
    images, give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


def item_generator(index: int) -> torch.Generator:
    """The CPU generator of item `index`'s random draws, seeded by (seed, epoch, index) of an `ItemKey`; a plain
    int index draws as in epoch 0 of seed 0. The same item of the same epoch draws the same numbers in the
    training process and in any loader worker."""
    return torch.Generator().manual_seed(mixed_seed(getattr(index, "seed", 0), getattr(index, "epoch", 0), index))


class _SeededSampler(DistributedSampler):
    """A `DistributedSampler` yielding `ItemKey`s: each index carries the sampler's seed and epoch."""

    def __iter__(self):
        return (ItemKey(i, self.seed, self.epoch) for i in super().__iter__())


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                distributed: bool = False, drop_last: bool = False, pin_memory: bool = False,
                persistent_workers: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader over a `DistributedSampler` (1 replica unless `distributed` and torch.distributed is up).

    Shuffling depends only on `(seed, epoch)`: call `loader.sampler.set_epoch(epoch)` before each epoch.
    The loader has its own generator, so iterating it does not consume torch's global RNG. The sampler asks for
    `ItemKey`s, indices carrying (seed, epoch), from which `CocoDetection` seeds each item's augmentation
    (`item_generator`): the batches are the same with any `num_workers`, fresh or `persistent_workers` (kept
    between epochs: no start-up cost per epoch), and on any rank. `pin_memory` (page-locked batches, for fast
    and asynchronous copies to a GPU) and `prefetch_factor` (batches loaded ahead per worker; torch's default 2)
    are DataLoader's.
    """
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0 and (persistent_workers or prefetch_factor is not None):
        raise ConfigError("persistent_workers and prefetch_factor need loader worker processes (num_workers > 0); "
                         f"got num_workers=0, persistent_workers={persistent_workers}, "
                         f"prefetch_factor={prefetch_factor}")
    if distributed and dist.is_available() and dist.is_initialized():
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        num_replicas, rank = 1, 0
    sampler = _SeededSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                             drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      generator=torch.Generator().manual_seed(seed))
