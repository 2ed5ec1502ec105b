"""Pascal VOC and YOLO folders -> COCO 2017-layout data that pkdkit trains and evaluates on as it is.

`convert("voc" | "yolo", src, out)` (`pkdkit convert --from voc|yolo SRC --out DST`) writes what
`DataConfig.from_root(out)` reads: ``train2017/``, ``val2017/`` (the images, hard-linked, or copied where the
file system cannot link or with ``copy=True``) and ``annotations/instances_{train,val}2017.json``.

The annotations are read by FiftyOne's importers (`fiftyone.types.VOCDetectionDataset`, `YOLOv5Dataset`) into a
temporary, non-persistent FiftyOne dataset (deleted at the end), and the COCO files are written here from its
samples, so category ids are pkdkit's: 1..K in the order of the class list (YOLO: ``names`` of data.yaml; VOC:
`classes`, else the object names found, sorted). Sources:

- VOC, the VOCdevkit layout: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/{train,val}.txt``; without
  split files, a seeded split with `val_fraction` of the images in val2017.
- YOLO: ``data.yaml`` (``names``: list or {id: name}; ``train``/``val``: folders or .txt lists of images, relative
  to ``path`` or to the YAML), labels found by replacing ``/images/`` with ``/labels/``, one
  ``class cx cy w h`` line per object (relative coordinates). Without ``val``, the seeded split.

Conventions:

- VOC's ``difficult`` objects become ``iscrowd: 1``: COCOeval ignores crowd regions (a detection on one is neither
  a true nor a false positive, and missing it is no miss), as VOC's own evaluation ignores difficult objects, and
  pkdkit's `CocoDetection` leaves crowd annotations out of training.
- Boxes are checked against the real image size (read from the image file): a box reaching past the border is
  clipped to it, a box with no extent inside the image is dropped; either gives the file one line.
- VOC boxes are taken as FiftyOne reads them: ``xmin``..``xmax`` in pixels, width ``xmax - xmin``.

Every malformed file gets one line naming it (printed as found, and kept in `Conversion.problems`) and is left
out: an XML that does not parse or lacks its size or a box, a ``<size>`` other than its image's, a label line
with a field count other than 5 or a class id out of range, an annotation whose image is missing or unreadable.
FiftyOne's importers would stop at the first such file without naming it (or, for an out-of-range YOLO class id,
invent a class), so each file is checked here before the import. Fatal (`DataError` naming the file, nothing
written): a missing ``JPEGImages/``/``Annotations/``/data.yaml, a data.yaml without ``names``, only one of the two
VOC split files, duplicate class names, a split left without images. The result is written to a temporary folder
beside `out` and renamed at the end, so a failed or stopped conversion never leaves half a dataset.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from PIL import Image
from tqdm.std import tqdm

from pkdkit.data import DataError
from pkdkit.errors import ConfigError, reason
from pkdkit.files import write_json
from pkdkit.progress import bar as progress_bar

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLITS = {"train": "train2017", "val": "val2017"}
FORMATS = ("voc", "yolo")


@dataclass
class _Item:
    """One image of the source: its split, file, name in the output split folder, size and label file."""

    split: str | None
    image: Path
    file_name: str
    label: Path | None
    width: int = 0
    height: int = 0
    image_id: int = 0


@dataclass
class Conversion:
    """What `convert` wrote: `out` (the dataset root), categories (ids 1..K), image and annotation counts per
    split, and `problems`: one line per file left out or changed (clipped boxes), each naming the file."""

    out: Path
    categories: list[dict]
    images: dict[str, int]
    annotations: dict[str, int]
    problems: list[str] = field(default_factory=list)


def list_images(folder: Path) -> list[Path]:
    """Image files (by extension, `IMAGE_EXTS`) under `folder`, recursively, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header; OSError/ValueError where it is not a readable image."""
    with Image.open(path) as img:
        return img.size


# ----------------------------------------------------------------------------------------------------
# Pascal VOC
def _voc_problem(xml: Path, width: int, height: int) -> tuple[str | None, list[str]]:
    """(why the XML is unusable or None, the object names in it)."""
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        return f"not a readable XML file ({reason(e)})", []
    size = root.find("size")
    try:
        w, h = int(size.findtext("width")), int(size.findtext("height"))
    except (AttributeError, TypeError, ValueError):
        return "no <size> with integer <width> and <height>", []
    if (w, h) != (width, height):
        return f"<size> says {w}x{h} but its image is {width}x{height} (WxH)", []
    names = []
    for k, obj in enumerate(root.iter("object")):
        name, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        try:
            [float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            return f"object {k} has no <bndbox> with numeric xmin, ymin, xmax, ymax", []
        if not name:
            return f"object {k} has no <name>", []
        names.append(name)
    return None, names


def _voc_items(src: Path, val_fraction: float, seed: int, say: Callable[[str], None]) -> list[_Item]:
    images_dir, ann_dir = src / "JPEGImages", src / "Annotations"
    for d in (images_dir, ann_dir):
        if not d.is_dir():
            raise DataError(f"{src} is not a VOCdevkit folder: it lacks {d.name}/ (expected JPEGImages/, "
                            f"Annotations/*.xml and optionally ImageSets/Main/{{train,val}}.txt)")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    xmls = {p.stem: p for p in sorted(ann_dir.glob("*.xml"))}
    split_files = {s: src / "ImageSets" / "Main" / f"{s}.txt" for s in SPLITS}
    present = [s for s, p in split_files.items() if p.is_file()]
    if len(present) == 1:
        missing = split_files["val" if present == ["train"] else "train"]
        raise DataError(f"{split_files[present[0]]} exists but {missing} does not: give both split files, or "
                        f"neither for a seeded split (--val-fraction)")
    if present:
        split_of: dict[str, str | None] = {}
        for s, path in split_files.items():
            for line in path.read_text().splitlines():
                stem = line.split()[0] if line.split() else None
                if stem is None:
                    continue
                if stem in split_of and split_of[stem] != s:
                    raise DataError(f"{stem} is listed in both {split_files['train']} and {split_files['val']}")
                split_of[stem] = s
                if stem not in xmls:
                    say(f"skipped {ann_dir / (stem + '.xml')}: listed in {path.name}, but there is no such file")
        unlisted = sorted(set(xmls) - set(split_of))
        if unlisted:
            say(f"left out {len(unlisted)} files of {ann_dir} listed in neither train.txt nor val.txt, e.g. "
                f"{unlisted[0]}.xml")
    else:
        split_of = dict.fromkeys(xmls)
    items = []
    for stem, xml in xmls.items():
        if stem not in split_of:
            continue
        if stem not in images:
            say(f"skipped {xml}: its image {images_dir / stem}.* is missing")
            continue
        items.append(_Item(split_of[stem], images[stem], images[stem].name, xml))
    return _seeded_split(items, val_fraction, seed)


# ----------------------------------------------------------------------------------------------------
# YOLO
def _yolo_labels_path(image: Path) -> Path:
    """YOLOv5's rule (as FiftyOne applies it): the last ``/images/`` of the path becomes ``/labels/``, then .txt."""
    parts = list(image.parts)
    k = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")


