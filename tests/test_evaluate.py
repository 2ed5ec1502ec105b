"""Specification of pkdkit.evaluate: COCO results from detectors, COCOeval metrics, tables and PR curves.

The hand-made ground truth has four 200x200 images, categories with non-contiguous ids (one without any
ground truth), objects in all three COCO area ranges and a crowd region. Every number is checked against
pycocotools' COCOeval called directly on the same results.
"""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from pkdkit.data import DataError
from pkdkit.evaluate import (STAT_NAMES, EvalRecord, budget_of, coco_evaluate, comparison_table, distinct_results,
                             evaluate_detector, format_delta, plot_pr_curves, pr_curve, predict, results_to_json,
                             run_cocoeval)
from pkdkit.fasteval import DEFAULT_COCOEVAL

SIZE = 200
CATEGORIES = [{"id": 2, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 9, "name": "triangle"},
              {"id": 11, "name": "ghost"}]  # "ghost" has no ground truth
# (image_id, category_id, x, y, w, h, iscrowd): small (< 32^2), medium and large (>= 96^2) objects
OBJECTS = [
    (1, 2, 10, 10, 20, 20, 0), (1, 5, 60, 60, 50, 50, 0), (1, 9, 40, 120, 110, 70, 0),
    (2, 2, 5, 5, 110, 120, 0), (2, 2, 150, 150, 25, 25, 0), (2, 9, 130, 20, 40, 60, 0),
    (3, 5, 20, 20, 100, 100, 0), (3, 5, 150, 10, 30, 30, 0), (3, 5, 120, 120, 70, 70, 1),
    (4, 9, 80, 80, 16, 16, 0), (4, 2, 100, 10, 60, 45, 0),
]


# COCOeval computes precision as tp / (tp + fp + eps), so a perfect score can be 1 - 2e-16.
ONE = pytest.approx(1.0, abs=1e-12)


def _polygon(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _rle(x: float, y: float, w: float, h: float) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([_polygon(x, y, w, h)], SIZE, SIZE))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def gt_path(tmp_path):
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": SIZE, "height": SIZE} for i in (1, 2, 3, 4)]
    anns = [{"id": k + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": float(w * h),
             "iscrowd": crowd, "segmentation": [_polygon(x, y, w, h)]}
            for k, (img, cat, x, y, w, h, crowd) in enumerate(OBJECTS)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def perfect_results(drop_category: int | None = None) -> list[dict]:
    return [{"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": 0.9 - 0.01 * k,
             "segmentation": _rle(x, y, w, h)}
            for k, (img, cat, x, y, w, h, crowd) in enumerate(OBJECTS) if not crowd and cat != drop_category]


def noisy_results(seed: int = 0) -> list[dict]:
    """Jittered boxes, random scores, some wrong classes, false positives (also on the crowd region)."""
    rng = np.random.default_rng(seed)
    results = []
    for img, cat, x, y, w, h, crowd in OBJECTS:
        for _ in range(2):
            bx, by = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
            bw, bh = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
            bx, by = min(max(bx, 0), SIZE - 2), min(max(by, 0), SIZE - 2)
            bw, bh = min(bw, SIZE - bx), min(bh, SIZE - by)
            c = cat if rng.random() < 0.8 else int(rng.choice([c["id"] for c in CATEGORIES]))
            results.append({"image_id": img, "category_id": c, "bbox": [bx, by, bw, bh],
                            "score": float(rng.random()), "segmentation": _rle(bx, by, bw, bh)})
    for img in (1, 2, 3, 4):
        for _ in range(5):
            bx, by = rng.uniform(0, 150, size=2)
            bw, bh = rng.uniform(5, 50, size=2)
            results.append({"image_id": img, "category_id": int(rng.choice([2, 5, 9, 11])), "bbox": [bx, by, bw, bh],
                            "score": float(rng.random()), "segmentation": _rle(bx, by, bw, bh)})
    return results


def pycocotools_stats(gt_path, results: list[dict], iou_type: str) -> np.ndarray:
    """Plain pycocotools, as its README shows it."""
    gt = COCO(str(gt_path))
    dt = gt.loadRes(copy.deepcopy(results))
    cocoeval = COCOeval(gt, dt, iou_type)
    cocoeval.evaluate()
    cocoeval.accumulate()
    cocoeval.summarize()
    return cocoeval.stats


# ----------------------------------------------------------------------------------------------------
# coco_evaluate
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_give_ap_one(gt_path, iou_type):
    metrics = coco_evaluate(gt_path, perfect_results(), (iou_type,))[iou_type]

    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics["stats"][name] == ONE, name
    assert metrics["per_class"] == {"circle": ONE, "square": ONE, "triangle": ONE, "ghost": -1.0}
    assert "Average Precision" in metrics["summary"]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_all_twelve_stats_equal_pycocotools_exactly(gt_path, iou_type):
    results = noisy_results()
    expected = pycocotools_stats(gt_path, results, iou_type)

    stats = coco_evaluate(gt_path, results, (iou_type,))[iou_type]["stats"]

    assert list(stats) == list(STAT_NAMES)
    assert [stats[n] for n in STAT_NAMES] == expected.tolist()
    assert 0.0 < stats["AP"] < 1.0  # the noise makes this a real test


def test_results_file_and_gt_coco_object_give_the_same_metrics_as_lists_and_paths(gt_path, tmp_path):
    results = noisy_results(seed=1)
    path = results_to_json(results, tmp_path / "out" / "results.json")

    from_path = coco_evaluate(gt_path, path, ("bbox", "segm"))
    from_objects = coco_evaluate(COCO(str(gt_path)), results, ("bbox", "segm"))

    assert from_path == from_objects
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_mean_of_per_class_ap_is_the_overall_ap(gt_path):
    metrics = coco_evaluate(gt_path, noisy_results(seed=2))["bbox"]

    with_gt = [ap for ap in metrics["per_class"].values() if ap >= 0]
    assert len(with_gt) == 3
    assert np.mean(with_gt) == pytest.approx(metrics["stats"]["AP"], abs=1e-12)


def test_class_without_predictions_has_per_class_ap_zero(gt_path):
    metrics = coco_evaluate(gt_path, perfect_results(drop_category=5))["bbox"]

    assert metrics["per_class"]["square"] == 0.0
    assert metrics["per_class"]["circle"] == ONE
    assert metrics["per_class"]["ghost"] == -1.0  # no ground truth: undefined, as in COCOeval


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_results_give_zero_stats_instead_of_crashing(gt_path, iou_type):
    metrics = coco_evaluate(gt_path, [], (iou_type,))[iou_type]

    assert metrics["stats"] == {name: 0.0 for name in STAT_NAMES}
    assert metrics["per_class"] == {"circle": 0.0, "square": 0.0, "triangle": 0.0, "ghost": -1.0}


def test_segm_on_results_without_segmentation_raises(gt_path):
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in perfect_results()]

    with pytest.raises(DataError, match="segmentation"):
        coco_evaluate(gt_path, results, ("bbox", "segm"))


