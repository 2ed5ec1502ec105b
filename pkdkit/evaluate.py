"""COCO evaluation of torchvision detectors with pycocotools.

The flow reads like torchvision's ``references/detection/coco_eval.py``, as plain functions:

    results = predict(model, dataset, label_map)          # detector outputs -> COCO result dicts
    metrics = coco_evaluate(dataset.coco, results)        # COCOeval -> 12 named stats + per-class AP
    record  = evaluate_detector(model, dataset, label_map, out_dir=..., config=...)  # both + JSON files

Numbers are pycocotools' own: `run_cocoeval` is ``loadRes -> COCOeval.evaluate -> accumulate`` and the
stats are read from the accumulated ``eval["precision"]`` / ``eval["recall"]`` arrays exactly as
``COCOeval.summarize`` reads them. The matching itself runs in faster-coco-eval's C++ when it is installed
(`pkdkit.fasteval.DEFAULT_COCOEVAL`: the same arrays as pycocotools' to 1e-15, several times faster), else in
pycocotools. Another evaluator can be plugged in through ``cocoeval_cls``: any class with ``COCOeval``'s
interface that fills the same ``eval`` arrays (``precision`` ``(T, R, K, A, M)``, ``recall``
``(T, K, A, M)``) works with every function here.

Conventions: stats are fractions in [0, 1]; ``-1.0`` means "undefined" exactly as in COCOeval (no ground
truth in that area range, or a class with no ground truth at all), never NaN, so every metrics dict is
plain JSON.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from pkdkit.data import CocoDetection, DataError, LabelMap, collate_fn, load_coco
from pkdkit.fasteval import DEFAULT_COCOEVAL
from pkdkit.files import check_name, write_json
from pkdkit.models import eval_mode
from pkdkit.progress import bar as progress_bar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5  # mask probability -> binary mask, as torchvision's reference evaluation does


# ----------------------------------------------------------------------------------------------------
# Predictions -> COCO results
@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, label_map: LabelMap, *,
            device: str | torch.device | None = "cpu", batch_size: int = 4, score_threshold: float = 0.0,
            progress: bool = True) -> list[dict]:
    """Run a torchvision detector over `dataset` and return its detections as COCO result dicts.

    model: torchvision detector; in eval mode it maps a list of images (3, H, W) to dicts with
        ``boxes (K, 4)`` xyxy pixels, ``scores (K,)``, ``labels (K,)`` and optionally ``masks (K, 1, H, W)``
        probabilities. It is moved to `device` (in place, like ``nn.Module.to``; None keeps its device),
        run in eval mode, and its training mode is restored afterwards.
    label_map: the MODEL's label map (model label -> dataset category id). Detections whose label it does
        not know, or whose category id is not in ``dataset.coco``, are dropped with one warning.
    dataset: a ``CocoDetection`` built with ``train=False`` (no random flips); its ``coco`` is the truth.
    Returns ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "segmentation": RLE]}]`` with
    boxes rounded to 0.01 px and scores to 1e-6, so a results JSON reloads to the same numbers.
    """

    if getattr(dataset, "train", False) and getattr(dataset, "hflip_prob", 0.0) > 0:
        raise ValueError(f"predict: dataset {getattr(dataset, 'ann_file', '')} has train=True (random flips would "
                         f"move the boxes away from the ground truth); build it with train=False")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    cat_ids = set(dataset.coco.getCatIds())
    to_cat = {label: label_map.to_cat_id(label) for label in label_map.labels}
    to_cat = {label: cat for label, cat in to_cat.items() if cat in cat_ids}
    if not to_cat:
        raise DataError(f"predict: the model's categories (ids {list(label_map.cat_ids)[:10]}) and those of "
                        f"{getattr(dataset, 'ann_file', 'the dataset')} (ids {sorted(cat_ids)[:10]}) have none in "
                        f"common: every AP would be 0; is this the model's dataset and its own label map?")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)

    model.to(device)
    results: list[dict] = []
    dropped: dict[int, int] = {}
    with eval_mode(model):
        for images, targets in progress_bar(loader, desc="predict", disable=not progress):
            outputs = model([img.to(device, non_blocking=True) for img in images])
            for target, output in zip(targets, outputs):
                image_id = int(target["image_id"])
                results.extend(_to_coco_results(image_id, output, to_cat, score_threshold, dropped))
    if dropped:
        warnings.warn(
            f"predict: dropped {sum(dropped.values())} detections whose model label has no category in "
            f"{getattr(dataset, 'ann_file', 'the dataset')} through the given label map "
            f"(label: count {dict(sorted(dropped.items()))}); is this the model's own label map?",
            stacklevel=2)
    return results


def _to_coco_results(image_id: int, output: dict[str, torch.Tensor], to_cat: dict[int, int],
                     score_threshold: float, dropped: dict[int, int]) -> list[dict]:
    """One image's detector output -> COCO result dicts; counts unmapped labels into `dropped`."""
    labels = output["labels"].tolist()
    keep = [i for i, score in enumerate(output["scores"].tolist()) if score >= score_threshold]
    for i in keep:
        if labels[i] not in to_cat:
            dropped[labels[i]] = dropped.get(labels[i], 0) + 1
    keep = [i for i in keep if labels[i] in to_cat]
    if not keep:
        return []
    idx = torch.as_tensor(keep, device=output["boxes"].device)
    boxes = output["boxes"][idx].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    scores = output["scores"][idx].float().cpu().tolist()
    results = [{"image_id": image_id, "category_id": to_cat[labels[i]],
                "bbox": [round(v, 2) for v in box], "score": round(score, 6)}
               for i, box, score in zip(keep, boxes.tolist(), scores)]
    if "masks" in output:
        binary = (output["masks"][idx, 0] > MASK_THRESHOLD).to(torch.uint8).cpu().numpy()  # (K, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # wants (H, W, K) Fortran
        for result, rle in zip(results, rles):
            rle["counts"] = rle["counts"].decode("ascii")  # bytes -> str so results are JSON
            result["segmentation"] = rle
    return results


