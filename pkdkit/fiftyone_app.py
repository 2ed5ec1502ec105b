"""Look at what distillation changed, image by image, in FiftyOne.

`build_dataset` puts a COCO ground-truth file and several models' COCO results (the JSON that pkdkit's
evaluation writes) into one FiftyOne dataset; `evaluate_models` runs FiftyOne's COCO-style evaluation on each
model; `fixed_by` is the view of images where the distilled student makes fewer mistakes than its baseline.
`open_dataset` does all three for a run directory's dataset (persistent, named by `dataset_name`, rebuilt only
when its inputs change) and saves the view to start from (`save_review_view`); `launch_app` opens the App on it
in a notebook or a browser tab, and `pkdkit inspect RUN_DIR` from a shell (`inspect_run`). `notebook_settings`
sets (and restores) FiftyOne's settings for a notebook.

Counts follow pycocotools. Over the detections in the dataset (`open_dataset` loads those with a score of at
least its `confidence`, 0.3 by default), at one IoU threshold, over all areas, with at most 100 detections per image and
class, TP/FP/FN here equal what pycocotools' `COCOeval.evalImgs` gives (tests/test_fiftyone.py checks it):
crowd ground truth (`iscrowd=1`) is never a false negative, and a detection matched to a crowd region counts
neither as TP nor FP. FiftyOne matches crowds the same way but tallies them as TP/FN, so `evaluate_models`
re-tallies and marks those objects "ignore" (see there).

FiftyOne needs a MongoDB server; offline installs get one from `scripts/ensure_fiftyone_db.py`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fiftyone as fo
    from fiftyone import ViewField as F
except ImportError as e:  # optional dependency
    raise ImportError(f"pkdkit.fiftyone_app needs FiftyOne (pip install 'pkdkit[fiftyone]', then "
                      f"scripts/ensure_fiftyone_db.py for an offline MongoDB); importing it failed: {e}") from e

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from pkdkit.data import DataError  # noqa: E402  (after the FiftyOne check above)

GT_FIELD = "ground_truth"
# Sample fields of a built dataset that a model name must not map onto.
_RESERVED = {"id", "filepath", "tags", "metadata", "media_type", "created_at", "last_modified_at", "coco_id",
             GT_FIELD}


def model_field(name: str) -> str:
    """FiftyOne field name for a model name: lower case, `[a-z0-9_]`, starts with a letter.

    "ResNet-18 student (KD)" -> "resnet_18_student_kd"; "2stage" -> "m_2stage".
    """
    field = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    if not field or not field[0].isalpha():
        field = "m_" + field
    return field


def _load_json(path: str | Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"could not read {what} {path}: {e}") from e


def build_dataset(
    name: str,
    gt_json: str | Path,
    image_dir: str | Path,
    predictions: dict[str, list[dict] | str | Path],
    *,
    overwrite: bool = True,
    persistent: bool = False,
    min_confidence: float = 0.0,
) -> fo.Dataset:
    """One FiftyOne sample per image of a COCO ground-truth file, with every model's detections.

    Args:
        name: dataset name in the FiftyOne database.
        gt_json: COCO instances file; `images[].width/height` give the relative box coordinates.
        image_dir: folder holding `images[].file_name` (stored as absolute paths; the files must exist).
        predictions: model name -> COCO results (list of `{"image_id", "category_id", "bbox": [x, y, w, h],
            "score"}`, or segmentation results whose box is their mask's, or the path of such a JSON file). Each
            model becomes the field `model_field(name)`.
        overwrite: replace an existing dataset of that name.
        persistent: keep the dataset after the Python process exits.
        min_confidence: model detections with a lower score are left out. FiftyOne's evaluation saves a
            label on every detection and slows down faster than linearly with detections per image (16 s per
            model for ~75 boxes per image on 64 images, a CPU demo's untrained students): loading only the
            boxes worth looking at keeps it to seconds.

    Fields: `coco_id` (image id), `ground_truth` (fo.Detections, `iscrowd` 0/1 and the annotation's
    `coco_id` as attributes; FiftyOne's COCO evaluation reads `iscrowd`), one fo.Detections field per
    model (`confidence` = score). Boxes are relative `[x, y, w, h]`, not clipped, so IoUs equal pixel IoUs.
    Labels are category names. `dataset.info["models"]` maps model names to fields.
    """
    from pkdkit.evaluate import result_box

    gt_json, image_dir = Path(gt_json), Path(image_dir).resolve()
    gt = _load_json(gt_json, "ground-truth file")
    names = {c["id"]: c["name"] for c in gt.get("categories", [])}
    if len(set(names.values())) != len(names):
        raise DataError(f"{gt_json}: category names must be unique (they are FiftyOne labels), found "
                        f"{sorted(names.values())}")
    images = {img["id"]: img for img in gt.get("images", [])}

    fields = {}
    for model in predictions:
        field = model_field(model)
        if field in _RESERVED or field in fields.values():
            raise DataError(f"model name {model!r} maps to field {field!r}, which is reserved or taken by "
                             f"another model ({fields}); rename the model")
        fields[model] = field

    def detections(entries: list[dict], source: str, *, is_gt: bool) -> dict[int, list]:
        per_image: dict[int, list] = {i: [] for i in images}
        for k, e in enumerate(entries):
            img = images.get(e.get("image_id"))
            if img is None:
                raise DataError(f"{source}: entry {k} has image_id {e.get('image_id')!r}, which is not an "
                                f"image of {gt_json}")
            if e.get("category_id") not in names:
                raise DataError(f"{source}: entry {k} (image {img['id']}) has category_id "
                                f"{e.get('category_id')!r}, not one of {sorted(names)} in {gt_json}")
            x, y, w, h = e["bbox"] if is_gt else result_box(e)
            W, H = img["width"], img["height"]
            box = [x / W, y / H, w / W, h / H]
            label = names[e["category_id"]]
            if is_gt:
                det = fo.Detection(label=label, bounding_box=box, iscrowd=int(e.get("iscrowd", 0)),
                                   coco_id=e.get("id"))
            elif e["score"] >= min_confidence:
                det = fo.Detection(label=label, bounding_box=box, confidence=float(e["score"]))
            else:
                continue
            per_image[img["id"]].append(det)
        return per_image

    gt_dets = detections(gt.get("annotations", []), str(gt_json), is_gt=True)
    model_dets = {}
    for model, results in predictions.items():
        source = f"predictions of {model!r}"
        if isinstance(results, (str, Path)):
            source = f"{results} ({model!r})"
            results = _load_json(results, "COCO results file")
        model_dets[model] = detections(results, source, is_gt=False)

    samples = []
    for image_id, img in sorted(images.items()):
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise DataError(f"image {image_id} of {gt_json}: file {path} does not exist")
        sample = fo.Sample(filepath=str(path), coco_id=image_id,
                           metadata=fo.ImageMetadata(width=img["width"], height=img["height"]))
        sample[GT_FIELD] = fo.Detections(detections=gt_dets[image_id])
        for model, field in fields.items():
            sample[field] = fo.Detections(detections=model_dets[model][image_id])
        samples.append(sample)

    dataset = fo.Dataset(name, overwrite=overwrite)
    dataset.persistent = persistent
    dataset.add_samples(samples, progress=False)
    dataset.info["models"] = fields
    dataset.save()
    return dataset


def evaluate_models(
    dataset: fo.Dataset, model_fields: list[str], *, gt_field: str = GT_FIELD, iou: float = 0.5,
    compute_map: bool = False,
) -> dict[str, dict]:
    """FiftyOne COCO evaluation of each model field; returns `{field: {"tp", "fp", "fn"}}`, plus `"mAP"`
    with `compute_map`.

    Runs `dataset.evaluate_detections(field, eval_key=f"eval_{field}", method="coco", iou=iou,
    compute_mAP=compute_map)` (classwise matching, highest score first). `mAP` is FiftyOne's COCO
    mAP@[.5:.95]; it equals pycocotools' AP except where detections of one class tie in score across images
    (FiftyOne ranks the TPs of a tie first, pycocotools by image id), which float scores of real models rarely
    do. Off by default: pkdkit's own evaluation already gives the AP, and FiftyOne's IoU sweep for it costs
    about a third of this function's time.

    FiftyOne matches crowds like pycocotools but counts a detection matched to a crowd as TP and an
    unmatched crowd as FN; pycocotools ignores both. So afterwards the per-object `eval_<field>` label of
    crowd ground truth and of detections matched to a crowd becomes "ignore", and the per-sample fields
    `eval_<field>_tp/_fp/_fn` are re-tallied from the labels: "tp"/"fp" detections, "fn" ground truth.
    The totals are their sums and equal pycocotools' counts at this IoU (for <= 100 detections per image
    and class: FiftyOne does not cap them at this step, pycocotools keeps the top 100).
    """
    out = {}
    for field in model_fields:
        key = f"eval_{field}"
        with _quiet_fiftyone():  # its "Evaluating detections..." lines, a few per model, would fill a notebook
            results = dataset.evaluate_detections(field, gt_field=gt_field, eval_key=key, method="coco", iou=iou,
                                                  compute_mAP=compute_map)
        gt_ids, gt_crowd, gt_eval, pred_eval, pred_match = dataset.values([
            f"{gt_field}.detections.id", f"{gt_field}.detections.iscrowd", f"{gt_field}.detections.{key}",
            f"{field}.detections.{key}", f"{field}.detections.{key}_id",
        ])
        tps, fps, fns, new_gt_eval, new_pred_eval = [], [], [], [], []
        for ids, crowd, g_eval, p_eval, match in zip(gt_ids, gt_crowd, gt_eval, pred_eval, pred_match):
            crowd_ids = {i for i, c in zip(ids or [], crowd or []) if c}
            g_eval = ["ignore" if c else e for c, e in zip(crowd or [], g_eval or [])]
            p_eval = ["ignore" if m in crowd_ids else e for e, m in zip(p_eval or [], match or [])]
            tps.append(p_eval.count("tp"))
            fps.append(p_eval.count("fp"))
            fns.append(g_eval.count("fn"))
            new_gt_eval.append(g_eval)
            new_pred_eval.append(p_eval)
        dataset.set_values(f"{gt_field}.detections.{key}", new_gt_eval)
        dataset.set_values(f"{field}.detections.{key}", new_pred_eval)
        for name, counts in (("tp", tps), ("fp", fps), ("fn", fns)):
            dataset.set_values(f"{key}_{name}", counts)
        out[field] = {"tp": sum(tps), "fp": sum(fps), "fn": sum(fns)}
        if compute_map:
            out[field]["mAP"] = float(results.mAP())
    return out


@contextlib.contextmanager
def _quiet_fiftyone():
    """FiftyOne's info messages off for a while (its warnings and errors still show)."""
    logger = logging.getLogger("fiftyone")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def notebook_settings():
    """FiftyOne's settings for a notebook, for the block, restored after: no progress bars (each update would
    print a line into the saved notebook) and no check of the MongoDB version (pkdkit's offline setup ships
    MongoDB 6.0, which FiftyOne warns about; the check runs when the block first connects to the database)."""
    saved = {key: getattr(fo.config, key) for key in ("show_progress_bars", "database_validation")}
    fo.config.show_progress_bars = False
    fo.config.database_validation = False
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(fo.config, key, value)


def fixed_by(dataset: fo.Dataset, baseline_field: str, improved_field: str) -> fo.DatasetView:
    """Images where `improved_field` makes fewer errors (FP + FN) than `baseline_field`, most improved first.

    Both fields must have been evaluated by `evaluate_models`. Ties are ordered by `coco_id`.
    Sample ids: `fixed_by(...).values("id")`.
    """
    for field in (baseline_field, improved_field):
        if f"eval_{field}_fp" not in dataset.get_field_schema():
            raise ValueError(f"field {field!r} of dataset {dataset.name!r} has no evaluation "
                             f"(eval_{field}_fp missing): run evaluate_models(dataset, [{field!r}]) first")
    errors = lambda f: F(f"eval_{f}_fp") + F(f"eval_{f}_fn")  # noqa: E731
    gain = errors(baseline_field) - errors(improved_field)
    return dataset.match(gain > 0).sort_by([(gain, -1), ("coco_id", 1)])


def plot_fixed(dataset: fo.Dataset, val: Any, results: dict[str, str | os.PathLike], baseline: str, improved: str,
               *, n: int = 4) -> tuple[int, "Figure | None"]:
    """(how many images `improved` makes fewer errors on than `baseline` (`fixed_by`), the first `n` of them drawn
    with the ground truth and both runs' detections (`pkdkit.viz.plot_detections`; None when there are none)).

    dataset: built by `open_dataset` (its ``info["models"]`` maps run names to fields); val: the `CocoDetection`
    of the validation set; results: {run name: COCO results file}."""
    from pkdkit.viz import plot_detections

    fields = dataset.info["models"]
    fixed = fixed_by(dataset, fields[baseline], fields[improved])
    if not len(fixed):
        return 0, None
    predictions = {name: json.loads(Path(results[name]).read_text()) for name in (baseline, improved)}
    return len(fixed), plot_detections(val, predictions, fixed.values("coco_id")[:n])


def summary_table(counts: dict[str, dict]) -> str:
    """Plain-text table of `evaluate_models` output: TP, FP, FN, precision, recall (and mAP when computed)
    per model."""
    with_map = all("mAP" in c for c in counts.values())
    rows = [("model", "TP", "FP", "FN", "precision", "recall", *(("mAP",) if with_map else ()))]
    for field, c in counts.items():
        prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
        rec = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
        rows.append((field, str(c["tp"]), str(c["fp"]), str(c["fn"]), f"{prec:.3f}", f"{rec:.3f}",
                     *((f"{c['mAP']:.3f}",) if with_map else ())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def dataset_name(run_dir: str | os.PathLike) -> str:
    """`pkdkit-<folder>-<8 hex digits of the absolute path's SHA-1>`: one dataset per run directory, so two runs
    in folders of the same name (runs/tiny here and there) never replace each other's dataset."""
    path = Path(run_dir).resolve()
    return f"pkdkit-{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def inputs_fingerprint(gt_json: str | Path, image_dir: str | Path, predictions: dict[str, str | Path],
                       **settings: Any) -> str:
    """SHA-256 of what a dataset is built from: the ground-truth file's bytes, the image folder, each model's
    name and results file's bytes, and `settings` (the evaluation's IoU, ...)."""
    h = hashlib.sha256()
    h.update(Path(gt_json).read_bytes())
    h.update(str(Path(image_dir).resolve()).encode())
    for model in sorted(predictions):
        h.update(model.encode())
        h.update(Path(predictions[model]).read_bytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


REVIEW_VIEW = "fixed-by-distillation"


def save_review_view(dataset: fo.Dataset, baseline_field: str, improved_field: str, *,
                     confidence: float = 0.3, name: str = REVIEW_VIEW) -> fo.DatasetView:
    """Save (as `name`) and return the view to open the App on: the images where `improved_field` has fewer
    errors than `baseline_field` (`fixed_by`, most improved first), showing only the ground truth and those two
    models' detections with `confidence >= confidence` (the evaluation counts every detection in the dataset), and their
    per-image TP/FP/FN counts; the other models' fields are hidden."""
    counts = [f"eval_{f}_{c}" for f in (baseline_field, improved_field) for c in ("tp", "fp", "fn")]
    view = fixed_by(dataset, baseline_field, improved_field).select_fields(
        ["coco_id", GT_FIELD, baseline_field, improved_field, *counts])
    for field in (baseline_field, improved_field):
        view = view.filter_labels(field, F("confidence") >= confidence, only_matches=False)
    dataset.save_view(name, view, description=f"images where {improved_field} makes fewer errors (FP + FN at the "
                      f"dataset's IoU) than {baseline_field}; ground truth and both models' detections with "
                      f"confidence >= {confidence:g}", overwrite=True)
    return dataset.load_saved_view(name)


def open_dataset(name: str, gt_json: str | Path, image_dir: str | Path, predictions: dict[str, str | Path], *,
                 iou: float = 0.5, baseline: str | None = None, improved: str | None = None,
                 confidence: float = 0.3) -> tuple[fo.Dataset, dict[str, dict], bool]:
    """The persistent dataset `name` built from these inputs (model detections with a score >= `confidence`,
    `build_dataset`'s `min_confidence`) and evaluated at `iou`; returns (dataset, `evaluate_models` counts,
    whether it was (re)built).

    An existing dataset of that name is reloaded as it is when the fingerprint of its inputs
    (`inputs_fingerprint`, stored in `dataset.info["fingerprint"]`) is unchanged; otherwise it is rebuilt.
    With `baseline` and `improved` (model names) the review view is saved (`save_review_view`) and named in
    `dataset.info["review_view"]`.
    """
    fingerprint = inputs_fingerprint(gt_json, image_dir, predictions, iou=iou, baseline=baseline,
                                     improved=improved, confidence=confidence)
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        if dataset.info.get("fingerprint") == fingerprint and "counts" in dataset.info:
            return dataset, dataset.info["counts"], False
    dataset = build_dataset(name, gt_json, image_dir, {k: str(v) for k, v in predictions.items()}, overwrite=True,
                            persistent=True, min_confidence=confidence)
    counts = evaluate_models(dataset, list(dataset.info["models"].values()), iou=iou)
    if baseline and improved:
        fields = dataset.info["models"]
        save_review_view(dataset, fields[baseline], fields[improved], confidence=confidence)
        dataset.info["review_view"] = REVIEW_VIEW
    dataset.info.update(fingerprint=fingerprint, counts=counts, iou=iou)
    dataset.save()
    return dataset, counts, True


def _app_config(port: int) -> Any:
    """The App's config with its URL on localhost. In a container FiftyOne serves on 0.0.0.0 and builds the
    App's URL (the notebook frame's `src`, `session.url`) on that address, which browsers refuse to load in a
    frame; `proxy_url` only changes the URL, the server still listens where FiftyOne chose."""
    config = fo.app_config.copy()
    if not config.proxy_url:
        config.proxy_url = f"http://localhost:{port}/"
    return config


def launch_app(dataset: fo.Dataset | fo.DatasetView, *, enabled: bool, view_name: str | None = None,
               port: int | None = None, embed: bool = False, **kwargs: Any) -> fo.Session | None:
    """Open the FiftyOne App on `dataset` (on its saved view `view_name`, if given and not empty) when `enabled`;
    returns the session, or None when not enabled.

    The App's URL is on localhost (see `_app_config`) and is printed, in a notebook as a link that opens the
    App in a browser tab. `embed=True` also shows the App inside the notebook's output (`session.show()`):
    in JupyterLab in Chromium that frame stays blank (seen with FiftyOne 1.22; its page is served with
    cross-origin isolation headers, COOP/COEP, which a frame inside JupyterLab's page may not satisfy), so
    the link is the default.
    The App starts a web server and waits for a browser, so headless runs (papermill, CI, `make demo`)
    must pass `enabled=False`. Nothing here can tell them apart reliably (papermill sets no environment
    variable), so the notebooks expose it as a parameter that defaults to False.
    """
    if not enabled:
        print("FiftyOne App not launched (launch_app=False); from a shell: pkdkit inspect RUN_DIR")
        return None
    from fiftyone.core.context import is_notebook_context

    port = port or fo.config.default_app_port
    if view_name:
        view = dataset.load_saved_view(view_name)
        if len(view):
            dataset = view
        else:
            print(f"the saved view {view_name!r} has no images: opening the whole dataset")
    kwargs.setdefault("config", _app_config(port))
    if isinstance(dataset, fo.DatasetView):
        session = fo.launch_app(view=dataset, port=port, auto=False, **kwargs)
    else:
        session = fo.launch_app(dataset, port=port, auto=False, **kwargs)
    if embed and is_notebook_context():
        _show_when_connected(session)
    _show_link(session.url)
    return session


def _show_when_connected(session: fo.Session, timeout: float = 180.0) -> None:
    """`session.show()` (the App in the notebook's output) once the session has reached the App's server.

    `fo.launch_app` in a notebook shows the App at once, and fails with "Client is not connected" when the
    server it just started does not answer yet (its client retries every 10 s): seen on a busy machine."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            session.show()
            return
        except RuntimeError as e:
            if "not connected" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _show_link(url: str) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(HTML(f'FiftyOne App: <a href="{url}" target="_blank">{url}</a> (opens in a new tab)'))
    else:
        print(f"FiftyOne App: {url}", flush=True)


def run_inputs(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run directory's dataset is built from: {"gt_json", "image_dir", "predictions": {run: results
    file}} of the validation set (from the run's settings, `workflow.load_settings`) and the runs of notebook 3
    (`distill/comparison.json`)."""
    from pkdkit import workflow

    data = workflow.open_run(run_dir).data
    results = workflow.load_comparison(run_dir)["results"]
    return {"gt_json": data.val_json, "image_dir": data.val_images, "predictions": results}


def inspect_run(run_dir: str | os.PathLike, *, port: int = 5151, iou: float = 0.5, confidence: float = 0.3,
                wait: bool = True) -> fo.Session:
    """`pkdkit inspect RUN_DIR`: open (or build) the run directory's dataset, open the App on the review view
    and, with `wait`, keep it open until KeyboardInterrupt (Ctrl-C; SIGTERM too under `pkdkit`, see
    `pkdkit.cli.stop_signals`), which stops the App's server (`close_app`) and returns."""
    inputs = run_inputs(run_dir)
    name = dataset_name(run_dir)
    improved = "progressive" if "progressive" in inputs["predictions"] else None
    dataset, _, built = open_dataset(name, inputs["gt_json"], inputs["image_dir"], inputs["predictions"], iou=iou,
                                     baseline="baseline" if improved else None, improved=improved,
                                     confidence=confidence)
    print(f"{'built' if built else 'reloaded'} FiftyOne dataset {name} ({len(dataset)} images, models: "
          f"{', '.join(dataset.info['models'])})", flush=True)
    session = launch_app(dataset, enabled=True, view_name=dataset.info.get("review_view"), port=port)
    if wait:
        print("Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:  # the way to end serving: stop the App, return normally
            close_app(session)
            print("FiftyOne App stopped", flush=True)
    return session


def close_app(session: fo.Session, timeout: float = 5.0) -> None:
    """Close `session` and stop the App server this process started for it, at once.

    `session.close()` alone ends FiftyOne's service process, which sends the server SIGTERM and waits, and the
    server (hypercorn) then takes from 9 s to over a minute to shut down (seen with FiftyOne 1.22); when this
    process exits first, both are left serving on the port. So the server and its service process (this
    process's descendants listening on `session.server_port`, and their parent) are killed first; the server
    holds no state of its own (the datasets are in the database). The database FiftyOne started is left to
    FiftyOne: its service stops it once no process uses it."""
    import psutil

    me = psutil.Process()
    app = []
    for proc in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(c.laddr and c.laddr.port == session.server_port and c.status == psutil.CONN_LISTEN
                   for c in proc.net_connections(kind="tcp")):
                parent = proc.parent()
                app += ([parent] if parent is not None and parent.pid != me.pid else []) + [proc]
    for proc in app:  # the service process first, so that it does not report its server's end as a failure
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(app, timeout=timeout)
    session.close()
