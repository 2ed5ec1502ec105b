"""A faster COCOeval with exactly pycocotools' numbers: C++ matching, vectorised accumulation.

pycocotools' ``COCOeval.evaluate`` matches detections to ground truth in Python, image by image, class by
class and area range by area range, and ``accumulate`` builds every precision-recall curve with Python
loops; on a few thousand detections that is nearly all of an evaluation's time. `FastCOCOeval` does the
same two steps faster and gives the same arrays, bit for bit:

- ``evaluate()`` is faster-coco-eval's (https://github.com/MiXaiLL76/faster_coco_eval): the IoUs from the
  same C mask/box code and the greedy matching of pycocotools in C++ (stable sorts, crowd and ignore rules
  and area ranges as pycocotools), one result per (category, area range, image) in pycocotools' order.
- ``accumulate()`` is pycocotools' accumulation written with whole-array numpy operations on those
  results. faster-coco-eval's own C++ accumulation computes precision as ``tp / (tp + fp)`` where
  pycocotools divides by ``tp + fp + eps``, so its curves can differ in the last bit (1.0 against
  1 - 2.2e-16); this one repeats pycocotools' arithmetic, so ``eval["precision"]`` ``(T, R, K, A, M)``,
  ``eval["recall"]`` ``(T, K, A, M)`` and ``eval["scores"]`` equal pycocotools' exactly.
- ``summarize()`` is pycocotools' own: the same 12 ``stats`` and the same printed text.

It takes pycocotools' ``COCO`` objects (``coco_gt`` and ``coco_gt.loadRes(...)``) like ``COCOeval``.
Unlike pycocotools it leaves ``evalImgs`` (per-image matches as dicts) empty: use pycocotools' ``COCOeval``
when you need those. tests/test_fasteval.py checks the equality on generated data, bbox and segm.

`DEFAULT_COCOEVAL` is `FastCOCOeval` when faster-coco-eval is installed and pycocotools' ``COCOeval``
otherwise; `pkdkit.evaluate` uses it unless told otherwise (``cocoeval_cls=``).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
from typing import Any, Iterator

import numpy as np
from pycocotools.cocoeval import COCOeval

try:
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster
except ImportError:  # optional dependency: evaluation falls back to pycocotools
    COCOeval_faster = None


def accumulate_evaluations(params: Any, evaluations: list[tuple]) -> dict[str, Any]:
    """pycocotools' ``COCOeval.accumulate`` on per-image results, with the same arithmetic, vectorised.

    params: the evaluation's parameters (``iouThrs`` (T,), ``recThrs`` (R,), ``catIds``, ``useCats``,
        ``areaRng`` (A), ``maxDets`` (M), ``imgIds`` (I)).
    evaluations: K * A * I results in pycocotools' ``evalImgs`` order (category, then area range, then
        image), each ``(detection_matches (T * D,) matched ground-truth id or 0, ground_truth_matches,
        detection_scores (D,) in descending order, ground_truth_ignores (G,), detection_ignores (T * D,),
        ...)`` as faster-coco-eval's ``ImageEvaluation.__getstate__`` returns them (t-major per image), or
        None for an image without ground truth and detections of that category (as in ``evalImgs``).
    Returns ``{"params", "counts", "date", "precision" (T, R, K, A, M), "recall" (T, K, A, M),
    "scores" (T, R, K, A, M)}``; -1 where a curve is undefined (no ground truth), as pycocotools.
    """
    rec_thrs = np.asarray(params.recThrs)
    T, R = len(params.iouThrs), len(rec_thrs)
    K = len(params.catIds) if params.useCats else 1
    A, M, I = len(params.areaRng), len(params.maxDets), len(params.imgIds)
    if len(evaluations) != K * A * I:
        raise ValueError(f"accumulate_evaluations: expected {K} categories x {A} area ranges x {I} images = "
                         f"{K * A * I} per-image results, got {len(evaluations)}")
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    scores = -np.ones((T, R, K, A, M))

    # Every detection of every (non-empty) result in one flat array: its result and its rank in that result.
    present = np.array([i for i, e in enumerate(evaluations) if e is not None], dtype=np.int64)  # sorted
    states = [evaluations[i] for i in present]
    sizes = np.array([(len(e[2]), len(e[3]), len(e[0]) + len(e[4])) for e in states], dtype=np.int64)
    n_det, n_gt, n_flags = sizes.reshape(-1, 3).T
    if np.any(n_flags != 2 * T * n_det):
        raise ValueError(f"accumulate_evaluations: per-image results must hold T={T} match ids and T ignore flags "
                         "per detection (faster-coco-eval's result layout changed?)")
    total = int(n_det.sum())
    det_scores = np.fromiter(itertools.chain.from_iterable(e[2] for e in states), dtype=np.float64, count=total)
    matched_flat = np.fromiter(itertools.chain.from_iterable(e[0] for e in states), dtype=np.int64,
                               count=T * total)
    ignored_flat = np.fromiter(itertools.chain.from_iterable(e[4] for e in states), dtype=bool, count=T * total)
    gt_valid = ~np.fromiter(itertools.chain.from_iterable(e[3] for e in states), dtype=bool,
                            count=int(n_gt.sum()))
    det_start = np.concatenate([[0], np.cumsum(n_det)])
    owner = np.repeat(np.arange(len(states)), n_det)  # (N,) result of each detection
    rank = np.arange(total) - det_start[owner]  # (N,) rank of each detection in its image
    # result e stores its (T, D_e) matrices t-major from T * det_start[e]
    flat = T * det_start[owner][None, :] + np.arange(T)[:, None] * n_det[owner][None, :] + rank[None, :]
    matched, counted = matched_flat[flat] != 0, ~ignored_flat[flat]  # (T, N)
    tps, fps = matched & counted, ~matched & counted
    gt_group = np.repeat(present // I, n_gt)  # (k, a) group of each ground truth
    npig_per_group = np.bincount(gt_group[gt_valid], minlength=K * A)  # valid ground truth per (k, a)
    # results are ordered by group, so each group's detections are one slice
    group_start = det_start[np.searchsorted(present, np.arange(K * A + 1) * I)]

    for k, a in itertools.product(range(K), range(A)):
        group = k * A + a
        npig = int(npig_per_group[group])
        if npig == 0:
            continue
        lo, hi = group_start[group], group_start[group + 1]
        for m, max_det in enumerate(params.maxDets):
            keep = np.flatnonzero(rank[lo:hi] < max_det) + lo
            order = keep[np.argsort(-det_scores[keep], kind="mergesort")]
            nd = len(order)
            tp_sum = np.cumsum(tps[:, order], axis=1).astype(dtype=float)  # (T, nd)
            fp_sum = np.cumsum(fps[:, order], axis=1).astype(dtype=float)
            rc = tp_sum / npig
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            recall[:, k, a, m] = rc[:, -1] if nd else 0
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
            sorted_scores = det_scores[order]
            for t in range(T):
                inds = np.searchsorted(rc[t], rec_thrs, side="left")
                found = inds < nd
                q, ss = np.zeros(R), np.zeros(R)
                q[found], ss[found] = pr[t, inds[found]], sorted_scores[inds[found]]
                precision[t, :, k, a, m], scores[t, :, k, a, m] = q, ss
    return {"params": params, "counts": [T, R, K, A, M],
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "precision": precision, "recall": recall, "scores": scores}


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
            super().__init__(cocoGt, cocoDt, iouType, print_function=_print, separate_eval=True)

        def accumulate(self, p: Any = None) -> None:
            """pycocotools' accumulation (see `accumulate_evaluations`) of the last ``evaluate()``."""
            if not hasattr(self, "_evalImgs_cpp"):
                raise RuntimeError("FastCOCOeval.accumulate: call evaluate() first")
            if p is not None:
                raise ValueError("FastCOCOeval.accumulate accumulates with the parameters evaluate() used; "
                                 "do not pass other ones")
            # Reading a result out of C++ costs microseconds even when it is empty: skip the (image, category)
            # pairs without annotations or detections, which pycocotools' evalImgs holds as None.
            used = self._used_pairs()
            with _no_gc():  # hundreds of thousands of small lists: collecting them costs more than reading
                results = [e.__getstate__() if u else None for e, u in zip(self._evalImgs_cpp, used)]
                self.eval = accumulate_evaluations(self._paramsEval, results)

        def _used_pairs(self) -> np.ndarray:
            """(K * A * I,) bool in result order: does the result's (image, category) have annotations?"""
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
