"""Specification of pkdkit.fasteval: FastCOCOeval gives exactly pycocotools' COCOeval numbers, only faster.

The generated ground truth has 150 images of three sizes, polygon masks, crowd regions (RLE), objects in all
three COCO area ranges, non-contiguous category ids, one category without ground truth and images without
objects. The results look like a detector's: jittered boxes and masks, confused classes, duplicates, false
positives (also on images without objects), scores rounded to 1e-3 so that ties occur, RLE masks.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pkdkit.evaluate import STAT_NAMES, coco_evaluate, cocoeval_metrics, run_cocoeval

pytest.importorskip("faster_coco_eval")
from pkdkit.fasteval import DEFAULT_COCOEVAL, FastCOCOeval  # noqa: E402

CATEGORY_IDS = (2, 3, 7, 11, 20, 31)  # 31 never has ground truth


def _ellipse(x: float, y: float, w: float, h: float, n: int = 12) -> list[float]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return [round(float(v), 2) for v in np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], 1).ravel()]


def _rle(polygon: list[float], height: int, width: int) -> tuple[dict, float]:
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}, float(mask_utils.area(rle))


def _box(rng: np.random.Generator, x: float, y: float, w: float, h: float, width: int, height: int) -> list[float]:
    x, y = min(max(x, 0.0), width - 2.0), min(max(y, 0.0), height - 2.0)
    return [round(x, 2), round(y, 2), round(max(min(w, width - x), 1.0), 2), round(max(min(h, height - y), 1.0), 2)]


def make_gt_and_results(n_images: int = 150, seed: int = 0, category_ids: tuple[int, ...] = CATEGORY_IDS,
                        empty: int = 1, objects: int = 9) -> tuple[dict, list[dict]]:
    """The last `empty` categories never have ground truth (detections may still name them)."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []

    def detection(image_id: int, cat: int, box: list[float], height: int, width: int) -> dict:
        return {"image_id": image_id, "category_id": cat, "bbox": box, "score": round(float(rng.random()), 3),
                "segmentation": _rle(_ellipse(*box), height, width)[0]}

    for image_id in range(1, n_images + 1):
        width, height = int(rng.choice([160, 200, 256])), int(rng.choice([120, 160, 200]))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        for _ in range(0 if image_id % 10 == 0 else int(rng.integers(1, objects))):
            side = float(np.exp(rng.uniform(math.log(5), math.log(150))))  # small, medium and large
            box = _box(rng, rng.uniform(0, width - side / 2), rng.uniform(0, height - side / 2),
                       side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4), width, height)
            cat, crowd = int(rng.choice(category_ids[:-empty])), int(rng.random() < 0.08)
            rle, area = _rle(_ellipse(*box, n=16), height, width)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box, "area": area,
                         "iscrowd": crowd, "segmentation": rle if crowd else [_ellipse(*box, n=16)]})
            for _ in range(rng.poisson(1.6)):
                x, y, w, h = box
                jittered = _box(rng, x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h),
                                w * rng.uniform(0.75, 1.25), h * rng.uniform(0.75, 1.25), width, height)
                c = cat if rng.random() < 0.85 else int(rng.choice(category_ids))
                results.append(detection(image_id, c, jittered, height, width))
        for _ in range(rng.poisson(4)):
            w, h = rng.uniform(3, width / 2), rng.uniform(3, height / 2)
            box = _box(rng, rng.uniform(0, width - w), rng.uniform(0, height - h), w, h, width, height)
            results.append(detection(image_id, int(rng.choice(category_ids)), box, height, width))
    cats = [{"id": c, "name": f"class_{c}"} for c in category_ids]
    return {"images": images, "annotations": anns, "categories": cats}, results


@pytest.fixture(scope="module")
def gt_and_results():
    return make_gt_and_results()


