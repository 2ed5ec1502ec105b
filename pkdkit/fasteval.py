"""A faster COCOeval with exactly pycocotools' numbers: C++ matching, vectorised accumulation.

pycocotools' ``COCOeval.evaluate`` matches detections to ground truth in Python, image by image, class by
class and area range by area range, and ``accumulate`` builds every precision-recall curve with Python
loops; on a few thousand detections that is nearly all of an evaluation's time. `FastCOCOeval` does the
same two steps faster and gives the same arrays, bit for bit:

- ``evaluate()`` is faster-coco-eval's (https://github.com/MiXaiLL76/faster_coco_eval): the IoUs from the
  same C mask/box code and the greedy matching of pycocotools in C++ (stable sorts, crowd and ignore rules
  and area ranges as pycocotools), one result per (category, area range, image) in pycocotools' order.
- ``accumulate()`` is pycocotools' accumulation written with whole-array numpy operations on those
  results (`accumulate_evaluations`). It reads back only the (image, category) pairs that have ground
  truth or detections and treats every detection of every curve in one sorted array, so its time grows
  with detections and annotations, not with images x categories (COCO's 80 categories make most pairs
  empty). faster-coco-eval's own C++ accumulation computes precision as ``tp / (tp + fp)`` where
  pycocotools divides by ``tp + fp + eps``, so its curves can differ in the last bit (1.0 against
  1 - 2.2e-16); this one repeats pycocotools' arithmetic, so ``eval["precision"]`` ``(T, R, K, A, M)``,
  ``eval["recall"]`` ``(T, K, A, M)`` and ``eval["scores"]`` equal pycocotools' exactly.
- ``summarize()`` is pycocotools' own: the same 12 ``stats`` and the same printed text.

It takes pycocotools' ``COCO`` objects (``coco_gt`` and ``coco_gt.loadRes(...)``) like ``COCOeval``.
Unlike pycocotools it leaves ``evalImgs`` (per-image matches as dicts) empty: use pycocotools' ``COCOeval``
when you need those. tests/test_fasteval.py checks the equality on generated data, bbox and segm, with
crowd regions, categories without ground truth, 40 categories and maxDets caps.

`DEFAULT_COCOEVAL` is `FastCOCOeval` when faster-coco-eval is installed and pycocotools' ``COCOeval``
otherwise; `pkdkit.evaluate` uses it unless told otherwise (``cocoeval_cls=``).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import operator
from typing import Any, Iterator

import numpy as np
from pycocotools.cocoeval import COCOeval

try:
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster
except ImportError:  # optional dependency: evaluation falls back to pycocotools
    COCOeval_faster = None


def accumulate_evaluations(params: Any, indices: np.ndarray, evaluations: list[tuple]) -> dict[str, Any]:
    """pycocotools' ``COCOeval.accumulate`` on per-image results, with the same arithmetic, vectorised.

    params: the evaluation's parameters (``iouThrs`` (T,), ``recThrs`` (R,), ``catIds``, ``useCats``,
        ``areaRng`` (A), ``maxDets`` (M), ``imgIds`` (I)).
    indices: (P,) increasing positions, in pycocotools' ``evalImgs`` order (category, then area range, then
        image: ``(k * A + a) * I + i``), of the results that exist; every other (image, category, area range)
        has neither ground truth nor detections (``None`` in ``evalImgs``) and adds nothing.
    evaluations: the P results at those positions, each ``(detection_matches (T * D,) matched ground-truth
        id or 0, ground_truth_matches, detection_scores (D,) in descending order, ground_truth_ignores (G,),
        detection_ignores (T * D,), ...)`` as faster-coco-eval's ``ImageEvaluation.__getstate__`` returns them
        (t-major per image).
    Returns ``{"params", "counts", "date", "precision" (T, R, K, A, M), "recall" (T, K, A, M),
    "scores" (T, R, K, A, M)}``; -1 where a curve is undefined (no ground truth), as pycocotools.

    The work grows with the number of detections and ground truths, not with images x categories: all
    detections of all (category, area range) curves sit in one flat array, sorted once per ``maxDets`` by
    (curve, score), and the cumulative sums and recall-threshold look-ups run on the whole array at once.
    Every value is pycocotools' to the bit: counts stay integers until they are divided as pycocotools
    divides them, and the search of the recall thresholds compares integer true-positive counts with the
    exact integer equivalent of each threshold.
    """
    rec_thrs = np.asarray(params.recThrs, dtype=np.float64)
    T, R = len(params.iouThrs), len(rec_thrs)
    K = len(params.catIds) if params.useCats else 1
    A, M, I = len(params.areaRng), len(params.maxDets), len(params.imgIds)
    C = K * A  # curves: one per (category, area range)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) != len(evaluations):
        raise ValueError(f"accumulate_evaluations: {len(indices)} positions for {len(evaluations)} results")
    if len(indices) and (indices[0] < 0 or indices[-1] >= C * I or np.any(np.diff(indices) <= 0)):
        raise ValueError(f"accumulate_evaluations: positions must increase within [0, {C * I}) "
                         f"({K} categories x {A} area ranges x {I} images)")
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    scores = -np.ones((T, R, K, A, M))
    out = {"params": params, "counts": [T, R, K, A, M],
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
           "precision": precision, "recall": recall, "scores": scores}

    chain, P = itertools.chain.from_iterable, len(evaluations)
    n_det = np.fromiter(map(len, map(operator.itemgetter(2), evaluations)), dtype=np.int64, count=P)
    n_gt = np.fromiter(map(len, map(operator.itemgetter(3), evaluations)), dtype=np.int64, count=P)
    total = int(n_det.sum())
    matched_flat = np.fromiter(chain(map(operator.itemgetter(0), evaluations)), dtype=np.int64)
    ignored_flat = np.fromiter(chain(map(operator.itemgetter(4), evaluations)), dtype=bool)
    if len(matched_flat) != T * total or len(ignored_flat) != T * total:
        raise ValueError(f"accumulate_evaluations: per-image results must hold T={T} match ids and T ignore flags "
                         "per detection (faster-coco-eval's result layout changed?)")
    det_scores = np.fromiter(chain(map(operator.itemgetter(2), evaluations)), dtype=np.float64, count=total)
    gt_ignored = np.fromiter(chain(map(operator.itemgetter(3), evaluations)), dtype=bool, count=int(n_gt.sum()))
    curve_of_result = indices // I
    npig = np.bincount(np.repeat(curve_of_result, n_gt)[~gt_ignored], minlength=C)  # (C,) valid ground truth
    defined = np.flatnonzero(npig > 0)  # curves with ground truth; the others stay -1
    if not len(defined):
        return out
    det_start = np.concatenate([[0], np.cumsum(n_det)])
    owner = np.repeat(np.arange(len(evaluations)), n_det)  # (N,) result of each detection
    rank = np.arange(total) - det_start[owner]  # (N,) rank of each detection in its result (score order)
    curve = curve_of_result[owner]  # (N,) non-decreasing
    # result e stores its (T, D_e) matrices t-major from T * det_start[e]
    flat = T * det_start[owner][None, :] + np.arange(T)[:, None] * n_det[owner][None, :] + rank[None, :]
    matched, counted = matched_flat[flat] != 0, ~ignored_flat[flat]  # (T, N)
    tps, fps = matched & counted, ~matched & counted
    thresholds = np.zeros((C, R), dtype=np.int64)
    thresholds[defined] = _recall_threshold_counts(npig[defined], rec_thrs)

    precision_c = precision.reshape(T, R, C, M)  # views: curve c = k * A + a
    scores_c = scores.reshape(T, R, C, M)
    recall_c = recall.reshape(T, C, M)
    most = int(n_det.max(initial=0))
    for m, max_det in enumerate(params.maxDets):
        same = [m2 for m2 in range(m) if min(params.maxDets[m2], most) == min(max_det, most)]
        if same:  # keeps the same detections as an earlier maxDets (no image has more): the same curves
            precision_c[..., m], scores_c[..., m], recall_c[..., m] = (precision_c[..., same[0]],
                                                                     scores_c[..., same[0]], recall_c[..., same[0]])
            continue
        # a defined curve without detections: recall 0 and precision 0 at every recall threshold
        precision_c[:, :, defined, m] = 0.0
        scores_c[:, :, defined, m] = 0.0
        recall_c[:, defined, m] = 0.0
        keep = np.flatnonzero((rank < max_det) & (npig[curve] > 0))
        if not len(keep):
            continue
        # pycocotools sorts each curve's detections (concatenated image by image) by score with a stable sort
        order = keep[np.lexsort((-det_scores[keep], curve[keep]))]
        seg_curve, seg_start, seg_len = np.unique(curve[order], return_index=True, return_counts=True)
        seg = np.repeat(np.arange(len(seg_curve)), seg_len)  # (n,) segment of each sorted detection
        tp_sorted = tps[:, order]
        tp_total, tp_before = _cumsum_before(tp_sorted, seg_start)
        tp_sum = (tp_total - tp_before[:, seg]).astype(float)  # (T, n) per-curve cumulative sums
        fp_total, fp_before = _cumsum_before(fps[:, order], seg_start)
        fp_sum = (fp_total - fp_before[:, seg]).astype(float)
        rc = tp_sum / npig[curve[order]]
        pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
        recall_c[:, seg_curve, m] = rc[:, seg_start + seg_len - 1]
        pr = _segment_reverse_cummax(pr, seg_start, seg_len)
        # np.searchsorted(rc, rec_thrs, side="left") in each curve: the first position whose tp count reaches
        # the recall threshold's integer equivalent v. Counts grow by one at each true positive, so that is
        # the position of the curve's v-th true positive (its start when v = 0; past its end when it has fewer).
        need = thresholds[seg_curve][None]  # (1, S, R)
        tp_cols = np.append(np.nonzero(tp_sorted)[1], 0)  # true positives, row by row (+ one so that
        # the unused picks below have somewhere to point when there are none)
        row_offset = np.concatenate([[0], np.cumsum(tp_total[:, -1])])[:-1, None]  # (T, 1)
        first = row_offset + tp_before  # (T, S) index in tp_cols of each segment's first true positive
        in_seg = tp_total[:, seg_start + seg_len - 1] - tp_before  # (T, S) true positives per segment
        reach = need <= in_seg[:, :, None]  # (T, S, R)
        pick = np.where(reach & (need > 0), first[:, :, None] + need - 1, 0)
        inds = np.where(need == 0, 0, np.where(reach, tp_cols[pick] - seg_start[None, :, None],
                                               seg_len[None, :, None]))  # (T, S, R) index in its segment
        found = inds < seg_len[None, :, None]
        at = np.where(found, seg_start[None, :, None] + inds, 0)  # (T, S, R) position in the sorted array
        q = np.where(found, np.take_along_axis(pr, at.reshape(T, -1), axis=1).reshape(at.shape), 0.0)
        ss = np.where(found, det_scores[order][at], 0.0)
        precision_c[:, :, seg_curve, m] = q.transpose(0, 2, 1)
        scores_c[:, :, seg_curve, m] = ss.transpose(0, 2, 1)
    return out


def _cumsum_before(x: np.ndarray, seg_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums of bool `x` (T, n) along n (int64) and their values just before each segment start
    (T, S): ``total - before[:, segment]`` restarts the sums at every segment, exactly."""
    total = np.cumsum(x, axis=1, dtype=np.int64)
    before = np.concatenate([np.zeros((len(x), 1), dtype=np.int64), total], axis=1)[:, seg_start]
    return total, before


