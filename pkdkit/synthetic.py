"""A deterministic COCO-format "shapes" dataset: the project's embedded default (no downloads).

Each image is a textured background (smooth colour noise, stripes, a gradient) with 0-6 shapes of five
classes drawn over it in random colours, so that only the *shape* tells the class. Shapes cover a wide
range of scales relative to the image (at 256 px there are COCO small, medium and large objects), some
overlap, and later shapes occlude earlier ones: each annotation describes what is left visible.

Category ids are non-contiguous on purpose (1, 3, 7, 12, 20) so that the label mapping in `data.py` is
always exercised. Unoccluded shapes are stored as polygons, occluded ones (and a random few others) as
compressed RLE, so both pycocotools mask paths are used. Masks are rasterised by pycocotools itself, so
the stored segmentation, bbox and area agree exactly with the pixels drawn.

The same `seed` gives byte-identical JSON and PNG files.

``size="coco"`` draws images at COCO's sizes (640 px on the long side, 360-512 on the other, landscape or
portrait) with shape outlines densified into many-vertex, slightly irregular polygons (one vertex every few
pixels, as COCO's annotators drew them), and ``image_format="jpeg"`` writes JPEG files (quality 90): data that
costs to decode and transform what COCO's does, to measure the loader on (bench/run.py's ``jpeg_loader``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pkdkit.errors import ConfigError
from pkdkit.files import write_text

CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "cross", "supercategory": "shape"},
    {"id": 20, "name": "star", "supercategory": "shape"},
)

MAX_OBJECTS = 6
EMPTY_EVERY = 20  # image index k with k % 20 == 7 has no objects (about 1 in 20 images)
# Shape diameter as a fraction of the image side, drawn log-uniformly: at 256 px this spans
# ~23-205 px (COCO small, medium and large); at 96 px it spans ~9-77 px.
MIN_FRACTION, MAX_FRACTION = 0.09, 0.8
RLE_FRACTION = 0.15  # share of unoccluded shapes stored as RLE anyway
MIN_VISIBLE = 0.5  # an earlier shape must keep at least this share of its pixels visible
PLACEMENT_TRIES = 10
# size="coco": (height, width) choices of COCO's common shapes (640 px on the long side), an outline vertex
# every VERTEX_SPACING pixels, moved off the outline by N(0, OUTLINE_JITTER) pixels
COCO_SHAPES = ((480, 640), (427, 640), (426, 640), (360, 640), (512, 640), (640, 480), (640, 427))
VERTEX_SPACING, OUTLINE_JITTER = 5.0, 0.7
IMAGE_FORMATS = {"png": ("PNG", ".png", {}), "jpeg": ("JPEG", ".jpg", {"quality": 90})}


def make_synthetic_coco(out_dir, n_train: int = 64, n_val: int = 16, size: int | str = 96, seed: int = 0, *,
                        overwrite: bool = False, image_format: str = "png") -> dict:
    """Write the train and val splits under `out_dir` and return their paths.

    size: the side of the square images in pixels, or "coco" for COCO's sizes and many-vertex polygons (see
    the module docstring). image_format: "png" (lossless, the default) or "jpeg".

    Layout: `out_dir/{train,val}/<image_id:06d>.png` (`.jpg` for JPEG) and
    `out_dir/annotations/instances_{train,val}.json`.
    Image and annotation ids start at 1 in each file. Each image is drawn from its own random stream
    (seed, split, index), so changing `n_train` does not change the val split.

    A folder that already holds a dataset (either annotation file, or images in train/ or val/) is refused
    with `ConfigError`, unless `overwrite`: then the old images of those folders are removed first, so no
    stale image is left beside the new ones.

    Returns `{"root", "train_images", "train_json", "val_images", "val_json"}` as `Path`s.
    """
    if size != "coco" and (isinstance(size, str) or size < 32):
        raise ConfigError(f"synthetic image size must be >= 32 px (an integer) or 'coco', got {size!r}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"synthetic image format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if n_train < 0 or n_val < 0:
        raise ConfigError(f"image counts must be >= 0, got n_train={n_train}, n_val={n_val}")
    root = Path(out_dir)
    existing = [p for p in (root / "annotations" / "instances_train.json", root / "annotations" / "instances_val.json")
                if p.exists()]
    existing += [p for split in ("train", "val") if (root / split).is_dir()
                 for ext in ("*.png", "*.jpg") for p in (root / split).glob(ext)]
    if existing and not overwrite:
        raise ConfigError(f"{root} already holds a dataset ({len(existing)} files, e.g. {existing[0]}); choose "
                          f"another folder, or replace it (synth --force / overwrite=True)")
    for p in existing:
        p.unlink()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    paths = {"root": root}
    for split_index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        dataset = _make_split(image_dir, n, size, seed, split_index, image_format)
        ann_file = root / "annotations" / f"instances_{split}.json"
        write_text(json.dumps(dataset, sort_keys=True, separators=(",", ":")), ann_file)
        paths[f"{split}_images"] = image_dir
        paths[f"{split}_json"] = ann_file
    return paths


def _make_split(image_dir: Path, n: int, size: int | str, seed: int, split_index: int, image_format: str) -> dict:
    pil_format, suffix, options = IMAGE_FORMATS[image_format]
    images, annotations = [], []
    for k in range(n):
        image_id = k + 1
        rng = np.random.default_rng([seed, split_index, k])
        n_objects = 0 if k % EMPTY_EVERY == 7 else int(rng.integers(1, MAX_OBJECTS + 1))
        hw = COCO_SHAPES[int(rng.integers(len(COCO_SHAPES)))] if size == "coco" else (size, size)
        pixels, objects = _draw_image(rng, hw, n_objects, dense=size == "coco")
        file_name = f"{image_id:06d}{suffix}"
        Image.fromarray(pixels, "RGB").save(image_dir / file_name, format=pil_format, **options)
        images.append({"id": image_id, "file_name": file_name, "width": hw[1], "height": hw[0],
                       "license": 1, "date_captured": ""})
        for obj in objects:
            annotations.append(_annotation(obj, rng, image_id, len(annotations) + 1))
    return {
        "info": {"description": "pkdkit synthetic shapes", "version": "1.0", "year": 2024,
                 "contributor": "pkdkit", "url": "", "date_created": "",
                 "seed": seed, "image_size": size, "split": ("train", "val")[split_index]},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }


def _draw_image(rng: np.random.Generator, hw: tuple[int, int], n_objects: int,
                dense: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Return the image `(H, W, 3)` uint8 and the placed objects (polygon, full and visible masks); `dense`:
    many-vertex outlines (`_densify`)."""
    canvas = _background(rng, hw)
    objects: list[dict] = []
    for _ in range(n_objects):
        obj = _place(rng, hw, objects, dense)
        if obj is None:
            continue
        for other in objects:  # the new shape occludes everything drawn before it
            other["visible"] &= ~obj["full"]
        colour = _contrasting_colour(rng, canvas, obj["full"])
        canvas[obj["full"]] = colour * _shading(rng, obj, hw)[obj["full"]][:, None]
        objects.append(obj)
    canvas += rng.normal(0.0, 3.0, canvas.shape)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), objects