def test_results_for_images_outside_the_ground_truth_raise_with_the_image_id(gt_path):
    results = perfect_results() + [{"image_id": 77, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.5}]

    with pytest.raises(DataError, match="77"):
        coco_evaluate(gt_path, results)


def segmentation_only_results(seed: int = 0) -> list[dict]:
    """Results as cocoapi's example segm results: a compressed RLE of a real mask (an ellipse inside each
    jittered box, so its bounding box is not the box it was drawn in), no "bbox"."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    results = []
    for img, cat, x, y, w, h, crowd in OBJECTS:
        cx, cy = x + w / 2 + rng.normal(0, 0.05 * w), y + h / 2 + rng.normal(0, 0.05 * h)
        rx, ry = w / 2 * rng.uniform(0.8, 1.1), h / 2 * rng.uniform(0.8, 1.1)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        c = cat if rng.random() < 0.8 else int(rng.choice([c["id"] for c in CATEGORIES]))
        results.append({"image_id": img, "category_id": c, "score": round(float(rng.random()), 6),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return results


@pytest.mark.parametrize("cocoeval_cls", [COCOeval, DEFAULT_COCOEVAL], ids=["pycocotools", "default"])
def test_segmentation_results_without_bbox_give_pycocotools_numbers_for_both_iou_types(gt_path, tmp_path,
                                                                                      cocoeval_cls):
    """loadRes derives each box from its mask; pkdkit evaluates such a file exactly as plain pycocotools."""
    path = results_to_json(segmentation_only_results(), tmp_path / "segm_results.json")

    metrics = coco_evaluate(gt_path, path, ("bbox", "segm"), cocoeval_cls=cocoeval_cls)

    for iou_type in ("bbox", "segm"):
        gt = COCO(str(gt_path))
        plain = COCOeval(gt, gt.loadRes(str(path)), iou_type)
        plain.evaluate()
        plain.accumulate()
        plain.summarize()
        assert [metrics[iou_type]["stats"][n] for n in STAT_NAMES] == plain.stats.tolist(), iou_type
        assert 0.0 < metrics[iou_type]["stats"]["AP"] < 1.0, iou_type


def test_results_whose_box_cannot_be_read_are_refused_with_their_index(gt_path):
    segm_only = segmentation_only_results()
    boxed = perfect_results()
    # result #0 has a bbox, so pycocotools reads every result's box from its "bbox"
    with pytest.raises(DataError, match=r"result #3 has no 'bbox' but result #0 has one"):
        coco_evaluate(gt_path, boxed[:3] + segm_only[3:])
    # result #0 has none, so every box comes from a compressed RLE: a polygon cannot give it
    polygon = {**segm_only[2], "segmentation": [_polygon(10, 10, 20, 20)]}
    with pytest.raises(DataError, match=r"result #2 needs a 'bbox', or a 'segmentation' as a compressed RLE"):
        coco_evaluate(gt_path, segm_only[:2] + [polygon] + segm_only[3:], ("segm",))
    bare = {k: v for k, v in segm_only[1].items() if k != "segmentation"}
    with pytest.raises(DataError, match=r"result #1 needs a 'bbox', or a 'segmentation'"):
        coco_evaluate(gt_path, [segm_only[0], bare])
    with pytest.raises(DataError, match=r"result #0 needs \['category_id', 'image_id', 'score'\]"):
        coco_evaluate(gt_path, [{"image_id": 1, "segmentation": segm_only[0]["segmentation"]}])


def test_a_results_file_that_is_not_a_list_is_refused(gt_path, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"annotations": perfect_results()}))  # a COCO-file layout, not a results list
    with pytest.raises(DataError, match=r"results.json: expected a JSON list of COCO results, found dict"):
        coco_evaluate(gt_path, path)


def test_evaluation_leaves_results_and_ground_truth_unmodified(gt_path):
    gt = COCO(str(gt_path))
    gt_before = copy.deepcopy(gt.dataset["annotations"])
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in noisy_results()]
    results_before = copy.deepcopy(results)

    coco_evaluate(gt, results, ("bbox",))
    coco_evaluate(gt, perfect_results(), ("segm",))

    assert results == results_before  # loadRes would have added "segmentation", "area", "id", "iscrowd"
    assert [{k: a[k] for k in gt_before[0]} for a in gt.dataset["annotations"]] == gt_before
    json.dumps(gt.dataset)  # COCOeval's segm pass would have left byte RLEs in the ground truth


def test_max_dets_limits_detections_per_image_and_class(gt_path):
    results = noisy_results()
    at_100 = coco_evaluate(gt_path, results)["bbox"]["stats"]
    at_10 = coco_evaluate(gt_path, results, max_dets=10)["bbox"]["stats"]

    assert at_10["AR100"] == at_10["AR10"]  # the last maxDets entry is now 10
    assert at_10["AR10"] == at_100["AR10"]
    assert at_10["AP"] >= 0.0  # pycocotools' summarize would report -1 here


# ----------------------------------------------------------------------------------------------------
# PR curves, tables, plots
def test_pr_curve_has_101_points_and_is_one_for_perfect_predictions(gt_path):
    cocoeval = run_cocoeval(gt_path, perfect_results(), "bbox")

    recall, precision = pr_curve(cocoeval, iou=0.5)
    assert recall.shape == precision.shape == (101,)
    assert recall[0] == 0.0 and recall[-1] == 1.0
    assert precision.tolist() == [ONE] * 101

    recall, precision = pr_curve(cocoeval, iou=0.75, area="small", cat_id=2)
    assert precision.shape == (101,) and precision.tolist() == [ONE] * 101
    _, ghost = pr_curve(cocoeval, cat_id=11)
    assert np.all(np.isnan(ghost))  # no ground truth: undefined


def test_pr_curve_is_the_per_class_mean_of_cocoeval_precision(gt_path):
    cocoeval = run_cocoeval(gt_path, noisy_results(), "bbox")

    _, precision = pr_curve(cocoeval, iou=0.5)

    expected = cocoeval.eval["precision"][0, :, :3, 0, -1].mean(axis=1)  # cats 2, 5, 9 have ground truth
    np.testing.assert_allclose(precision, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="IoU thresholds"):
        pr_curve(cocoeval, iou=0.52)


def _metrics(ap: float, ap50: float) -> dict:
    stats = {name: 0.5 for name in STAT_NAMES} | {"AP": ap, "AP50": ap50, "APs": -1.0}
    return {"bbox": {"stats": stats, "per_class": {}, "summary": ""}}


def test_comparison_table_has_one_row_per_run_and_ap_delta_to_the_first():
    table = comparison_table({"baseline": _metrics(0.25, 0.5),
                              "distilled": {"metrics": _metrics(0.312, 0.6)},  # an evaluate_detector record
                              "boxes only": {"bbox": _metrics(0.1, 0.2)["bbox"]}})
    lines = table.splitlines()

    assert lines[0] == "| run | AP | AP50 | AP75 | APs | APm | APl | ΔAP |"
    assert lines[2] == "| baseline | 25.0 | 50.0 | 50.0 | n/a | 50.0 | 50.0 | 0.0 |"
    assert lines[3] == "| distilled | 31.2 | 60.0 | 50.0 | n/a | 50.0 | 50.0 | +6.2 |"
    assert lines[4].endswith("| -15.0 |")
    segm = comparison_table({"a": _metrics(0.3, 0.5)}, iou_type="segm", stats=("AP",))
    assert segm.splitlines()[-1] == "| a | n/a | n/a |"


def test_eval_record_names_its_stats_and_budget_and_reads_what_evaluate_writes(tmp_path):
    record = EvalRecord({"metrics": _metrics(0.25, 0.5), "config": {"budget": {"init": "initial", "epochs": 12}}})
    assert record.ap == 0.25 and record.stat("AP50") == 0.5 and record.stats()["APs"] == -1.0
    assert record.has("bbox") and not record.has("segm")
    assert record.budget == {"init": "initial", "epochs": 12}
    assert EvalRecord.of(_metrics(0.1, 0.2)).ap == 0.1 and EvalRecord.of(record) is record  # coco_evaluate's output
    assert EvalRecord.of_stats(record.stats(), record.config) == {"metrics": {"bbox": {"stats": record.stats()}},
                                                                  "config": record.config}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(record))
    assert EvalRecord.read(path) == {**record, "path": str(path.resolve())}
    with pytest.raises(DataError, match="cannot read the evaluation record"):
        EvalRecord.read(tmp_path / "missing.json")


def test_budget_of_reads_the_budget_or_counts_the_epochs_of_configs_written_before_budgets():
    assert budget_of({"budget": {"init": "x", "epochs": 3}, "train": {"epochs": 9}}) == {"init": "x", "epochs": 3}
    assert budget_of({"train": {"epochs": 9}}) == {"init": "unknown", "epochs": 9}
    assert budget_of({"weights": "FCOS_ResNet50_FPN_Weights.COCO_V1"}) == {} == budget_of(None)
    # a table shows budgets only when a record has one: a torchvision reference beside a trained student
    student = {"metrics": _metrics(0.2, 0.4), "config": {"budget": {"init": "i", "epochs": 2}}}
    reference = {"metrics": _metrics(0.3, 0.5), "config": {"weights": "W"}}
    table = comparison_table({"student": student, "reference": reference}, stats=("AP",))
    assert table.splitlines()[2:] == ["| student | 2 | i | 20.0 | 0.0 |", "| reference | ? | ? | 30.0 | +10.0 |"]


def test_plot_pr_curves_returns_a_figure_with_one_curve_per_run(gt_path, tmp_path):
    from matplotlib.figure import Figure

    runs = {"perfect": run_cocoeval(gt_path, perfect_results(), "bbox"),
            "noisy": run_cocoeval(gt_path, noisy_results(), "bbox")}

    fig = plot_pr_curves(runs, iou=0.5)

    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [line.get_label().split(" ")[0] for line in ax.get_lines()] == ["perfect", "noisy"]
    fig.savefig(tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 0
    # the legend sits beside the axes, covering no curve
    fig.canvas.draw()
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= box.x1


def test_runs_sharing_a_results_file_are_drawn_once_under_a_joint_label(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    merged = distinct_results({"baseline": a, "one_shot": b, "progressive": str(tmp_path / "." / "b.json")})
    assert merged == {"baseline": a.resolve(), "one_shot = progressive": b.resolve()}


def test_format_delta_never_writes_a_signed_zero():
    assert [format_delta(v) for v in (1.26, -2.0, -0.04, 0.04, 0.0, -0.0)] == ["+1.3", "-2.0", "0.0", "0.0", "0.0", "0.0"]


# ----------------------------------------------------------------------------------------------------
# predict / evaluate_detector on the synthetic dataset
class OracleDetector(nn.Module):
    """A "detector" that returns the ground truth of each image it sees, in dataset order.

    It stands in for a perfect model so that predict's conversion (labels -> category ids, xyxy -> xywh,
    masks -> RLE) can be checked against exact expectations: AP must be 1.0.
    """

    def __init__(self, dataset):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # predict moves the model: give it a parameter
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.seen = 0

    def forward(self, images):
        outputs = []
        for image in images:
            target = self.targets[self.seen]
            self.seen += 1
            k = len(target["labels"])
            out = {"boxes": target["boxes"] * self.scale, "labels": target["labels"],
                   "scores": torch.linspace(0.9, 0.5, k)}
            if "masks" in target:
                out["masks"] = target["masks"][:, None].float() * 0.8  # probabilities (K, 1, H, W)
            assert image.shape[-2:] == target.get("masks", image).shape[-2:]
            outputs.append(out)
        return outputs


@pytest.fixture
def val_set(tiny_coco):
    from pkdkit.data import CocoDetection

    return CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"], masks=True)


def test_oracle_predictions_through_predict_give_ap_one_for_boxes_and_masks(val_set):
    model = OracleDetector(val_set).train()

    results = predict(model, val_set, val_set.label_map, batch_size=3, progress=False)

    assert model.training  # training mode restored
    assert {r["category_id"] for r in results} <= set(val_set.coco.getCatIds())
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    metrics = coco_evaluate(val_set.coco, results, ("bbox", "segm"))
    assert metrics["bbox"]["stats"]["AP"] == ONE
    assert metrics["segm"]["stats"]["AP"] == ONE


def test_labels_the_label_map_does_not_know_are_dropped_with_a_warning(val_set):
    from pkdkit.data import LabelMap

    full = val_set.label_map
    partial = LabelMap(full.labels[:-1], full.cat_ids[:-1], full.names[:-1])  # forgets the last class
    model = OracleDetector(val_set).eval()

    with pytest.warns(UserWarning, match=re.escape(f"label: count {{{full.labels[-1]}: ")):
        results = predict(model, val_set, partial, score_threshold=0.6, progress=False)

    assert not model.training
    assert full.cat_ids[-1] not in {r["category_id"] for r in results}
    assert all(r["score"] >= 0.6 for r in results)
    per_class = coco_evaluate(val_set.coco, results)["bbox"]["per_class"]
    assert per_class[full.names[-1]] == 0.0


def test_predict_refuses_an_augmenting_training_dataset(tiny_coco):
    from pkdkit.data import CocoDetection

    train_set = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    with pytest.raises(ValueError, match="train=True"):
        predict(OracleDetector(train_set), train_set, train_set.label_map, progress=False)


def _tiny_detector(arch: str, num_classes: int) -> nn.Module:
    from pkdkit.models import DetectorSpec, build_detector

    torch.manual_seed(0)
    return build_detector(DetectorSpec(arch=arch, backbone="resnet18", num_classes=num_classes,
                                       fpn_channels=32, min_size=96, max_size=96))


def test_evaluate_detector_writes_results_and_metrics_with_their_config(tiny_coco, tmp_path):
    from pkdkit.data import CocoDetection

    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    model = _tiny_detector("retinanet", ds.label_map.num_classes)
    model.score_thresh = 0.0  # an untrained RetinaNet scores ~0.01 (prior), below the default 0.05
    config = {"arch": "retinanet", "epochs": 0, "lr": 0.01}

    record = evaluate_detector(model, ds, ds.label_map, out_dir=tmp_path / "eval", name="student",
                               config=config, progress=False)

    assert record["iou_types"] == ["bbox"]
    assert set(record["metrics"]["bbox"]["stats"]) == set(STAT_NAMES)
    saved = json.loads((tmp_path / "eval" / "student.json").read_text())
    assert EvalRecord.read(tmp_path / "eval" / "student.json") == record  # the record returned is the one written
    assert record["path"] == str((tmp_path / "eval" / "student.json").resolve()) and "path" not in saved
    assert saved["config"] == config
    assert saved["ann_file"] == str(tiny_coco["val_json"])
    assert saved["timestamp"] and saved["num_images"] == len(ds)
    results = json.loads((tmp_path / "eval" / "student_results.json").read_text())
    assert len(results) == record["num_detections"] > 0
    assert {r["category_id"] for r in results} <= set(ds.coco.getCatIds())
    assert coco_evaluate(tiny_coco["val_json"], results) == record["metrics"]


def test_evaluate_detector_adds_segm_for_mask_rcnn(tiny_coco):
    from pkdkit.data import CocoDetection

    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    model = _tiny_detector("maskrcnn", ds.label_map.num_classes)
    model.roi_heads.detections_per_img = 10  # the mask head dominates CPU time: keep it at 10 per image

    record = evaluate_detector(model, ds, ds.label_map, batch_size=8, progress=False)

    assert record["iou_types"] == ["bbox", "segm"]
    assert record["num_detections"] > 0
    segm = record["metrics"]["segm"]["stats"]
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in segm.values())