def result_box(result: dict) -> list[float]:
    """A COCO result's box ``[x, y, w, h]`` in pixels: its ``bbox``, else (a segmentation result) the bounding box
    of its compressed-RLE mask, as pycocotools' ``loadRes`` derives it."""
    if "bbox" in result:
        return list(result["bbox"])
    return mask_utils.toBbox(result["segmentation"]).tolist()


def results_to_json(results: list[dict], path: str | os.PathLike) -> Path:
    """Write COCO results (or any JSON-able object) to `path` atomically: temp file + ``os.replace``."""
    return write_json(results, path, indent=None)


# ----------------------------------------------------------------------------------------------------
# COCOeval
def run_cocoeval(coco_gt: COCO | str | os.PathLike, results: list[dict] | str | os.PathLike,
                 iou_type: str = "bbox", *, max_dets: int = 100,
                 cocoeval_cls: type[COCOeval] = DEFAULT_COCOEVAL) -> COCOeval:
    """Evaluate `results` against `coco_gt` with pycocotools' COCO and `cocoeval_cls` (default: faster-coco-eval
    when installed, else pycocotools' COCOeval); return the accumulated evaluator.

    This is ``coco_gt.loadRes(results)``, ``COCOeval(...).evaluate()``, ``.accumulate()`` with pycocotools'
    printing silenced, plus what plain pycocotools gets wrong for a pipeline:
    - empty results evaluate to zeros instead of crashing in ``loadRes``;
    - `results` is not modified (``loadRes`` adds ``area``/``id``/``segmentation`` keys to the dicts);
    - for ``segm``, the ground-truth annotation dicts are not modified either (``COCOeval`` replaces their
      polygons by byte RLEs in place, which would break e.g. ``json.dump(dataset.coco.dataset)``);
    - bad input raises ``ValueError`` saying what is wrong instead of an ``AssertionError``/``KeyError``.
    max_dets: detections per image and class for the last ``maxDets`` entry (``[1, 10, max_dets]``);
        the stat names ``AP``/``AR100`` keep COCO's names.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"run_cocoeval: iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if max_dets < 10:
        raise ValueError(f"run_cocoeval: max_dets must be >= 10 (maxDets are [1, 10, max_dets]), got {max_dets}")
    coco_gt = _load_gt(coco_gt)
    results, where = _load_results(results)
    _check_results(coco_gt, results, iou_type, where)
    if iou_type == "segm":
        coco_gt = _shallow_copy(coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        cocoeval = cocoeval_cls(coco_gt, coco_dt, iou_type)
        cocoeval.params.maxDets = [1, 10, max_dets]
        cocoeval.evaluate()
        cocoeval.accumulate()
    return cocoeval


def _load_gt(coco_gt: COCO | str | os.PathLike) -> COCO:
    """A COCO object, or a path read and validated by `pkdkit.data.load_coco` (clear errors for bad files)."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    if not Path(coco_gt).is_file():
        raise FileNotFoundError(f"ground-truth annotation file not found: {coco_gt}")
    return load_coco(coco_gt)