def _yolo_problem(txt: Path, n_classes: int) -> str | None:
    try:
        lines = txt.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read ({reason(e)})"
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            return f"line {n} has {len(fields)} fields; a box is 5: class x_center y_center width height"
        try:
            cls, coords = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            return f"line {n} is not an integer class id and four numbers: {line.strip()!r}"
        if not 0 <= cls < n_classes:
            return (f"line {n} has class id {cls}, out of range for the {n_classes} names of data.yaml "
                    f"(0..{n_classes - 1})")
        if not all(abs(v) < float("inf") for v in coords):
            return f"line {n} has a non-finite coordinate"
    return None


def _yolo_source(src: Path) -> tuple[Path, dict]:
    yaml_path = src if src.is_file() else next((src / n for n in ("data.yaml", "dataset.yaml") if (src / n).is_file()),
                                              src / "data.yaml")
    try:
        d = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read the YOLO dataset file {yaml_path}: {reason(e)}") from e
    if not isinstance(d, dict) or not d.get("names") or "train" not in d:
        raise DataError(f"{yaml_path} needs `names` (the class names) and `train` (and usually `val`): the images "
                        f"folders or .txt lists; found keys {sorted(d) if isinstance(d, dict) else type(d).__name__}")
    return yaml_path, d


def _yolo_classes(d: dict, yaml_path: Path) -> list[str]:
    names = d["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{yaml_path}: `names` as a mapping needs the ids 0..{len(names) - 1}, found "
                            f"{sorted(names)}")
        names = [names[i] for i in range(len(names))]
    return [str(n) for n in names]


