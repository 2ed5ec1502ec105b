"""Run a detector on your own images: COCO results JSON and each image with its boxes drawn.

`predict(model, images, out=...)` (`pkdkit predict MODEL IMAGES... --out DIR`) takes

- model: a pkdkit checkpoint (``model.pt``, ``student.pt``), a `pkdkit export --format torchvision` state dict
  (its ``.json`` beside it gives the spec and the label map), a torchvision COCO weight name
  (``FCOS_ResNet50_FPN_Weights.COCO_V1``: from the torch hub cache; a missing file is downloaded, and offline
  that is a `CheckpointError` saying where to put it), or a model already loaded (with its `LabelMap`);
- images: image files or folders (searched recursively for `pkdkit.convert.IMAGE_EXTS`).

and writes into `out`: ``results.json``, COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels,
``score``, plus ``file_name`` and ``category_name``; image ids 1..N in the order of the images, the files of a
folder sorted), which pycocotools' ``loadRes`` reads; and ``drawn/``, each image with its boxes of score >=
`score_threshold` (``torchvision.utils.draw_bounding_boxes``, labelled "name score"). Every detection the model
returns is in results.json (the threshold is for the pictures), so AP can be computed from it. In a notebook
the first drawn images are shown as a grid (`pkdkit.viz.plot_predictions`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn
from torchvision.utils import draw_bounding_boxes
from tqdm.std import tqdm

from pkdkit.convert import IMAGE_EXTS, list_images
from pkdkit.data import DataError, LabelMap, to_tensor_image
from pkdkit.errors import ConfigError, reason
from pkdkit.evaluate import results_to_json
from pkdkit.models import CheckpointError, DetectorSpec, build_detector, eval_mode, is_torchvision_weight, load_model
from pkdkit.progress import bar as progress_bar
from pkdkit.viz import plot_predictions
from pkdkit.viz import show as show_figure

RESULTS_FILE = "results.json"
DRAWN_DIR = "drawn"


@dataclass
class Predictions:
    """What `predict` found: `images` (image id -> path, ids 1..N), `results` (COCO result dicts with
    ``file_name`` and ``category_name``), `skipped` (one line per image that could not be read), and where the
    files are (None when nothing was written)."""

    images: dict[int, Path]
    results: list[dict]
    skipped: list[str]
    results_file: Path | None
    drawn_dir: Path | None

    def __repr__(self) -> str:  # a notebook cell ending in predict(...) shows this, not every detection
        where = f", written to {self.results_file.parent}" if self.results_file is not None else ""
        return (f"Predictions({len(self.results)} detections on {len(self.images)} images"
                f"{f', {len(self.skipped)} skipped' if self.skipped else ''}{where})")


def _export_meta(path: Path) -> dict:
    meta_path = Path(str(path) + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object was expected, found {type(meta).__name__}")
        return meta
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the export description {meta_path}: {reason(e)}") from e


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, DetectorSpec, LabelMap]:
    """A `pkdkit export --format torchvision` state dict as a pkdkit model: the spec and label map of its ``.json``,
    the weights renamed back (torchvision's ``backbone.body.X`` is pkdkit's ``backbone.body.features.X``)."""
    path = Path(path)
    meta = _export_meta(path)
    try:
        spec, label_map = DetectorSpec.from_dict(meta["spec"]), LabelMap.from_dict(meta["label_map"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}.json does not describe a pkdkit export (spec, label_map): {reason(e)}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the exported state dict {path}: {reason(e).splitlines()[0]}") from e
    model = build_detector(replace(spec, weights=None, backbone_weights=None))
    own = set(model.state_dict())
    renamed = {k if k in own else k.replace("backbone.body.", "backbone.body.features.", 1): v
               for k, v in state.items()}
    try:
        model.load_state_dict(renamed)
    except RuntimeError as e:
        raise CheckpointError(f"the weights of {path} do not fit the {spec.name} its {path.name}.json describes: "
                              f"{reason(e).splitlines()[0]}") from e
    return model, spec, label_map


def load_predictor(ref: str | os.PathLike) -> tuple[nn.Module, LabelMap]:
    """(model, its label map) for a model reference: an export (a file with its ``.json`` of format
    "torchvision" beside it), a pkdkit checkpoint or a torchvision weight name (`pkdkit.models.load_model`)."""
    if not is_torchvision_weight(ref) and Path(str(ref) + ".json").is_file():
        fmt = _export_meta(Path(ref)).get("format")
        if fmt != "torchvision":
            raise CheckpointError(f"{ref} is a {fmt} export; predict runs pkdkit checkpoints, torchvision exports "
                                  f"(pkdkit export --format torchvision) and torchvision weight names")
        model, _, label_map = load_exported(ref)
    else:
        model, _, label_map = load_model(ref)
    return model, label_map


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of `paths` in order: a file as given, a folder's image files (`IMAGE_EXTS`, recursive)
    sorted; each file once. A missing path, or a folder without images, is a DataError naming it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            images = list_images(p)
            if not images:
                raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in the folder {p}")
            found += images
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image or folder not found: {p}")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _drawn_names(images: list[Path]) -> list[str]:
    """Distinct output names for the drawn images: the file name, with its parent folders where names collide."""
    names = [p.name for p in images]
    depth = 1
    while len(set(names)) < len(names) and depth < max(len(p.parts) for p in images):
        depth += 1
        names = [Path(*p.absolute().parts[-depth:]).as_posix() for p in images]
    return names


def _load(path: Path) -> torch.Tensor | str:
    """`(3, H, W)` float in [0, 1], or why it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_tensor_image(img, str(path))
    except (OSError, ValueError, SyntaxError, DataError) as e:
        return reason(e)