def _place(rng: np.random.Generator, hw: tuple[int, int], objects: list[dict], dense: bool) -> dict | None:
    """Sample a shape that leaves every earlier shape at least MIN_VISIBLE visible (None if none fits)."""
    cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    fraction = np.exp(rng.uniform(np.log(MIN_FRACTION), np.log(MAX_FRACTION)))
    radius = max(4.0, fraction * min(hw) / 2)
    lo, hi = radius + 1, np.array([hw[1], hw[0]]) - radius - 1  # (x, y) bounds of the centre
    for _ in range(PLACEMENT_TRIES):  # keep class and size, so large shapes are not selected against
        if objects and rng.random() < 0.4:  # next to an earlier shape, so that some overlap
            anchor = objects[int(rng.integers(len(objects)))]
            angle = rng.uniform(0, 2 * np.pi)
            dist = 0.8 * (anchor["radius"] + radius) * rng.uniform(0.5, 1.0)
            cx, cy = anchor["cx"] + dist * np.cos(angle), anchor["cy"] + dist * np.sin(angle)
        else:
            cx, cy = rng.uniform(lo, hi, 2)
        cx, cy = float(np.clip(cx, lo, hi[0])), float(np.clip(cy, lo, hi[1]))
        polygon = _polygon(cat["name"], cx, cy, radius, rng.uniform(0, 2 * np.pi))
        if dense:
            polygon = _densify(polygon, rng)
        full = _rasterise(polygon, hw)
        if full.sum() < 12:
            continue
        if all((o["visible"] & ~full).sum() >= MIN_VISIBLE * o["full"].sum() for o in objects):
            return {"category_id": cat["id"], "polygon": polygon, "cx": cx, "cy": cy, "radius": radius,
                    "full": full, "visible": full.copy()}
    return None