def _yolo_split_images(d: dict, split: str, yaml_path: Path) -> list[tuple[Path, Path]]:
    """(image, folder its output name is relative to) for a data.yaml split: folders (recursively) or .txt lists
    of images, relative to ``path`` or to the YAML."""
    entries = d[split] if isinstance(d[split], list) else [d[split]]
    images: list[tuple[Path, Path]] = []
    for entry in entries:
        p = Path(d.get("path") or "") / str(entry)
        p = p if p.is_absolute() else yaml_path.parent / p
        if p.suffix == ".txt" and p.is_file():
            for line in filter(None, map(str.strip, p.read_text().splitlines())):
                image = Path(line) if Path(line).is_absolute() else p.parent / line
                images.append((image, image.parent))
        elif p.is_dir():
            images += [(image, p) for image in list_images(p)]
        else:
            raise DataError(f"{yaml_path}: {split} is {entry!r}, but {p} is neither a folder nor a .txt list of images")
    return images


def _yolo_items(src: Path, val_fraction: float, seed: int,
                say: Callable[[str], None]) -> tuple[list[_Item], list[str], Path]:
    yaml_path, d = _yolo_source(src)
    classes = _yolo_classes(d, yaml_path)
    items, seen = [], set()
    for split in [s for s in SPLITS if s in d]:
        images = _yolo_split_images(d, split, yaml_path)
        names: dict[str, Path] = {}
        for image, base in images:
            if "images" not in image.parts:
                raise DataError(f"{image} (split {split} of {yaml_path}): YOLO image paths must contain an "
                                f"images/ folder; its labels are found in the matching labels/ folder")
            if image.resolve() in seen:
                continue
            seen.add(image.resolve())
            label = _yolo_labels_path(image)
            if not image.is_file():
                say(f"skipped {label}: its image {image} is missing")
                continue
            name = image.relative_to(base).as_posix()
            if name in names:
                raise DataError(f"{image} and {names[name]} (split {split} of {yaml_path}) would both be {name} in "
                                f"the converted split; rename one")
            names[name] = image
            items.append(_Item(split if "val" in d else None, image, name, label if label.is_file() else None))
        # label files without an image, in the labels/ folders that match the split's images/ folders
        stems = {image.with_suffix("") for image, _ in images}
        for base in {base for _, base in images if "images" in base.parts}:
            labels_dir = _yolo_labels_path(base / "x.jpg").parent
            for txt in sorted(labels_dir.rglob("*.txt")) if labels_dir.is_dir() else []:
                stem = base / txt.relative_to(labels_dir).with_suffix("")
                if stem not in stems:
                    say(f"skipped {txt}: there is no image {stem}.* for it")
    return _seeded_split(items, val_fraction, seed), classes, yaml_path


# ----------------------------------------------------------------------------------------------------
def _seeded_split(items: list[_Item], val_fraction: float, seed: int) -> list[_Item]:
    """Items without a split: `val_fraction` of them (at least one) to val, drawn with `seed`; the rest train."""
    open_items = sorted((it for it in items if it.split is None), key=lambda it: str(it.image))
    if open_items:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        order = list(range(len(open_items)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_fraction * len(open_items)))
        for rank, k in enumerate(order):
            open_items[k].split = "val" if rank < n_val else "train"
    return items


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty; choose another --out, or --force to replace it")