def _load_results(results: list[dict] | str | os.PathLike) -> tuple[list[dict], str]:
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            loaded = json.load(f)
        if not isinstance(loaded, list):
            raise DataError(f"{results}: expected a JSON list of COCO results, found {type(loaded).__name__}; "
                            "write the results as a list of result dicts")
        return loaded, str(results)
    return list(results), "results"


def _check_results(coco_gt: COCO, results: list[dict], iou_type: str, where: str) -> None:
    """Results pycocotools would mis-evaluate or crash on raise a DataError naming the first offending index:
    a missing key, a box or score that is not 4 / 1 finite numbers, a result without its box, an unknown image,
    no category in common with the ground truth, or (segm) a result or annotation without a segmentation.

    A result's box is its ``bbox`` or, for segmentation results, the mask's: as in pycocotools' ``loadRes``,
    result #0 decides. With a ``bbox`` every result needs one; without, every result needs a ``segmentation``
    as a compressed RLE (``{"size": [h, w], "counts": str}``, what `predict` and ``mask.encode`` give), from
    which ``loadRes`` derives the box where none is given (cocoapi's own segm example results carry no box)."""
    required = {"image_id", "category_id", "score"}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not required <= r.keys():
            found = f"keys {sorted(r)}" if isinstance(r, dict) else type(r).__name__
            raise DataError(f"{where}: result #{i} needs {sorted(required)} and a 'bbox' or 'segmentation', "
                            f"found {found}")
    if results and "bbox" in results[0]:
        i = next((i for i, r in enumerate(results) if "bbox" not in r), None)
        if i is not None:
            raise DataError(f"{where}: result #{i} has no 'bbox' but result #0 has one; pycocotools takes every "
                            f"result's box from its 'bbox' then: give each result a 'bbox', or none (segmentation "
                            f"results: the box is derived from the mask)")
    else:
        i = next((i for i, r in enumerate(results) if not _is_compressed_rle(r.get("segmentation"))), None)
        if i is not None:
            raise DataError(f"{where}: result #{i} needs a 'bbox', or a 'segmentation' as a compressed RLE "
                            f"{{'size': [h, w], 'counts': str}} to derive it from (result #0 has no 'bbox'), found "
                            f"{_shorten(results[i].get('segmentation'))}")
    for key, width in (("bbox", 4), ("score", None)):
        rows = [(i, r[key]) for i, r in enumerate(results) if key in r]
        try:
            values = np.array([v for _, v in rows], dtype=np.float64).reshape(len(rows), width or 1)
        except (TypeError, ValueError):
            values = None
        ok = (np.isfinite(values).all(axis=1) if values is not None else
              np.array([_finite_numbers(v, width) for _, v in rows], dtype=bool))
        if not ok.all():
            i, v = rows[int(np.argmin(ok))]
            what = "4 finite numbers [x, y, w, h]" if width else "a finite number"
            raise DataError(f"{where}: result #{i} {key} should be {what}, found {v!r}")
    if results:
        found_cats = {r["category_id"] for r in results}
        if not found_cats & set(coco_gt.getCatIds()):
            raise DataError(f"{where}: no result has a category of the ground truth (results have category ids "
                            f"{sorted(found_cats)[:10]}, the ground truth {sorted(coco_gt.getCatIds())[:10]}); was the "
                            f"model trained on another dataset, or given another label map?")
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise DataError(f"{where}: {len(unknown)} image ids are not in the ground truth, e.g. "
                        f"{sorted(unknown)[:5]}; was the model run on another dataset or split?")
    if iou_type == "segm":
        missing = sum("segmentation" not in r for r in results)
        if missing:
            raise DataError(f"{where}: segm evaluation needs a 'segmentation' (RLE) in every result, "
                            f"{missing} of {len(results)} have none; is this a mask-less detector "
                            f"(evaluate iou_types=('bbox',) instead)?")
        no_gt_seg = [a["id"] for a in coco_gt.dataset["annotations"] if "segmentation" not in a]
        if no_gt_seg:
            raise DataError(f"segm evaluation needs ground-truth 'segmentation' on every annotation; "
                            f"{len(no_gt_seg)} have none, e.g. annotation ids {no_gt_seg[:5]}")