def _polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    """Vertices of a shape of circumradius `r` as a flat COCO polygon `[x0, y0, x1, y1, ...]`."""
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif name in ("square", "triangle"):
        t = np.linspace(0, 2 * np.pi, 4 if name == "square" else 3, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif name == "cross":  # a plus sign with arms a third as wide as it is long
        w = 0.33
        pts = np.array([[w, 1], [w, w], [1, w], [1, -w], [w, -w], [w, -1],
                        [-w, -1], [-w, -w], [-1, -w], [-1, w], [-w, w], [-w, 1]]) * (r / np.hypot(1, w))
    elif name == "star":  # five points, inner radius 0.45 r
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45) * r
        pts = np.stack([np.cos(t), np.sin(t)], 1) * radii[:, None]
    else:
        raise ValueError(f"unknown shape {name!r}")
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T + np.array([cx, cy])
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _densify(polygon: list[float], rng: np.random.Generator) -> list[float]:
    """The outline with a vertex every ~VERTEX_SPACING px along each edge, each moved by N(0, OUTLINE_JITTER)
    px: the many-vertex, slightly irregular polygons of COCO's hand-drawn masks."""
    pts = np.asarray(polygon).reshape(-1, 2)
    ends = np.roll(pts, -1, axis=0)
    parts = []
    for a, b in zip(pts, ends):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / VERTEX_SPACING)))
        parts.append(a + (b - a) * (np.arange(n) / n)[:, None])
    dense = np.concatenate(parts)
    dense = dense + rng.normal(0.0, OUTLINE_JITTER, dense.shape)
    return [round(float(v), 2) for v in dense.reshape(-1)]


def _rasterise(polygon: list[float], hw: tuple[int, int]) -> np.ndarray:
    """Boolean mask `(H, W)` of a polygon, rasterised exactly as pycocotools' annToMask does."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], *hw))
    return mask_utils.decode(rle).astype(bool)


def _background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Float image `(H, W, 3)`: base colour + smooth noise + stripes + gradient."""
    base = rng.uniform(50, 205, 3)
    noise = _smooth_noise(rng, hw, cells=int(rng.integers(2, 7))) * rng.uniform(15, 40)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    yy, xx = yy / h, xx / w
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(1 / 12, 1 / 3)
    phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period
    stripes = np.sin(2 * np.pi * phase + rng.uniform(0, 2 * np.pi))[..., None] * rng.uniform(0, 30, 3)
    gradient = ((xx - 0.5) * np.cos(theta + 1.0) + (yy - 0.5) * np.sin(theta + 1.0))[..., None]
    return base + noise + stripes + gradient * rng.uniform(-60, 60, 3)


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
    """Value noise `(H, W, 3)`: a random `(cells+1)^2` grid, smoothstep-interpolated."""
    grid = rng.normal(size=(cells + 1, cells + 1, 3))

    def steps(n: int) -> tuple[np.ndarray, np.ndarray]:  # grid cell and smoothstep weight of each of n pixels
        t = np.arange(n) * cells / n
        i = t.astype(int)
        f = t - i
        return i, (f * f * (3 - 2 * f))[:, None, None]

    (i, f), (j, g) = steps(hw[0]), steps(hw[1])
    rows = grid[i] * (1 - f) + grid[i + 1] * f  # (H, cells+1, 3)
    g = g.transpose(1, 0, 2)
    return rows[:, j] * (1 - g) + rows[:, j + 1] * g


def _contrasting_colour(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A random colour far enough from the background under `mask` that the shape stays visible."""
    under = canvas[mask].mean(0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):
        if np.abs(colour - under).sum() > 120:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def _shading(rng: np.random.Generator, obj: dict, hw: tuple[int, int]) -> np.ndarray:
    """Multiplicative light ramp `(H, W)` across a shape, so shapes are not flat colour."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - obj["cx"]) * np.cos(angle) + (yy - obj["cy"]) * np.sin(angle)) / obj["radius"]
    return 1.0 + 0.15 * np.clip(ramp, -1, 1)


def _annotation(obj: dict, rng: np.random.Generator, image_id: int, ann_id: int) -> dict:
    """COCO annotation for the visible part of a shape: bbox and area from the visible mask."""
    visible = obj["visible"]
    ys, xs = np.nonzero(visible)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    occluded = bool((visible != obj["full"]).any())
    if occluded or rng.random() < RLE_FRACTION:
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = [obj["polygon"]]
    return {"id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(visible.sum()), "iscrowd": 0, "segmentation": segmentation}