def _segment_reverse_cummax(x: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray) -> np.ndarray:
    """``max(x[:, j:end of j's segment])`` for every j of `x` (T, n): pycocotools' precision envelope."""
    out = np.empty_like(x)
    for lo, hi in zip(seg_start.tolist(), (seg_start + seg_len).tolist()):
        out[:, lo:hi] = np.maximum.accumulate(x[:, lo:hi][:, ::-1], axis=1)[:, ::-1]
    return out


def _recall_threshold_counts(npig: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """(len(npig), R) ints: for a curve with `npig` ground truths, ``float(tp) / npig < r`` exactly when
    ``tp < counts[r]`` (the division is monotone in tp). This turns pycocotools' float search of the recall
    thresholds in the recall curve into an integer search in the true-positive counts, with the same result."""
    counts = np.empty((len(npig), len(rec_thrs)), dtype=np.int64)
    for c, n in enumerate(npig.tolist()):
        counts[c] = np.searchsorted(np.arange(n + 1, dtype=np.float64) / n, rec_thrs, side="left")
    return counts


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _print(*args: Any) -> None:
    # Not `print` itself: faster-coco-eval would then also set it on the COCO objects it is given.
    print(*args)


if COCOeval_faster is not None:

    class FastCOCOeval(COCOeval_faster):
        """``FastCOCOeval(coco_gt, coco_dt, iou_type)`` with pycocotools' COCOeval interface (``params``,
        ``evaluate()``, ``accumulate()``, ``summarize()``, ``eval``, ``stats``) and its exact numbers."""

        def __init__(self, cocoGt: Any = None, cocoDt: Any = None, iouType: str = "segm"):
            # separate_eval: keep the per-image results so that `accumulate` below can read them.
            # rle_iou_max_workers=1: the mask IoUs of one (image, category) pair take microseconds, so a thread
            # pool (faster-coco-eval's default: 8 threads) spends more on futures, locks and GIL hand-overs than it
            # saves: ~8% of evaluate()'s CPU time on real-shaped masks (bench/cocodata.py, real_shaped=True).
            super().__init__(cocoGt, cocoDt, iouType, print_function=_print, separate_eval=True,
                             rle_iou_max_workers=1)

        def accumulate(self, p: Any = None) -> None:
            """pycocotools' accumulation (see `accumulate_evaluations`) of the last ``evaluate()``."""
            if not hasattr(self, "_evalImgs_cpp"):
                raise RuntimeError("FastCOCOeval.accumulate: call evaluate() first")
            if p is not None:
                raise ValueError("FastCOCOeval.accumulate accumulates with the parameters evaluate() used; "
                                 "do not pass other ones")
            # Reading a result out of C++ costs microseconds even when it is empty: read only the (image,
            # category) pairs with annotations or detections (the others are None in pycocotools' evalImgs),
            # so this scales with annotations, not with images x categories.
            used = np.flatnonzero(self.used_pairs())
            cpp = self._evalImgs_cpp
            with _no_gc():  # many small lists: collecting them costs more than reading them
                results = [cpp[i].__getstate__() for i in used.tolist()]
                self.eval = accumulate_evaluations(self._paramsEval, used, results)
                del results  # freed while the collector is off: it then has nothing new to walk

        def used_pairs(self) -> np.ndarray:
            """(K * A * I,) bool in result order: does the result's (image, category) have annotations or
            detections? Exactly the entries of pycocotools' ``evalImgs`` that are not None, the only results
            `accumulate` reads."""
            p = self._paramsEval
            images = {img: i for i, img in enumerate(p.imgIds)}
            cats = {cat: k for k, cat in enumerate(p.catIds)} if p.useCats else None
            used = np.zeros((len(cats) if cats else 1, len(images)), dtype=bool)  # (K, I)
            for ann in itertools.chain(self.cocoGt.anns.values(), self.cocoDt.anns.values()):
                i = images.get(ann["image_id"])
                k = 0 if cats is None else cats.get(ann["category_id"])
                if i is not None and k is not None:
                    used[k, i] = True
            return np.repeat(used[:, None, :], len(p.areaRng), axis=1).ravel()

        # pycocotools' own summarize, which reads only `params` and `eval`: the same 12 stats and text.
        summarize = COCOeval.summarize

    DEFAULT_COCOEVAL: type = FastCOCOeval
else:
    FastCOCOeval = None
    DEFAULT_COCOEVAL = COCOeval