def _is_compressed_rle(segmentation: Any) -> bool:
    """Whether pycocotools' ``mask.area``/``toBbox`` can read `segmentation`: ``{"size": [h, w], "counts": str|bytes}``."""
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes))):
        return False
    size = segmentation.get("size")
    return (isinstance(size, (list, tuple)) and len(size) == 2 and
            all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in size))


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite_numbers(v: Any, width: int | None) -> bool:
    values = v if width else [v]
    return (isinstance(values, (list, tuple)) and len(values) == (width or 1) and
            all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in values))


def _shallow_copy(coco: COCO) -> COCO:
    """A COCO over copies of the annotation dicts (cheap), so in-place edits by COCOeval stay private."""
    copied = COCO()
    copied.dataset = {**coco.dataset, "annotations": [dict(a) for a in coco.dataset["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        copied.createIndex()
    return copied


def _empty_results(coco_gt: COCO) -> COCO:
    """What ``loadRes([])`` would return if it did not fail on an empty list."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]),
                   "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    res.createIndex()
    return res


def cocoeval_metrics(cocoeval: COCOeval) -> dict[str, Any]:
    """The JSON-able metrics of an accumulated COCOeval.

    Returns ``{"stats": {name: float} for STAT_NAMES, "per_class": {category name: AP}, "summary": str}``.
    stats equal ``cocoeval.stats`` after ``summarize()`` (same arrays, same reductions), except that with
    ``max_dets != 100`` AP is read at ``max_dets`` where ``summarize`` reports -1.
    per_class: AP@[.5:.95] per category, area "all", the last maxDets: the mean of
    ``precision[:, :, k, 0, -1]`` over valid (> -1) entries, as detectron2 computes it; -1.0 for a
    category without ground truth (COCOeval's "undefined"), 0.0 for one with ground truth but no hits.
    summary: the text ``COCOeval.summarize()`` prints.
    """
    if not cocoeval.eval:
        raise ValueError("cocoeval_metrics: the COCOeval has not been accumulated; call evaluate() and "
                         "accumulate() first (run_cocoeval does both)")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cocoeval.summarize()
    p = cocoeval.params
    precision, recall = cocoeval.eval["precision"], cocoeval.eval["recall"]  # (T,R,K,A,M), (T,K,A,M)
    m = len(p.maxDets) - 1

    def mean_valid(s: np.ndarray) -> float:
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    def ap(iou: float | None = None, area: str = "all") -> float:
        s = precision if iou is None else precision[np.where(iou == p.iouThrs)[0]]
        return mean_valid(s[:, :, :, p.areaRngLbl.index(area), m])

    def ar(max_det_index: int, area: str = "all") -> float:
        return mean_valid(recall[:, :, p.areaRngLbl.index(area), max_det_index])

    values = [ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
              ar(0), ar(1), ar(m), ar(m, "small"), ar(m, "medium"), ar(m, "large")]

    names = _category_names(cocoeval.cocoGt, p.catIds)
    per_class = {names[k]: mean_valid(precision[:, :, k, p.areaRngLbl.index("all"), m])
                 for k in range(len(p.catIds))}
    return {"stats": dict(zip(STAT_NAMES, values)), "per_class": per_class, "summary": out.getvalue()}


def _category_names(coco: COCO, cat_ids: Sequence[int]) -> list[str]:
    """Category names for the per-class table; a name shared by several ids gets ``name#id``."""
    names = [coco.cats[c].get("name", str(c)) for c in cat_ids]
    return [f"{n}#{c}" if names.count(n) > 1 else n for n, c in zip(names, cat_ids)]


def coco_evaluate(coco_gt: COCO | str | os.PathLike, results: list[dict] | str | os.PathLike,
                  iou_types: Sequence[str] = ("bbox",), *, max_dets: int = 100,
                  cocoeval_cls: type[COCOeval] = DEFAULT_COCOEVAL) -> dict[str, dict[str, Any]]:
    """COCO metrics of `results` (list or JSON path, possibly empty) against `coco_gt` (COCO or path).

    Returns ``{iou_type: {"stats": {name: float}, "per_class": {category name: AP}, "summary": str}}``
    (see `cocoeval_metrics`); plain JSON. For PR curves use `run_cocoeval` + `pr_curve` instead.
    """
    coco_gt = _load_gt(coco_gt)
    results, where = _load_results(results)
    metrics = {}
    for iou_type in iou_types:
        cocoeval = run_cocoeval(coco_gt, results, iou_type, max_dets=max_dets, cocoeval_cls=cocoeval_cls)
        metrics[iou_type] = cocoeval_metrics(cocoeval)
    return metrics


def match_counts(cocoeval: COCOeval, iou: float = 0.5, min_score: float = 0.0) -> dict[str, int]:
    """TP/FP/FN at one IoU threshold from an evaluated COCOeval (area "all", the largest maxDets), counting
    only detections scored at least `min_score`.

    COCO's matching: a detection is TP if matched to a non-crowd ground truth, FP if unmatched and not
    ignored; a non-crowd ground truth without a match is FN. Detections matched to crowd regions count
    as neither (FiftyOne's `evaluate_detections(method="coco")` is reconciled to this in pkdkit.fiftyone_app).
    Matching is greedy from the highest score down, so a lower-scored detection never changes what a
    higher-scored one matched: the counts equal those of evaluating only the detections above `min_score`
    (a ground truth matched only by a detection below it is FN).
    """
    hits = np.flatnonzero(np.isclose(cocoeval.params.iouThrs, iou))
    if not len(hits):
        raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {list(cocoeval.params.iouThrs)}")
    if not cocoeval.evalImgs:
        raise ValueError("match_counts needs the per-image matches (evalImgs) of pycocotools' COCOeval; "
                         "evaluate with run_cocoeval(..., cocoeval_cls=pycocotools.cocoeval.COCOeval)")
    t = int(hits[0])
    all_area = cocoeval.params.areaRng[cocoeval.params.areaRngLbl.index("all")]
    tp = fp = fn = 0
    for e in cocoeval.evalImgs:
        if e is None or e["aRng"] != all_area or e["maxDet"] != cocoeval.params.maxDets[-1]:
            continue
        kept = np.asarray(e["dtScores"], dtype=float) >= min_score
        matched, ignored = e["dtMatches"][t] > 0, e["dtIgnore"][t].astype(bool)
        tp += int(np.sum(matched & ~ignored & kept))
        fp += int(np.sum(~matched & ~ignored & kept))
        kept_ids = {int(i) for i, k in zip(e["dtIds"], kept) if k}
        found = np.array([int(m) in kept_ids for m in e["gtMatches"][t]], dtype=bool)
        fn += int(np.sum(~found & ~np.asarray(e["gtIgnore"], bool)))
    return {"tp": tp, "fp": fp, "fn": fn}


def match_counts_by_run(coco_gt: COCO | str | os.PathLike, results: dict[str, list[dict] | str | os.PathLike],
                        iou: float = 0.5, min_score: float = 0.0) -> dict[str, dict[str, int]]:
    """{run: `match_counts`} of each run's COCO results (list or JSON path), evaluated with pycocotools' own
    COCOeval (the per-image matches `match_counts` reads)."""
    coco_gt = _load_gt(coco_gt)
    return {name: match_counts(run_cocoeval(coco_gt, r, cocoeval_cls=COCOeval), iou=iou, min_score=min_score)
            for name, r in results.items()}


def pr_curve(cocoeval: COCOeval, iou: float = 0.5, area: str = "all",
             cat_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of an accumulated COCOeval at one IoU threshold and the last maxDets.

    Returns ``(recall (R,), precision (R,))`` with R = 101 COCO recall thresholds. Precision is COCOeval's
    interpolated precision for `cat_id`, or, when `cat_id` is None, its mean over the categories that have
    ground truth in `area`. NaN where undefined (no ground truth).
    """
    if not cocoeval.eval:
        raise ValueError("pr_curve: the COCOeval has not been accumulated; use run_cocoeval")
    p = cocoeval.params
    t = np.flatnonzero(np.isclose(p.iouThrs, iou))
    if t.size == 0:
        raise ValueError(f"pr_curve: iou={iou} is not one of the COCOeval IoU thresholds {p.iouThrs.round(2).tolist()}")
    if area not in p.areaRngLbl:
        raise ValueError(f"pr_curve: area={area!r} is not one of {p.areaRngLbl}")
    precision = cocoeval.eval["precision"][t[0], :, :, p.areaRngLbl.index(area), -1]  # (R, K)
    if cat_id is not None:
        if cat_id not in p.catIds:
            raise ValueError(f"pr_curve: cat_id={cat_id} is not one of the evaluated categories {p.catIds}")
        precision = precision[:, [p.catIds.index(cat_id)]]
    precision = np.where(precision > -1, precision, np.nan)
    with warnings.catch_warnings():  # all-NaN rows (no ground truth) stay NaN without a RuntimeWarning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(precision, axis=1)
    return np.asarray(p.recThrs, dtype=float).copy(), mean


# ----------------------------------------------------------------------------------------------------
# The evaluation record
class EvalRecord(dict):
    """What `evaluate_detector` returns and writes (``eval.json``): a plain dict, so it is JSON as it is and
    old code indexing it keeps working, with named accessors so that no caller spells its layout
    (``record["metrics"]["bbox"]["stats"]["AP"]``).

    Keys: ``{"name", "metrics": {iou_type: {"stats": {12 COCO stats}, "per_class_AP": {...}}}, "config",
    "ann_file", "image_dir", "num_images", "num_detections", "iou_types", "seconds", "timestamp"}``; ``"path"``
    when read from a file.
    """

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EvalRecord":
        """The record in `path` (an ``eval.json``), with ``"path"`` set to its absolute path."""
        path = Path(path)
        try:
            record = cls(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read the evaluation record {path}: {e}") from e
        record["path"] = str(path.resolve())
        return record

    @classmethod
    def of(cls, value: Mapping[str, Any]) -> "EvalRecord":
        """`value` as a record: an `evaluate_detector` record (a plain dict read from JSON too), or `coco_evaluate`'s
        output ``{iou_type: {"stats", "per_class_AP"}}`` as the metrics of a record without config."""
        if isinstance(value, cls):
            return value
        return cls(value if "metrics" in value else {"metrics": value})

    @classmethod
    def of_stats(cls, stats: dict[str, float], config: dict[str, Any] | None = None,
                 iou_type: str = "bbox") -> "EvalRecord":
        """A record of `stats` (the 12 COCO stats of `iou_type`, e.g. one seed's from a report) and `config` alone,
        for what reads records (`comparison_table`, `pkdkit.viz.plot_ap_bars`)."""
        return cls({"metrics": {iou_type: {"stats": stats}}, "config": config or {}})

    def stats(self, iou_type: str = "bbox") -> dict[str, float]:
        """The 12 COCO stats (`STAT_NAMES`, fractions; -1 where undefined) for `iou_type`."""
        return dict(self["metrics"][iou_type]["stats"])

    def has(self, iou_type: str) -> bool:
        """Whether the record holds `iou_type`'s metrics (a box-only model has no "segm")."""
        return iou_type in self.get("metrics", {})

    def stat(self, name: str, iou_type: str = "bbox") -> float:
        return float(self["metrics"][iou_type]["stats"][name])

    @property
    def ap(self) -> float:
        """COCO box AP (IoU 0.50:0.95), a fraction."""
        return self.stat("AP")

    @property
    def config(self) -> dict[str, Any]:
        return self.get("config") or {}

    @property
    def budget(self) -> dict[str, Any]:
        """``{"init", "epochs"}``: the initialisation and the student's total epochs; see `budget_of`."""
        return budget_of(self.config)


def budget_of(config: dict[str, Any] | None) -> dict[str, Any]:
    """The one budget reader: ``{"init", "epochs"}`` of a record's or checkpoint's config, the initialisation
    and the student's total epochs. Configs written before budgets existed count their own training epochs
    from an unnamed start ({} when they have no training settings either, e.g. a torchvision reference)."""
    config = config if isinstance(config, dict) else {}
    if config.get("budget"):
        return dict(config["budget"])
    if "train" in config:
        return {"init": "unknown", "epochs": int(config["train"].get("epochs", 0))}
    return {}


# ----------------------------------------------------------------------------------------------------
# Model -> metrics files
def evaluation_files(folder: str | os.PathLike, name: str = "eval") -> tuple[Path, Path]:
    """(record, COCO results): the files `evaluate_detector(..., out_dir=folder, name=name)` writes,
    ``<folder>/<name>.json`` and ``<folder>/<name>_results.json`` (`name`: one path component)."""
    check_name(name, "evaluation name")
    return Path(folder) / f"{name}.json", Path(folder) / f"{name}_results.json"


def evaluate_detector(model: nn.Module, dataset: CocoDetection, label_map: LabelMap, *,
                      out_dir: str | os.PathLike | None = None, name: str = "model",
                      device: str | torch.device | None = "cpu", batch_size: int = 4,
                      iou_types: Sequence[str] | None = None, config: Any = None,
                      progress: bool = True) -> EvalRecord:
    """Predict over `dataset`, evaluate against its COCO ground truth, and optionally write JSON files.

    iou_types: default ``("bbox", "segm")`` for a detector with masks (a Mask R-CNN, i.e. it has
        ``roi_heads.mask_predictor``, or its results carry masks), else ``("bbox",)``.
    config: the (JSON-able dict or dataclass) configuration that produced the model; stored with the metrics.
    Returns the record ``{"name", "metrics": {iou_type: {...}}, "config", "ann_file", "image_dir",
    "num_images", "num_detections", "iou_types", "seconds": {"predict", "evaluate"}, "timestamp"}``;
    with `out_dir`, it is written to ``<out_dir>/<name>.json`` and the COCO results (dataset category ids)
    to ``<out_dir>/<name>_results.json``, both atomically (`evaluation_files`), and the record returned has
    ``"path"``, as one read back with `EvalRecord.read` has.
    """
    tic = time.perf_counter()
    results = predict(model, dataset, label_map, device=device, batch_size=batch_size, progress=progress)
    predict_s = time.perf_counter() - tic
    if iou_types is None:
        has_masks = getattr(getattr(model, "roi_heads", None), "mask_predictor", None) is not None
        has_masks = has_masks or any("segmentation" in r for r in results)
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    tic = time.perf_counter()
    metrics = coco_evaluate(dataset.coco, results, iou_types)
    evaluate_s = time.perf_counter() - tic

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    record = EvalRecord({
        "name": name,
        "metrics": metrics,
        "config": config,
        "ann_file": str(dataset.ann_file),
        "image_dir": str(dataset.image_dir),
        "num_images": len(dataset),
        "num_detections": len(results),
        "iou_types": list(iou_types),
        "seconds": {"predict": round(predict_s, 3), "evaluate": round(evaluate_s, 3)},
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    if out_dir is not None:
        record_file, results_file = evaluation_files(out_dir, name)
        results_to_json(results, results_file)
        write_json(record, record_file)
        record["path"] = str(record_file.resolve())
    return record


# ----------------------------------------------------------------------------------------------------
# Reporting
CONTROLS = ("baseline", "baseline_long")  # the runs without a teacher, at E and S x E epochs


def equal_budget_controls(runs: Sequence[str], epochs: Sequence[Any], controls: Sequence[str] = CONTROLS
                          ) -> list[int | None]:
    """For each run, the index of the control it is compared with: the first of `controls` (names, in that
    order of preference) among `runs` with the same student epochs, itself for a control, None when no control
    has its epochs. Without any of `controls` in `runs`, the first run is the control. `epochs[i]`: run i's
    total epochs, None for unknown (records from before budgets, torchvision's reference models): such a
    run is compared with the first control, as every run was before budgets were recorded."""
    control_rows = [runs.index(c) for c in controls if c in runs] or [0]
    control_of: dict[Any, int] = {}
    for k in control_rows:
        control_of.setdefault(epochs[k], k)
    return [i if i in control_rows else control_of.get(e, control_rows[0] if e is None else None)
            for i, e in enumerate(epochs)]


def comparison_table(metrics_by_run: Mapping[str, Mapping[str, Any]], iou_type: str = "bbox",
                     stats: Sequence[str] = ("AP", "AP50", "AP75", "APs", "APm", "APl")) -> str:
    """A markdown table of COCO stats (in %, one decimal), one row per run, plus ΔAP: AP minus that of the
    control with the same student epochs (`equal_budget_controls`: ``baseline`` or ``baseline_long``, else
    the first row; n/a when no control has the run's epochs).

    metrics_by_run: run name -> `coco_evaluate` output or `evaluate_detector` record (`EvalRecord.of`).
    Undefined stats (-1) and runs without `iou_type` show ``n/a``. When records carry a budget
    (`EvalRecord.budget`: the initialisation and the student's total epochs), the table shows both, so that
    extra epochs are never read as a gain.
    """
    if not metrics_by_run:
        raise ValueError("comparison_table: no runs given")
    unknown = [s for s in stats if s not in STAT_NAMES]
    if unknown:
        raise ValueError(f"comparison_table: unknown stats {unknown}; known: {STAT_NAMES}")

    def fmt(v: float | None, sign: str = "") -> str:
        return "n/a" if v is None or v < 0 else f"{100 * v:{sign}.1f}"

    records = {run: EvalRecord.of(m) for run, m in metrics_by_run.items()}
    budgets = {run: record.budget for run, record in records.items()}
    with_budget = any(budgets.values())
    rows = []
    values_of = {run: record.stats(iou_type) if record.has(iou_type) else None for run, record in records.items()}
    aps = [v.get("AP") if v else None for v in values_of.values()]
    control = equal_budget_controls(list(records), [b.get("epochs") for b in budgets.values()])
    for i, (run, record) in enumerate(records.items()):
        values, ap = values_of[run], aps[i]
        ref_ap = aps[control[i]] if control[i] is not None else None
        delta = "n/a" if ap is None or ap < 0 or ref_ap is None or ref_ap < 0 else format_delta(100 * (ap - ref_ap))
        cells = [fmt(values.get(s) if values else None) for s in stats]
        budget = [str(budgets[run].get("epochs", "?")), budgets[run].get("init", "?")] if budgets[run] else ["?", "?"]
        rows.append([run, *(budget if with_budget else []), *cells, delta])
    header = ["run", *(["epochs", "init"] if with_budget else []), *stats, "ΔAP"]
    align = ["---", *(["---:", "---"] if with_budget else []), *["---:"] * (len(stats) + 1)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_delta(points: float) -> str:
    """A difference to one decimal with its sign, and "0.0" (not "-0.0" or "+0.0") where it rounds to zero."""
    rounded = round(points, 1)
    return "0.0" if rounded == 0 else f"{rounded:+.1f}"


def distinct_results(results: dict[str, str | os.PathLike]) -> dict[str, Path]:
    """{run name: COCO results file} with runs that share one file (a run reused by another, e.g. `one_shot` when
    it is the `progressive` run) merged under one label, "one_shot = progressive", in first-seen order: each
    file is then evaluated and drawn once, and no curve hides exactly under another."""
    names: dict[Path, list[str]] = {}
    for name, path in results.items():
        names.setdefault(Path(path).resolve(), []).append(name)
    return {" = ".join(runs): path for path, runs in names.items()}


def cocoevals_by_run(coco_gt: COCO | str | os.PathLike, results: dict[str, str | os.PathLike]) -> dict[str, COCOeval]:
    """{run label: accumulated COCOeval (`run_cocoeval`, bbox)} for each distinct results file (`distinct_results`:
    runs that share one file are evaluated once, under a joint label): what `plot_pr_curves` draws."""
    return {name: run_cocoeval(coco_gt, str(path)) for name, path in distinct_results(results).items()}


def plot_pr_curves(cocoevals: dict[str, COCOeval], iou: float = 0.5, ax: Any = None) -> "Figure":
    """Mean precision-recall curves (all areas, all classes with ground truth) of several runs at one IoU.

    Draws on `ax` if given, else on a new Figure (made without pyplot, so it works under Agg and shows
    once in a notebook). The legend, beside the axes so that it covers no curve, shows each run's AP at that IoU.
    """
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(7.5, 4), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.get_figure()
    for run, cocoeval in cocoevals.items():
        recall, precision = pr_curve(cocoeval, iou=iou)
        ap = float(np.nanmean(precision)) if not np.all(np.isnan(precision)) else float("nan")
        ax.plot(recall, precision, label=f"{run} (AP{100 * iou:.0f} = {100 * ap:.1f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall at IoU {iou:.2f}")
    ax.grid(alpha=0.3)
    if cocoevals:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=9, frameon=False)
    return fig