def evaluate_with(cls: type, gt: dict, results: list[dict], iou_type: str, max_dets: int = 100,
                  use_cats: int = 1, max_dets_list: list[int] | None = None) -> tuple[object, str]:
    """Plain pycocotools flow with evaluator `cls` on private copies; returns (evaluator, printed summary)."""
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        cocoeval = cls(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        cocoeval.params.maxDets = max_dets_list or [1, 10, max_dets]
        cocoeval.params.useCats = use_cats
        cocoeval.evaluate()
        cocoeval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        cocoeval.summarize()
    return cocoeval, summary.getvalue()


def assert_same_evaluation(fast: object, slow: COCOeval) -> None:
    for key in ("precision", "recall", "scores"):
        assert fast.eval[key].shape == slow.eval[key].shape, key
        assert np.array_equal(fast.eval[key], slow.eval[key]), f"eval[{key!r}] differs from pycocotools'"
    assert fast.eval["counts"] == slow.eval["counts"]


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_all_twelve_stats_and_per_class_ap_equal_pycocotools_exactly(gt_and_results, iou_type):
    gt, results = gt_and_results
    assert len(results) > 1000 and any(a["iscrowd"] for a in gt["annotations"])
    slow, slow_text = evaluate_with(COCOeval, gt, results, iou_type)
    fast, fast_text = evaluate_with(FastCOCOeval, gt, results, iou_type)

    assert_same_evaluation(fast, slow)
    assert list(fast.stats) == list(slow.stats)
    assert len(fast.stats) == len(STAT_NAMES) == 12
    assert fast_text == slow_text  # the same printed summary
    fast_metrics, slow_metrics = cocoeval_metrics(fast), cocoeval_metrics(slow)
    assert fast_metrics["per_class"] == slow_metrics["per_class"]
    assert fast_metrics["per_class"]["class_31"] == -1.0  # no ground truth: undefined, as pycocotools
    assert 0.05 < fast_metrics["stats"]["AP"] < 0.9  # a realistic, non-trivial score


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_evaluate_uses_the_fast_evaluator_and_matches_plain_pycocotools(gt_and_results, iou_type):
    gt, results = gt_and_results
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()

    assert DEFAULT_COCOEVAL is FastCOCOeval
    assert isinstance(run_cocoeval(coco_gt, results[:50], iou_type), FastCOCOeval)
    default = coco_evaluate(coco_gt, results, (iou_type,))[iou_type]
    plain = coco_evaluate(coco_gt, results, (iou_type,), cocoeval_cls=COCOeval)[iou_type]
    assert default == plain  # stats, per-class AP and summary text


def test_truncation_to_max_dets_per_image_matches_pycocotools(gt_and_results):
    gt, results = gt_and_results
    crowded = [dict(r, score=round(0.5 + 0.001 * i, 3)) for i, r in enumerate(results[:5] * 4)]  # 20 on image 1
    results = crowded + results

    slow, _ = evaluate_with(COCOeval, gt, results, "bbox", max_dets=12)
    fast, _ = evaluate_with(FastCOCOeval, gt, results, "bbox", max_dets=12)

    assert_same_evaluation(fast, slow)


def test_category_agnostic_evaluation_matches_pycocotools(gt_and_results):
    gt, results = gt_and_results
    slow, _ = evaluate_with(COCOeval, gt, results, "bbox", use_cats=0)
    fast, _ = evaluate_with(FastCOCOeval, gt, results, "bbox", use_cats=0)

    assert fast.eval["precision"].shape[2] == 1
    assert_same_evaluation(fast, slow)


def test_empty_perfect_and_all_wrong_results_match_pycocotools(gt_and_results):
    gt, _ = gt_and_results
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"] if not a["iscrowd"]]
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()

    missed = [dict(r, bbox=[r["bbox"][0] + 1000, *r["bbox"][1:]]) for r in perfect]  # no true positive at all
    ap50 = []
    for results in ([], perfect, missed):
        fast = run_cocoeval(coco_gt, results, "bbox", cocoeval_cls=FastCOCOeval)
        slow = run_cocoeval(coco_gt, results, "bbox", cocoeval_cls=COCOeval)
        assert_same_evaluation(fast, slow)
        ap50.append(cocoeval_metrics(fast)["stats"]["AP50"])
    assert ap50 == [0.0, pytest.approx(1.0, abs=1e-12), 0.0]


def test_accumulate_before_evaluate_says_what_to_do(gt_and_results):
    gt, results = gt_and_results
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        cocoeval = FastCOCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")

    with pytest.raises(RuntimeError, match="call evaluate"):
        cocoeval.accumulate()


# 40 categories with COCO-like non-contiguous ids; the last 6 never have ground truth: detections name 4 of
# them (false positives only) and 2 have nothing at all
MANY_CATEGORY_IDS = tuple(range(1, 91, 2))[:40]


@pytest.fixture(scope="module")
def many_categories():
    gt, results = make_gt_and_results(n_images=80, seed=3, category_ids=MANY_CATEGORY_IDS, empty=6, objects=14)
    results = [r for r in results if r["category_id"] not in MANY_CATEGORY_IDS[-2:]]
    return gt, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_many_categories_with_empty_ones_and_crowd_match_pycocotools_exactly(many_categories, iou_type):
    gt, results = many_categories
    assert any(a["iscrowd"] for a in gt["annotations"])
    assert {r["category_id"] for r in results} & set(MANY_CATEGORY_IDS[-6:-2])  # detections without ground truth
    slow, slow_text = evaluate_with(COCOeval, gt, results, iou_type)
    fast, fast_text = evaluate_with(FastCOCOeval, gt, results, iou_type)

    assert fast.eval["precision"].shape[2] == len(MANY_CATEGORY_IDS)
    assert_same_evaluation(fast, slow)
    assert list(fast.stats) == list(slow.stats) and fast_text == slow_text
    per_class = cocoeval_metrics(fast)["per_class"]
    assert per_class == cocoeval_metrics(slow)["per_class"]
    assert all(per_class[f"class_{c}"] == -1.0 for c in MANY_CATEGORY_IDS[-6:])


@pytest.mark.parametrize("max_dets", [[1, 2, 5], [1, 3, 3], [2, 100, 1]])
def test_max_dets_caps_below_the_detections_per_image_match_pycocotools(many_categories, max_dets):
    gt, results = many_categories
    # 12 extra detections of one category on image 1, so that the caps cut some (image, category) lists
    first = next(a for a in gt["annotations"] if a["image_id"] == 1)
    extra = [{**r, "image_id": 1, "category_id": first["category_id"], "score": round(0.2 + 0.05 * i, 3)}
             for i, r in enumerate(r for r in results if r["image_id"] == 1)][:12]
    slow, _ = evaluate_with(COCOeval, gt, extra + results, "segm", max_dets_list=max_dets)
    fast, _ = evaluate_with(FastCOCOeval, gt, extra + results, "segm", max_dets_list=max_dets)

    assert_same_evaluation(fast, slow)


@pytest.mark.parametrize("use_cats", [1, 0])
def test_accumulation_reads_only_the_image_category_pairs_that_have_annotations(many_categories, use_cats):
    """`used_pairs` marks exactly the results pycocotools computes (its evalImgs entries that are not None)."""
    gt, results = many_categories
    fast, _ = evaluate_with(FastCOCOeval, gt, results, "bbox", use_cats=use_cats)
    slow, _ = evaluate_with(COCOeval, gt, results, "bbox", use_cats=use_cats)
    used = fast.used_pairs()
    assert used.tolist() == [e is not None for e in slow.evalImgs]
    if use_cats:  # per category, most (image, category) pairs have neither annotations nor detections
        assert used.sum() < used.size / 3


def test_segm_on_real_shaped_masks_matches_pycocotools_exactly():
    # COCO-sized images, many-vertex polygons, crowd regions as uncompressed RLE, 80 categories (bench/cocodata.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from cocodata import make_eval_set

    gt, results = make_eval_set(40, seed=1, real_shaped=True)
    polygons = [a["segmentation"][0] for a in gt["annotations"] if not a["iscrowd"]]
    vertices = [len(p) // 2 for p in polygons]
    assert min(vertices) >= 12 and max(vertices) >= 100 and max(i["width"] for i in gt["images"]) == 640
    assert any(isinstance(a["segmentation"]["counts"], list) for a in gt["annotations"] if a["iscrowd"])
    fast, fast_text = evaluate_with(FastCOCOeval, gt, results, "segm")
    slow, slow_text = evaluate_with(COCOeval, gt, results, "segm")
    assert_same_evaluation(fast, slow)
    assert list(fast.stats) == list(slow.stats) and fast_text == slow_text and slow.stats[0] > 0