def draw(image: torch.Tensor, detections: list[dict], score_threshold: float) -> torch.Tensor:
    """`image (3, H, W)` in [0, 1] as uint8 with the boxes of `detections` (COCO results with ``category_name``)
    of score >= `score_threshold`, each labelled "name score", one colour per category."""
    keep = [d for d in detections if d["score"] >= score_threshold]
    pixels = (image * 255).round().to(torch.uint8)
    if not keep:
        return pixels
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in keep)], dtype=torch.float32)
    palette = [tuple(int(255 * c) for c in rgb) for rgb in _TAB10]
    return draw_bounding_boxes(pixels, boxes, labels=[f"{d['category_name']} {d['score']:.2f}" for d in keep],
                               colors=[palette[d["category_id"] % len(palette)] for d in keep], width=2)


_TAB10 = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
          (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)]


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out} is not empty; choose another --out, or --force to replace its {RESULTS_FILE} "
                              f"and {DRAWN_DIR}/")
        shutil.rmtree(out / DRAWN_DIR, ignore_errors=True)
        (out / RESULTS_FILE).unlink(missing_ok=True)
    (out / DRAWN_DIR).mkdir(parents=True, exist_ok=True)


def predict(model: str | os.PathLike | nn.Module, images: str | os.PathLike | Sequence[str | os.PathLike], *,
            out: str | os.PathLike | None = None, label_map: LabelMap | None = None, score_threshold: float = 0.3,
            batch_size: int = 4, device: str = "auto", force: bool = False, show: bool = True, n_show: int = 6,
            progress: bool = True) -> Predictions:
    """Detect objects in `images` (files or folders) with `model`; write results.json and drawn/ into `out`.

    model: a model reference (see the module) or a torchvision detector, then with its `label_map`
        (model label -> category id and name). score_threshold: boxes drawn (results keep every detection).
    batch_size: images per forward pass (under ``torch.inference_mode``, the model in eval mode and moved to
        `device`, its mode restored afterwards). out: None writes nothing; a non-empty folder is refused unless
        `force` (then its results.json and drawn/ are replaced). show: in a notebook, display the first `n_show`
        drawn images as a grid. Images that cannot be read are skipped with one line each.
    """
    from pkdkit.engine import resolve_device

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    paths = find_images([images] if isinstance(images, (str, os.PathLike)) else images)
    out = Path(out) if out is not None else None
    if out is not None:
        _prepare_out(out, force)
    if isinstance(model, nn.Module):
        if label_map is None:
            raise ConfigError("predict: a model object needs its label_map (model label -> category id and name)")
    else:
        model, label_map = load_predictor(model)
    dev = resolve_device(device)
    ids = dict(zip(paths, range(1, len(paths) + 1)))
    names = dict(zip(paths, _drawn_names(paths)))
    known = set(label_map.labels)
    results: list[dict] = []
    skipped: list[str] = []
    unread: set[Path] = set()
    shown: list[tuple[str, torch.Tensor]] = []
    model.to(dev)
    with eval_mode(model), torch.inference_mode(), progress_bar(total=len(paths), desc="predict",
                                                                   disable=not progress) as pbar:
        for start in range(0, len(paths), batch_size):
            batch = []
            for p in paths[start:start + batch_size]:
                image = _load(p)
                if isinstance(image, str):
                    skipped.append(f"skipped {p}: cannot be read as an image ({image})")
                    unread.add(p)
                    tqdm.write(skipped[-1], file=sys.stderr)
                    pbar.update(1)
                else:
                    batch.append((p, image))
            outputs = model([img.to(dev) for _, img in batch]) if batch else []
            for (p, image), output in zip(batch, outputs):
                boxes = output["boxes"].float().cpu()
                dets = [{"image_id": ids[p], "file_name": str(p), "category_id": label_map.to_cat_id(label),
                         "category_name": label_map.name_of_label(label),
                         "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                         "score": round(score, 6)}
                        for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), output["scores"].cpu().tolist(),
                                                                  output["labels"].cpu().tolist()) if label in known]
                results += dets
                if out is not None or (show and len(shown) < n_show):
                    pixels = draw(image, dets, score_threshold)
                    if out is not None:
                        target = out / DRAWN_DIR / names[p]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(target)
                    if show and len(shown) < n_show:
                        shown.append((names[p], pixels))
                pbar.update(1)
    results_file = results_to_json(results, out / RESULTS_FILE) if out is not None else None
    if show and shown:
        show_figure(plot_predictions(shown))  # displays only inside IPython
    return Predictions({ids[p]: p for p in paths if p not in unread}, results, skipped, results_file,
                       out / DRAWN_DIR if out is not None else None)
