"""A faster COCOeval with pycocotools' numbers: faster-coco-eval's C++ evaluate/accumulate.

pycocotools' ``COCOeval.evaluate`` matches detections to ground truth in Python, image by image and class by
class; on a few thousand detections that is most of an evaluation's time. faster-coco-eval
(https://github.com/MiXaiLL76/faster_coco_eval) runs the same matching and accumulation in C++ and fills the
same ``eval["precision"]`` ``(T, R, K, A, M)``, ``eval["recall"]`` ``(T, K, A, M)`` and ``eval["scores"]``
arrays. On pkdkit's data they agree with pycocotools' to the last bit or one unit in the last place (a
precision of 0.5 may read 0.5 - 1.1e-16), so every stat agrees to 1e-15; tests/test_fasteval.py checks the
12 stats and the per-class AP, bbox and segm, against pycocotools.

`FastCOCOeval` takes pycocotools' ``COCO`` objects (``coco_gt`` and ``coco_gt.loadRes(...)``) and keeps
pycocotools' ``summarize()``: the same ``stats`` (12 values) and the same printed text. Unlike pycocotools'
it does not fill ``evalImgs`` (per-image matches); use pycocotools' ``COCOeval`` for those.

`DEFAULT_COCOEVAL` is `FastCOCOeval` when faster-coco-eval is installed and pycocotools' ``COCOeval``
otherwise; `pkdkit.evaluate` uses it unless told otherwise (``cocoeval_cls=``).
"""
from __future__ import annotations

from typing import Any

from pycocotools.cocoeval import COCOeval

try:
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster
except ImportError:  # optional: evaluation falls back to pycocotools
    COCOeval_faster = None


def _print(*args: Any) -> None:
    # A function other than `print` itself: faster-coco-eval would otherwise set it on the COCO objects.
    print(*args)


if COCOeval_faster is not None:

    class FastCOCOeval(COCOeval_faster):
        """``FastCOCOeval(coco_gt, coco_dt, iou_type)``: pycocotools' COCOeval interface (``params``,
        ``evaluate()``, ``accumulate()``, ``summarize()``, ``eval``, ``stats``) on faster-coco-eval's C++."""

        def __init__(self, cocoGt: Any = None, cocoDt: Any = None, iouType: str = "segm"):
            super().__init__(cocoGt, cocoDt, iouType, print_function=_print)

        # pycocotools' own summarize, which reads only `params` and `eval`: the same 12 stats and text.
        summarize = COCOeval.summarize

    DEFAULT_COCOEVAL: type = FastCOCOeval
else:
    FastCOCOeval = None
    DEFAULT_COCOEVAL = COCOeval