def _place(src: Path, dst: Path, copy: bool) -> None:
    """`dst` as a hard link to `src` (no space used, independent of the source folder's later moves), a copy where
    the file system has no hard links (another device) or `copy`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _import_fiftyone(fmt: str, items: list[_Item], classes: list[str] | None, work: Path,
                     yaml_path: Path | None) -> Any:
    """A temporary FiftyOne dataset of the checked items, one sample per image, tagged with its split. Only the
    checked files are shown to the importer: VOC through a folder of copies of the good XML files, YOLO through
    a data.yaml whose splits are .txt lists of the good images."""
    import fiftyone as fo

    work.mkdir(parents=True)
    dataset = fo.Dataset()
    try:
        for split in SPLITS:
            chosen = [it for it in items if it.split == split]
            if not chosen:
                continue
            if fmt == "voc":
                labels = work / "voc" / split
                labels.mkdir(parents=True)
                for it in chosen:
                    shutil.copyfile(it.label, labels / it.label.name)
                dataset.add_dir(dataset_type=fo.types.VOCDetectionDataset, data_path=str(chosen[0].image.parent),
                                labels_path=str(labels), label_field="ground_truth", tags=split)
            else:
                listing = work / f"yolo_{split}.txt"
                listing.write_text("".join(f"{it.image.absolute()}\n" for it in chosen))
                data_yaml = work / f"yolo_{split}.yaml"
                data_yaml.write_text(yaml.safe_dump({"names": classes, split: str(listing)}))
                dataset.add_dir(dataset_type=fo.types.YOLOv5Dataset, yaml_path=str(data_yaml), split=split,
                                include_all_data=True, label_field="ground_truth", tags=split)
    except BaseException:
        dataset.delete()
        raise
    return dataset


def _coco_files(dataset: Any, items: list[_Item], classes: list[str],
                say: Callable[[str], None], progress: bool) -> dict[str, dict]:
    """The COCO instances dict per split from the FiftyOne samples: boxes to pixels of the real image size,
    clipped to it; `difficult` -> iscrowd."""
    by_path = {os.path.abspath(it.image): it for it in items}
    cat_id = {name: k + 1 for k, name in enumerate(classes)}
    files = {s: {"images": [], "annotations": [],
                 "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in cat_id.items()]} for s in SPLITS}
    for it in sorted(items, key=lambda it: it.image_id):
        files[it.split]["images"].append({"id": it.image_id, "file_name": it.file_name, "width": it.width,
                                          "height": it.height})
    next_id = 1
    samples = sorted(dataset.select_fields("ground_truth"), key=lambda s: by_path[os.path.abspath(s.filepath)].image_id)
    for sample in progress_bar(samples, desc="annotations", disable=not progress):
        it = by_path[os.path.abspath(sample.filepath)]
        W, H = it.width, it.height
        clipped, dropped, unknown = 0, 0, set()
        dets = sample.ground_truth.detections if sample.ground_truth is not None else []
        for det in dets:
            if det.label not in cat_id:
                unknown.add(det.label)
                continue
            x, y, w, h = det.bounding_box
            x0, y0, x1, y1 = x * W, y * H, (x + w) * W, (y + h) * H
            cx0, cy0, cx1, cy1 = min(max(x0, 0), W), min(max(y0, 0), H), min(max(x1, 0), W), min(max(y1, 0), H)
            if not (cx1 > cx0 and cy1 > cy0):
                dropped += 1
                continue
            clipped += (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
            bbox = [round(cx0, 2), round(cy0, 2), round(cx1 - cx0, 2), round(cy1 - cy0, 2)]
            crowd = int(bool(det.get_field("difficult"))) if det.has_field("difficult") else 0
            files[it.split]["annotations"].append({"id": next_id, "image_id": it.image_id,
                                                   "category_id": cat_id[det.label], "bbox": bbox,
                                                   "area": round(bbox[2] * bbox[3], 2), "iscrowd": crowd})
            next_id += 1
        notes = ([f"{_boxes(clipped)} reaching past the image ({W}x{H}) clipped to it"] if clipped else []) + \
                ([f"{_boxes(dropped)} with no extent inside the image ({W}x{H}) dropped"] if dropped else []) + \
                ([f"objects of classes not in the class list left out: {sorted(unknown)}"] if unknown else [])
        if notes:
            say(f"{it.label}: {'; '.join(notes)}")
    return files


def _boxes(n: int) -> str:
    return f"{n} box{'es' if n != 1 else ''}"


def convert(fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0,
            classes: Iterable[str] | None = None, copy: bool = False, force: bool = False,
            progress: bool = True) -> Conversion:
    """Convert a VOC (`fmt` "voc") or YOLO ("yolo") folder `src` into COCO 2017-layout data at `out`.

    val_fraction, seed: the seeded split where the source defines none (VOC without ImageSets/Main/{train,val}.txt,
        YOLO without `val`). classes: VOC's class list (category ids 1..K in this order; objects of other names
        are left out with a line); default the names found, sorted. YOLO takes data.yaml's names.
    copy: copy the images instead of hard-linking them. force: replace a non-empty `out`.
    Needs FiftyOne (the `fiftyone` extra). Returns a `Conversion`; its problems were printed, one line each.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown source format {fmt!r}; expected one of {list(FORMATS)}")
    try:
        from pkdkit.fiftyone_app import _quiet_fiftyone, notebook_settings
    except ImportError as e:
        raise ConfigError(f"pkdkit convert reads the source through FiftyOne: {e}") from None
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataError(f"source {src} does not exist")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ConfigError(f"--out {out} holds the source {src}; write the converted data elsewhere")
    _check_out(out, force)
    problems: list[str] = []

    def say(line: str) -> None:
        problems.append(line)
        tqdm.write(line, file=sys.stderr)  # above a running progress bar

    yaml_path = None
    if fmt == "voc":
        items = _voc_items(src, val_fraction, seed, say)
    else:
        items, class_list, yaml_path = _yolo_items(src, val_fraction, seed, say)
    checked, names = [], set()
    for it in progress_bar(items, desc="check", disable=not progress):
        try:
            it.width, it.height = _image_size(it.image)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            say(f"skipped {it.label or it.image}: its image {it.image} cannot be read ({reason(e)})")
            continue
        if it.label is not None:
            if fmt == "voc":
                why, found = _voc_problem(it.label, it.width, it.height)
                names.update(found)
            else:
                why = _yolo_problem(it.label, len(class_list))
            if why:
                say(f"skipped {it.label}: {why}")
                continue
        checked.append(it)
    if fmt == "voc":
        class_list = [str(c) for c in classes] if classes is not None else sorted(names)
    if len(set(class_list)) != len(class_list) or not class_list:
        raise DataError(f"the class list of {yaml_path or src} must be non-empty and without duplicates, found "
                        f"{class_list}")
    for split, folder in SPLITS.items():
        if not any(it.split == split for it in checked):
            raise DataError(f"no usable image left for {folder} from {src} ({len(items)} found, problems above); "
                            f"nothing was written")
    for k, it in enumerate(sorted(checked, key=lambda it: (list(SPLITS).index(it.split), it.file_name)), 1):
        it.image_id = k

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent.absolute() / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with notebook_settings(), _quiet_fiftyone():
            dataset = _import_fiftyone(fmt, checked, class_list, tmp / "_fiftyone", yaml_path)
            try:
                files = _coco_files(dataset, checked, class_list, say, progress)
            finally:
                dataset.delete()
        shutil.rmtree(tmp / "_fiftyone")
        for it in progress_bar(checked, desc="images", disable=not progress):
            _place(it.image, tmp / SPLITS[it.split] / it.file_name, copy)
        for split, folder in SPLITS.items():
            files[split]["info"] = {"description": f"converted by pkdkit from {fmt} {src.absolute()}"}
            write_json(files[split], tmp / "annotations" / f"instances_{folder}.json", indent=None)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Conversion(out, files["train"]["categories"], {s: len(f["images"]) for s, f in files.items()},
                      {s: len(f["annotations"]) for s, f in files.items()}, problems)
