"""pkdkit.fiftyone_app on a real FiftyOne database: a tiny COCO set, two models, counts checked against pycocotools.

FiftyOne is a hard test dependency (no importorskip): a missing package or MongoDB must fail, not skip.
FiftyOne reads FIFTYONE_DATABASE_DIR when it is imported, so it is set here, before the import, to a
fresh folder: tests never touch the user's database and runs do not share one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def _remove_stale_databases(prefix: str) -> None:
    """Delete database folders of earlier runs (~300 MB of preallocated MongoDB journal each).

    FiftyOne's mongod stops only when the Python process that started it exits, so a run cannot delete its
    own folder. A folder whose `mongod.lock` is empty was shut down cleanly; one without a lock after an hour
    never started. Folders of runs still going (non-empty lock, or young) are left alone.
    """
    for d in Path(tempfile.gettempdir()).glob(prefix + "*"):
        lock = d / "mongod.lock"
        stopped = lock.is_file() and lock.stat().st_size == 0
        if stopped or (not lock.exists() and time.time() - d.stat().st_mtime > 3600):
            shutil.rmtree(d, ignore_errors=True)


_remove_stale_databases("pkdkit_fiftyone_db_")
_DB_DIR = tempfile.mkdtemp(prefix="pkdkit_fiftyone_db_")
os.environ["FIFTYONE_DATABASE_DIR"] = _DB_DIR
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"  # else the App's analytics consent banner covers part of the page

import fiftyone as fo  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pycocotools.cocoeval import COCOeval  # noqa: E402

from pkdkit.data import DataError  # noqa: E402
from pkdkit.evaluate import cocoeval_metrics, match_counts, match_counts_by_run, run_cocoeval  # noqa: E402
from pkdkit.fiftyone_app import (  # noqa: E402
    build_dataset, evaluate_models, fixed_by, launch_app, model_field, notebook_settings, summary_table)

fo.config.database_validation = False
fo.config.show_progress_bars = False

W, H = 100, 80  # not square, so x and y are scaled differently
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
IMAGES = {11: "a.png", 22: "b.png", 33: "c.png", 44: "d.png"}


def _ann(ann_id, image_id, cat, box, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box, "area": box[2] * box[3],
            "iscrowd": crowd, "segmentation": []}


# Image 11: two cats, a dog, and a crowd of cats along the bottom that contains cat 4.
# Image 22: a dog and an unmatched dog crowd. Image 33: nothing. Image 44: one cat.
GT_ANNOTATIONS = [
    _ann(1, 11, 3, [10, 10, 30, 30]),
    _ann(2, 11, 7, [50, 10, 30, 30]),
    _ann(3, 11, 3, [0, 50, 100, 30], crowd=1),
    _ann(4, 11, 3, [60, 52, 20, 20]),
    _ann(5, 22, 7, [5, 5, 20, 20]),
    _ann(6, 22, 7, [40, 40, 40, 30], crowd=1),
    _ann(7, 44, 3, [20, 20, 40, 40]),
]


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


BASELINE = [
    _det(11, 3, [11, 11, 30, 30], 0.9),   # TP on cat 1 (IoU 0.88)
    _det(11, 3, [10, 12, 30, 30], 0.8),   # duplicate of cat 1 -> FP
    _det(11, 3, [50, 10, 30, 30], 0.7),   # wrong class on dog 2 -> FP, dog 2 FN
    _det(11, 3, [5, 55, 20, 20], 0.6),    # inside the crowd -> ignored
    _det(11, 3, [30, 60, 10, 10], 0.55),  # inside the same crowd again -> ignored
    _det(11, 3, [61, 53, 20, 20], 0.5),   # cat 4 (inside the crowd): non-crowd match wins -> TP
    _det(11, 3, [25, 25, 30, 30], 0.4),   # low IoU (0.14) with cat 1 -> FP
    _det(33, 3, [1, 1, 10, 10], 0.3),     # no ground truth -> FP
    _det(33, 7, [50, 50, 10, 10], 0.2),   # FP
    _det(44, 3, [20, 20, 40, 40], 0.85),  # TP
]  # image 22: nothing -> dog 5 FN (the crowd is not a miss)
STUDENT = [
    _det(11, 3, [10, 10, 30, 30], 0.95),
    _det(11, 7, [50, 10, 30, 30], 0.9),
    _det(11, 3, [60, 52, 20, 20], 0.8),
    _det(11, 3, [5, 55, 20, 20], 0.6),    # crowd -> ignored
    _det(22, 7, [5, 5, 20, 20], 0.85),
    _det(44, 3, [40, 40, 40, 40], 0.7),   # IoU 0.14 -> FP and cat 7 FN: worse than the baseline here
]
# Scores differ across images: on equal scores FiftyOne's mAP ranks TPs before FPs, pycocotools by image id.
# Errors (FP + FN) per image, baseline -> student: 11: 4 -> 0, 22: 1 -> 0, 33: 2 -> 0, 44: 0 -> 2.
EXPECTED = {"baseline": {"tp": 3, "fp": 5, "fn": 2}, "student_kd": {"tp": 4, "fp": 1, "fn": 1}}


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fo_coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in IMAGES.values():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / name)
    gt = {"images": [{"id": i, "file_name": f, "width": W, "height": H} for i, f in IMAGES.items()],
          "annotations": GT_ANNOTATIONS, "categories": CATEGORIES}
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "student.json").write_text(json.dumps(STUDENT))
    return root


@pytest.fixture(scope="module")
def dataset(coco_files):
    assert fo.config.database_dir == _DB_DIR, (
        f"fiftyone was imported before this test module set FIFTYONE_DATABASE_DIR ({fo.config.database_dir})")
    ds = build_dataset("pkdkit_test_fiftyone", coco_files / "gt.json", coco_files / "images",
                       {"baseline": BASELINE, "Student (KD)": coco_files / "student.json"})
    yield ds
    ds.delete()


def pycocotools_counts(gt_json, results, iou):
    """TP/FP/FN of pkdkit's pycocotools evaluation at one IoU: area "all", 100 detections per image and class.

    From `evalImgs`: a detection is TP if matched and not ignored (ignored = matched to a crowd), FP if
    unmatched and not ignored; a ground truth is FN if unmatched and not ignored (ignored = crowd).
    """
    ev = run_cocoeval(gt_json, results, cocoeval_cls=COCOeval)
    return match_counts(ev, iou), cocoeval_metrics(ev)["stats"]["AP"]


def test_model_names_become_field_names():
    assert model_field("Student (KD)") == "student_kd"
    assert model_field("ResNet-18 teacher") == "resnet_18_teacher"
    assert model_field("2stage") == "m_2stage"


def test_samples_hold_images_ground_truth_and_each_model(dataset, coco_files):
    assert len(dataset) == 4
    assert dataset.info["models"] == {"baseline": "baseline", "Student (KD)": "student_kd"}
    assert sorted(dataset.values("coco_id")) == [11, 22, 33, 44]
    sample = dataset.match(fo.ViewField("coco_id") == 11).first()
    assert sample.filepath == str((coco_files / "images" / "a.png").resolve())
    gt = sample.ground_truth.detections
    assert [d.label for d in gt] == ["cat", "dog", "cat", "cat"]
    assert gt[0].bounding_box == pytest.approx([0.1, 0.125, 0.3, 0.375])  # [10, 10, 30, 30] in 100 x 80
    assert [d.iscrowd for d in gt] == [0, 0, 1, 0]
    preds = sample.student_kd.detections
    assert [(d.label, d.confidence) for d in preds[:2]] == [("cat", 0.95), ("dog", 0.9)]
    assert len(sample.baseline.detections) == 7
    empty = dataset.match(fo.ViewField("coco_id") == 33).first()
    assert empty.ground_truth.detections == [] and empty.student_kd.detections == []


def test_counts_equal_pycocotools_including_crowds_duplicates_and_wrong_classes(dataset, coco_files):
    counts = evaluate_models(dataset, ["baseline", "student_kd"], compute_map=True)
    for field, results in (("baseline", BASELINE), ("student_kd", STUDENT)):
        expected, coco_ap = pycocotools_counts(coco_files / "gt.json", results, iou=0.5)
        assert expected == EXPECTED[field]  # the hand-worked numbers, so this test checks the oracle too
        got = counts[field]
        assert {k: got[k] for k in ("tp", "fp", "fn")} == expected, field
        assert sum(dataset.values(f"eval_{field}_fp")) == expected["fp"]
        assert got["mAP"] == pytest.approx(coco_ap, abs=1e-6), field
    # FiftyOne alone would count the two crowd detections of image 11 as TP and the unmatched crowd of
    # image 22 as FN; evaluate_models marks them "ignore" like pycocotools.
    sample = dataset.match(fo.ViewField("coco_id") == 11).first()
    assert [d.eval_baseline for d in sample.baseline.detections] == ["tp", "fp", "fp", "ignore", "ignore",
                                                                      "tp", "fp"]
    crowd_b = dataset.match(fo.ViewField("coco_id") == 22).first().ground_truth.detections[1]
    assert crowd_b.iscrowd == 1 and crowd_b.eval_baseline == "ignore"
    table = summary_table(counts)
    assert table.splitlines()[0].split() == ["model", "TP", "FP", "FN", "precision", "recall", "mAP"]
    assert table.splitlines()[2].split()[:4] == ["baseline", "3", "5", "2"]
    without_map = summary_table({k: {n: c[n] for n in ("tp", "fp", "fn")} for k, c in counts.items()})
    assert without_map.splitlines()[0].split() == ["model", "TP", "FP", "FN", "precision", "recall"]


def test_match_counts_by_run_are_pycocotools_counts_of_each_run(coco_files):
    counts = match_counts_by_run(coco_files / "gt.json", {"baseline": BASELINE, "student_kd": coco_files / "student.json"})
    assert counts == EXPECTED
    above = match_counts_by_run(coco_files / "gt.json", {"baseline": BASELINE}, iou=0.75, min_score=0.5)["baseline"]
    assert above == match_counts(run_cocoeval(coco_files / "gt.json", BASELINE, cocoeval_cls=COCOeval), 0.75, 0.5)


def test_notebook_settings_are_set_for_the_block_and_restored(monkeypatch):
    monkeypatch.setattr(fo.config, "show_progress_bars", True)
    monkeypatch.setattr(fo.config, "database_validation", True)
    with pytest.raises(RuntimeError):
        with notebook_settings():
            assert fo.config.show_progress_bars is False and fo.config.database_validation is False
            raise RuntimeError("stop")
    assert fo.config.show_progress_bars is True and fo.config.database_validation is True


def test_fixed_by_lists_images_the_student_improved_most_first(dataset):
    if "eval_student_kd_fp" not in dataset.get_field_schema():
        evaluate_models(dataset, ["baseline", "student_kd"])
    view = fixed_by(dataset, "baseline", "student_kd")
    assert view.values("coco_id") == [11, 33, 22]  # errors fixed: 4, 2, 1; image 44 got worse
    assert fixed_by(dataset, "student_kd", "baseline").values("coco_id") == [44]


def test_fixed_by_without_evaluation_says_what_to_run(dataset):
    with pytest.raises(ValueError, match=r"run evaluate_models\(dataset, \['nope'\]\)"):
        fixed_by(dataset, "nope", "baseline")


def test_counts_equal_pycocotools_at_another_iou(coco_files, capfd):
    # At IoU 0.85 the baseline's detection on cat 4 (IoU 0.82) no longer matches it but still matches the
    # crowd around it (crowd IoU = intersection / detection area = 1): ignored, and cat 4 becomes a miss.
    ds = build_dataset("pkdkit_test_fiftyone_085", coco_files / "gt.json", coco_files / "images",
                       {"baseline": BASELINE, "student": STUDENT})
    try:
        counts = evaluate_models(ds, ["baseline", "student"], iou=0.85)
        for field, results in (("baseline", BASELINE), ("student", STUDENT)):
            expected, _ = pycocotools_counts(coco_files / "gt.json", results, iou=0.85)
            assert {k: counts[field][k] for k in ("tp", "fp", "fn")} == expected, field
        assert {k: counts["baseline"][k] for k in ("tp", "fp", "fn")} == {"tp": 2, "fp": 5, "fn": 3}
        assert "Evaluating detections" not in "".join(capfd.readouterr())  # no info lines in a notebook
    finally:
        ds.delete()


def test_min_confidence_leaves_low_scores_out_and_counts_still_equal_pycocotools(coco_files):
    # Detections scored below 0.75 are left out of FiftyOne; pkdkit's counts with the same
    # min_score equal pycocotools on only those detections (greedy matching by score: dropping lower scores
    # changes no higher-scored match).
    ds = build_dataset("pkdkit_test_fiftyone_conf", coco_files / "gt.json", coco_files / "images",
                       {"baseline": BASELINE, "student": STUDENT}, min_confidence=0.75)
    try:
        assert len(ds.values("baseline.detections", unwind=True)) == sum(d["score"] >= 0.75 for d in BASELINE)
        counts = evaluate_models(ds, ["baseline", "student"])
        for field, results in (("baseline", BASELINE), ("student", STUDENT)):
            above, _ = pycocotools_counts(coco_files / "gt.json", [d for d in results if d["score"] >= 0.75], iou=0.5)
            every = run_cocoeval(coco_files / "gt.json", results, cocoeval_cls=COCOeval)
            assert match_counts(every, 0.5, min_score=0.75) == above
            assert {k: counts[field][k] for k in ("tp", "fp", "fn")} == above, field
        assert above != EXPECTED["student_kd"]  # the threshold did leave detections out (the same model)
    finally:
        ds.delete()


def test_unknown_image_id_names_file_entry_and_id(coco_files):
    bad = [_det(99, 3, [0, 0, 5, 5], 0.5)]
    with pytest.raises(ValueError, match=r"predictions of 'bad': entry 0 has image_id 99.*gt\.json"):
        build_dataset("pkdkit_test_bad", coco_files / "gt.json", coco_files / "images", {"bad": bad})
    assert "pkdkit_test_bad" not in fo.list_datasets()


def test_missing_image_file_names_path_and_id(coco_files, tmp_path):
    with pytest.raises(DataError, match=r"image 11 of .*gt\.json: file .*a\.png does not exist"):
        build_dataset("pkdkit_test_missing", coco_files / "gt.json", tmp_path, {})


def test_app_is_not_launched_when_disabled(dataset, capsys):
    assert launch_app(dataset, enabled=False) is None
    assert "not launched" in capsys.readouterr().out


def test_dataset_names_are_unique_per_run_directory(tmp_path):
    from pkdkit.fiftyone_app import dataset_name

    a, b = tmp_path / "x" / "tiny", tmp_path / "y" / "tiny"
    assert dataset_name(a).startswith("pkdkit-tiny-") and dataset_name(a) != dataset_name(b)
    assert dataset_name(a) == dataset_name(str(a) + "/")


def _predictions(coco_files, baseline=BASELINE):
    (coco_files / "baseline.json").write_text(json.dumps(baseline))
    return {"baseline": coco_files / "baseline.json", "progressive": coco_files / "student.json"}


def test_open_dataset_is_persistent_reloaded_and_rebuilt_when_predictions_change(coco_files):
    from pkdkit.fiftyone_app import open_dataset

    name = "pkdkit_test_open"
    try:
        ds, counts, built = open_dataset(name, coco_files / "gt.json", coco_files / "images", _predictions(coco_files),
                                         baseline="baseline", improved="progressive",
                                         confidence=0.0)
        assert built and ds.persistent and counts["baseline"]["fp"] == EXPECTED["baseline"]["fp"]
        ds.info["marker"] = "kept"
        ds.save()
        again, counts2, built2 = open_dataset(name, coco_files / "gt.json", coco_files / "images",
                                              _predictions(coco_files), baseline="baseline", improved="progressive",
                                              confidence=0.0)
        assert not built2 and again.info["marker"] == "kept" and counts2 == counts  # reloaded, not rebuilt
        fewer = BASELINE[:-1]  # drop the TP on image 44: one FN more
        rebuilt, counts3, built3 = open_dataset(name, coco_files / "gt.json", coco_files / "images",
                                                _predictions(coco_files, fewer), baseline="baseline",
                                                improved="progressive", confidence=0.0)
        assert built3 and "marker" not in rebuilt.info and counts3["baseline"]["fn"] == EXPECTED["baseline"]["fn"] + 1
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def test_review_view_shows_fixed_images_ground_truth_and_confident_detections(coco_files):
    from pkdkit.fiftyone_app import REVIEW_VIEW, open_dataset

    name = "pkdkit_test_review"
    try:
        ds, _, _ = open_dataset(name, coco_files / "gt.json", coco_files / "images", _predictions(coco_files),
                                baseline="baseline", improved="progressive", confidence=0.5)
        assert ds.info["review_view"] == REVIEW_VIEW and ds.list_saved_views() == [REVIEW_VIEW]
        view = ds.load_saved_view(REVIEW_VIEW)
        # what progressive fixed, most first; image 33's baseline errors, two FPs scored 0.3 and 0.2, are below
        # the confidence and so neither loaded nor counted
        assert view.values("coco_id") == [11, 22]
        assert {"ground_truth", "baseline", "progressive"} <= set(view.get_field_schema())
        assert "student_kd" not in view.get_field_schema() and "eval_progressive_fp" in view.get_field_schema()
        scores = [c for cs in view.values("baseline.detections.confidence") for c in cs]
        assert scores and min(scores) >= 0.5 and len(view.values("ground_truth.detections")[0]) == 4
    finally:
        fo.delete_dataset(name)


def test_app_page_loads_and_shows_the_samples_in_a_browser(coco_files, browser_page):
    """The App served by `launch_app` (its URL on localhost) opens in headless chromium on the review view."""
    from conftest import free_port, screenshot_dir

    from pkdkit.fiftyone_app import open_dataset

    name = "pkdkit_test_app"
    ds, _, _ = open_dataset(name, coco_files / "gt.json", coco_files / "images", _predictions(coco_files),
                            baseline="baseline", improved="progressive")
    session = launch_app(ds, enabled=True, view_name=ds.info["review_view"], port=free_port())
    try:
        assert session.url.startswith("http://localhost:")
        page = browser_page
        page.goto(session.url, wait_until="domcontentloaded", timeout=120_000)
        page.get_by_text(ds.info["review_view"]).first.wait_for(timeout=120_000)  # opened on the saved view
        page.get_by_text("3 samples").first.wait_for(timeout=120_000)  # what progressive fixed: images 11, 33, 22
        for field in ("ground_truth", "baseline", "progressive"):
            assert page.get_by_text(field, exact=True).count() >= 1, field
        page.wait_for_timeout(3000)  # let the grid draw its images
        shots = screenshot_dir()
        if shots:
            page.screenshot(path=str(shots / "fiftyone_app.png"))
        assert "Error" not in page.title()
    finally:
        session.close()
        fo.delete_dataset(name)
