"""A realistic COCO ground truth and detector results, made from a seed, for timing and checking evaluators.

`make_eval_set(n_images=500)` gives a ground truth with COCO's 80 categories (their real ids and names, read
from torchvision's COCO metadata; the last one, "toothbrush", never has ground truth), polygon masks, crowd
regions as RLE, objects in all three COCO area ranges and images without objects, and results like a
detector's (jittered boxes and masks of the objects, confused classes, duplicates, false positives, scores
rounded to 1e-3 so that ties occur, RLE masks as pkdkit's `predict` writes them). About 16 detections per
image, every one with a mask.

`real_shaped=True` gives masks shaped like COCO's real ones instead: images at COCO's sizes (640 px on the
long side, `pkdkit.synthetic.COCO_SHAPES`), outlines with a vertex every few pixels and an irregular edge (the
ground truth's polygons have tens to hundreds of vertices, like COCO's hand-drawn ones; the detections' RLEs
have as many runs as a Mask R-CNN mask pasted into a 640 x 480 image), where mask conversion and IoUs, not
the matching, dominate an evaluation's time.
"""
from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils

from pkdkit.synthetic import COCO_SHAPES, VERTEX_SPACING



def coco_categories() -> list[dict]:
    """COCO's 80 categories ``{"id", "name"}`` with their real (non-contiguous, 1..90) ids."""
    from torchvision.models._meta import _COCO_CATEGORIES  # index = COCO category id, "N/A" for unused ids

    return [{"id": i, "name": n} for i, n in enumerate(_COCO_CATEGORIES) if i > 0 and n != "N/A"]


def _ellipse(cx: float, cy: float, w: float, h: float, n: int = 16) -> list[float]:
    """A polygon [x0, y0, x1, y1, ...] of an ellipse inscribed in the box centred at (cx, cy)."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    xy = np.stack([cx + 0.5 * w * np.cos(t), cy + 0.5 * h * np.sin(t)], axis=1)
    return [round(float(v), 2) for v in xy.ravel()]


def _outline(cx: float, cy: float, w: float, h: float, rng: np.random.Generator) -> list[float]:
    """A many-vertex, irregular polygon around the ellipse inscribed in the box centred at (cx, cy): a vertex
    every ~VERTEX_SPACING px of its perimeter (at least 12), its radius wobbling smoothly by up to ~15%."""
    n = max(12, int(math.pi * (w + h) / 2 / VERTEX_SPACING))
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    wobble = 1 + sum(rng.uniform(-0.05, 0.05) * np.cos(k * t + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5))
    xy = np.stack([cx + 0.5 * w * wobble * np.cos(t), cy + 0.5 * h * wobble * np.sin(t)], axis=1)
    return [round(float(v), 2) for v in xy.ravel()]


def _rle(polygon: list[float], h: int, w: int) -> tuple[dict, float]:
    """(JSON-able RLE of the polygon's mask, its area in pixels)."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}, float(mask_utils.area(rle))


def _uncompressed(rle: dict) -> dict:
    """The same mask as an uncompressed RLE ``{"size": [h, w], "counts": [int, ...]}`` (column-major runs,
    starting with zeros), as COCO's crowd annotations are stored."""
    flat = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [len(flat)]])).tolist()
    return {"size": rle["size"], "counts": ([0] if flat[0] else []) + runs}


def _clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[float, ...]:
    x, y = min(max(x, 0.0), width - 2.0), min(max(y, 0.0), height - 2.0)
    return x, y, max(min(w, width - x), 1.0), max(min(h, height - y), 1.0)


def make_eval_set(n_images: int = 500, seed: int = 0, dets_per_object: float = 1.6,
                  false_positives: float = 6.0, real_shaped: bool = False) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dict, list of COCO result dicts with "bbox", "score" and "segmentation" RLEs);
    `real_shaped`: COCO-sized images and many-vertex masks (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cats = coco_categories()
    category_ids = [c["id"] for c in cats]
    present = category_ids[:-1]  # the last category never has ground truth (AP -1, as pycocotools)
    zipf = 1 / np.arange(1, len(present) + 1)  # real_shaped: a few categories (COCO's person) dominate
    zipf /= zipf.sum()
    images, anns, results = [], [], []
    for image_id in range(1, n_images + 1):
        if real_shaped:
            height, width = COCO_SHAPES[int(rng.integers(len(COCO_SHAPES)))]
        else:
            width, height = int(rng.choice([320, 400, 480])), int(rng.choice([240, 320, 360]))
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height})
        n_obj = 0 if rng.random() < 0.05 else int(rng.integers(1, 12))
        objects = []
        for _ in range(n_obj):
            side = float(np.exp(rng.uniform(math.log(6), math.log(min(width, height) * 0.9))))  # all areas
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y, w, h = _clip_box(rng.uniform(0, width - w / 2), rng.uniform(0, height - h / 2), w, h, width, height)
            cat = int(rng.choice(present, p=zipf)) if real_shaped else int(rng.choice(present))
            crowd = int(rng.random() < 0.04)
            poly = _outline(x + w / 2, y + h / 2, w, h, rng) if real_shaped else _ellipse(x + w / 2, y + h / 2, w, h)
            rle, area = _rle(poly, height, width)
            if real_shaped and crowd:  # COCO stores its crowd regions as uncompressed RLE
                rle = _uncompressed(rle)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                         "area": area,
                         "iscrowd": crowd, "segmentation": rle if crowd else [poly]})
            objects.append((x, y, w, h, cat))
        for x, y, w, h, cat in objects:
            for _ in range(rng.poisson(dets_per_object)):
                jx, jy = rng.normal(0, 0.1 * w), rng.normal(0, 0.1 * h)
                bx, by, bw, bh = _clip_box(x + jx, y + jy, w * rng.uniform(0.75, 1.25), h * rng.uniform(0.75, 1.25),
                                           width, height)
                c = cat if rng.random() < 0.85 else int(rng.choice(category_ids))
                results.append(_result(image_id, c, bx, by, bw, bh, rng, height, width, real_shaped))
        for _ in range(rng.poisson(false_positives)):
            bw, bh = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            bx, by, bw, bh = _clip_box(rng.uniform(0, width - bw), rng.uniform(0, height - bh), bw, bh, width, height)
            results.append(_result(image_id, int(rng.choice(category_ids)), bx, by, bw, bh, rng, height, width,
                                   real_shaped))
    return {"images": images, "annotations": anns, "categories": cats}, results


def _result(image_id: int, cat: int, x: float, y: float, w: float, h: float, rng: np.random.Generator,
            height: int, width: int, real_shaped: bool = False) -> dict:
    score = round(float(rng.random()), 3)
    polygon = (_outline(x + w / 2, y + h / 2, w * 0.95, h * 0.95, rng) if real_shaped else
               _ellipse(x + w / 2, y + h / 2, w * 0.95, h * 0.95, n=12))
    return {"image_id": image_id, "category_id": cat, "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
            "score": score, "segmentation": _rle(polygon, height, width)[0]}
