"""Figures of features, losses and results.

Every plotting function returns a `matplotlib.figure.Figure` made without pyplot, so nothing is left in
pyplot's figure list: under Agg (tests, papermill) nothing leaks, and in a notebook a returned figure is
shown once (by the Figure formatter that `enable_notebook_display` registers, or the inline backend's after
``%matplotlib inline``). `show(fig, path)` saves and displays in one call, `save_figure(fig, path)` only saves.

- `feature_summary`: one (C, H, W) map -> (H, W) image (mean / max |activation|, one channel) or
  (H, W, 3) (first three principal components over channels).
- `plot_feature_maps`: models x FPN levels, one colour scale per level so rows compare.
- `plot_feature_difference`: student vs teacher after per-channel standardisation, per level.
- `plot_loss_masks`: what a distillation loss sees (MGD's random mask and generated map, FGD's masks and
  attention, the per-position loss of PKD / CWD / MSE).
- `plot_loss_curves`, `plot_ap_bars`, `plot_samples`: training and evaluation summaries.

The interactive feature explorer is `pkdkit.explorer.FeatureExplorer`.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator
from torch import Tensor, nn

from pkdkit.evaluate import CONTROLS, EvalRecord, equal_budget_controls, format_delta, result_box
from pkdkit.losses import CWDLoss, FGDLoss, MGDLoss, MSELoss, PKDLoss, check_boxes, fgd_attention, fgd_masks

__all__ = ["feature_summary", "plot_feature_maps", "plot_feature_difference", "plot_loss_masks",
           "plot_loss_curves", "plot_ap_bars", "plot_samples", "plot_detections", "save_figure", "show",
           "enable_notebook_display"]

MODES = ("mean", "pca", "max")
DPI = 110
_META_KEYS = ("epoch", "lr", "seconds")  # per-epoch record entries that are not losses (engine.train)


# ----------------------------------------------------------------------------------------------------
# Output
def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write `fig` to `path` (PNG unless the suffix names another format), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format=path.suffix[1:].lower() or "png", bbox_inches="tight")
    return path


def show(fig: Figure, path: str | os.PathLike | None = None, dpi: int = DPI) -> None:
    """Save `fig` to `path` (when given) and display it once in a notebook; outside IPython only save.

    Displays the PNG bytes rather than the Figure so it shows whether or not matplotlib's inline
    formatter is active; returns None so that a cell ending with `show(...)` does not show it twice.
    """
    if path is not None:
        save_figure(fig, path, dpi)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(data=png_bytes(fig, dpi)))


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """`fig` as PNG bytes (what a notebook displays)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def enable_notebook_display() -> bool:
    """In IPython, let a returned Figure show as a PNG (a figure made without pyplot otherwise shows as text);
    returns whether a formatter was registered. An existing Figure formatter (the inline backend's) wins.
    Called explicitly by the notebooks' set-up (`pkdkit.workflow.open_run`), never at import."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    png = shell.display_formatter.formatters.get("image/png") if shell is not None else None
    if png is None:
        return False
    try:
        png.lookup_by_type(Figure)
        return False
    except KeyError:
        png.for_type(Figure, png_bytes)
        return True


# ----------------------------------------------------------------------------------------------------
# Feature summaries
def feature_summary(feat: Tensor, mode: str | int = "mean") -> np.ndarray:
    """Summarise a feature map `feat` (C, H, W) as an image.

    mode: ``"mean"`` mean |activation| over channels -> (H, W); ``"max"`` max |activation| -> (H, W);
    an int c: channel c as is (signed) -> (H, W); ``"pca"`` the first three principal components over
    channels (positions are samples), each min-max scaled to [0, 1] -> (H, W, 3) RGB. Component signs are
    fixed (largest loading positive) so the result is deterministic. FPN outputs are not rectified, hence
    the absolute values.
    """
    if not isinstance(feat, Tensor) or feat.dim() != 3:
        raise ValueError(f"feature_summary: expected a feature map of shape (C, H, W), got "
                         f"{tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__}")
    x = feat.detach().to("cpu", torch.float64)
    c, h, w = x.shape
    if isinstance(mode, (int, np.integer)) and not isinstance(mode, bool):
        if not 0 <= mode < c:
            raise ValueError(f"feature_summary: channel {mode} is out of range for a map with {c} channels")
        out = x[int(mode)]
    elif mode == "mean":
        out = x.abs().mean(dim=0)
    elif mode == "max":
        out = x.abs().amax(dim=0)
    elif mode == "pca":
        return _pca_rgb(x)
    else:
        raise ValueError(f"feature_summary: mode must be one of {MODES} or a channel index (int), got {mode!r}")
    return out.numpy().astype(np.float32)


def _pca_rgb(x: Tensor) -> np.ndarray:
    """(C, H, W) float64 -> (H, W, 3) float32 in [0, 1]: projections on the top 3 principal axes."""
    c, h, w = x.shape
    samples = x.reshape(c, h * w).T
    samples = samples - samples.mean(dim=0, keepdim=True)  # (HW, C)
    _, _, vh = torch.linalg.svd(samples, full_matrices=False)  # rows of vh: principal axes
    axes = vh[:3]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    axes = axes * torch.where(signs == 0, 1.0, signs)
    proj = samples @ axes.T  # (HW, k), k = min(3, C, HW)
    lo, hi = proj.amin(dim=0), proj.amax(dim=0)
    proj = (proj - lo) / (hi - lo).clamp(min=1e-12)
    rgb = torch.zeros(h * w, 3, dtype=torch.float64)
    rgb[:, : proj.shape[1]] = proj
    return rgb.reshape(h, w, 3).numpy().astype(np.float32)


def standardised_difference(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_c |z(S)_c - z(T)_c| for maps (C, H, W), z standardising each channel over its H*W positions."""
    def z(f: Tensor) -> Tensor:
        f = f.detach().to("cpu", torch.float64).flatten(1)
        return (f - f.mean(dim=1, keepdim=True)) / (f.std(dim=1, unbiased=False, keepdim=True) + 1e-6)

    return (z(student) - z(teacher)).abs().mean(dim=0).reshape(student.shape[-2:])


def _one_image(feat: Tensor, index: int, where: str) -> Tensor:
    """(N, C, H, W) -> (C, H, W) of image `index`, with an error naming `where` on bad input."""
    if not isinstance(feat, Tensor) or feat.dim() != 4:
        shape = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
        raise ValueError(f"{where}: expected features of shape (N, C, H, W), got {shape}")
    if not -feat.shape[0] <= index < feat.shape[0]:
        raise ValueError(f"{where}: image index {index} is out of range for a batch of {feat.shape[0]}")
    return feat[index].detach()


def _image_hwc(image: Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) tensor -> (H, W, 3) in [0, 1] for imshow (min-max scaled if outside)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    x = image.detach().to("cpu", torch.float32).expand(3, -1, -1)
    if x.min() < 0 or x.max() > 1:
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x.permute(1, 2, 0).numpy()


def _colorbar(fig: Figure, im: Any, ax: Any, **kwargs: Any) -> None:
    """A colorbar with at most 4 short tick labels (small values would otherwise run into each other)."""
    cb = fig.colorbar(im, ax=ax, **kwargs)
    cb.locator = MaxNLocator(nbins=4)
    cb.formatter = FuncFormatter(lambda v, _: f"{v:.3g}")
    cb.update_ticks()


def bare(ax: Any) -> None:
    """No ticks: an image panel."""
    ax.set_xticks([])
    ax.set_yticks([])


def level_order(name: str) -> tuple[int, str]:
    """Sort key of FPN level names: p2 < p3 < ... < p7, other names last."""
    return (int(name[1:]), name) if name[1:].isdigit() else (1_000, name)


# ----------------------------------------------------------------------------------------------------
# Feature figures
def plot_feature_maps(features: Mapping[str, Mapping[str, Tensor]], image: Tensor | None = None, *, index: int = 0,
                      levels: Sequence[str] | None = None, mode: str | int = "mean") -> Figure:
    """Grid of FPN feature summaries: one row per model, one column per level (the input image first).

    features: {row name ("teacher r50", "student after stage 1", ...): {level: (N, C, H, W)}} as returned
    by `extract_features`; `index` picks the image of the batch. levels: default the levels every model
    has, in the first model's order. mode: see `feature_summary`. Scalar modes share one colour scale per
    level column (one colorbar under it), so a brighter cell means a larger activation in any row. PCA
    colours are computed per map and do not compare across rows (different networks' channels).
    """
    if not features:
        raise ValueError("plot_feature_maps: no models given")
    names = list(features)
    levels = _pick_levels(features, levels, "plot_feature_maps")
    maps = {(name, lvl): feature_summary(_one_image(features[name][lvl], index, f"plot_feature_maps: {name} {lvl}"),
                                         mode) for name in names for lvl in levels}
    first = 1 if image is not None else 0
    ncols, nrows = first + len(levels), len(names)
    fig = Figure(figsize=(2.3 * ncols + 0.6, 2.1 * nrows + (0.9 if mode != "pca" else 0.5)), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for r, name in enumerate(names):
        if image is not None:
            axes[r, 0].imshow(_image_hwc(image))
        axes[r, 0].set_ylabel(name, fontsize=10)
    if image is not None:
        axes[0, 0].set_title("input")
    signed = isinstance(mode, (int, np.integer)) and not isinstance(mode, bool)
    for j, lvl in enumerate(levels, start=first):
        column = [maps[(name, lvl)] for name in names]
        lo, hi = min(float(m.min()) for m in column), max(float(m.max()) for m in column)
        if signed:
            lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        im = None
        for r, m in enumerate(column):
            kw = {} if mode == "pca" else dict(cmap="RdBu_r" if signed else "magma", vmin=lo, vmax=hi)
            im = axes[r, j].imshow(m, interpolation="nearest", **kw)
        h, w = column[0].shape[:2]
        axes[0, j].set_title(f"{lvl} ({h}×{w})")
        if mode != "pca":
            _colorbar(fig, im, list(axes[:, j]), location="bottom", shrink=0.85, aspect=15)
    for ax in axes.flat:
        bare(ax)
    what = {"mean": "mean |activation|", "max": "max |activation|", "pca": "first 3 principal components (RGB)"}
    fig.suptitle(f"FPN features: {f'channel {mode}' if signed else what[mode]}")
    return fig


def _pick_levels(features: Mapping[str, Mapping[str, Tensor]], levels: Sequence[str] | None, where: str) -> list[str]:
    names = list(features)
    if levels is None:
        levels = [lvl for lvl in features[names[0]] if all(lvl in features[n] for n in names)]
        if not levels:
            raise ValueError(f"{where}: the models share no FPN level: "
                             + "; ".join(f"{n}: {list(features[n])}" for n in names))
        return levels
    for n in names:
        missing = [lvl for lvl in levels if lvl not in features[n]]
        if missing:
            raise ValueError(f"{where}: {n} has no level(s) {missing}; it has {list(features[n])}")
    return list(levels)


def plot_feature_difference(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], *, index: int = 0,
                            levels: Sequence[str] | None = None,
                            adapter: nn.Module | Mapping[str, nn.Module | None] | None = None,
                            title: str = "student vs teacher") -> Figure:
    """Per level, mean over channels of |z(S) - z(T)|, z standardising each channel over H*W.

    student, teacher: {level: (N, C, H, W)} of the same transformed batch; `index` picks the image.
    Standardising per channel removes each network's scale, so the map shows where the *patterns* differ
    (0: identical up to scale and shift; about 1.13 for unrelated channels). adapter: a 1x1 conv applied to
    the student first, or {level: module} (e.g. the distillation losses' `adapter`s) when channel counts
    differ; the same colour scale for all levels, the level's mean in its title. Levels of one position
    (1x1: standardising leaves nothing to compare) are left out and named in the figure's title.
    """
    levels = _pick_levels({"student": student, "teacher": teacher}, levels, "plot_feature_difference")
    diffs = {}
    for lvl in levels:
        s = _one_image(student[lvl], index, f"plot_feature_difference: student {lvl}")
        t = _one_image(teacher[lvl], index, f"plot_feature_difference: teacher {lvl}")
        module = adapter.get(lvl) if isinstance(adapter, Mapping) else adapter
        if module is not None:
            p = next(module.parameters(), None)
            with torch.no_grad():
                s = module(s.unsqueeze(0).to(p.device if p is not None else s.device))[0]
        if s.shape != t.shape:
            raise ValueError(f"plot_feature_difference: level {lvl}: student map {tuple(s.shape)} and teacher map "
                             f"{tuple(t.shape)} differ (C, H, W); pass the 1x1 `adapter` when channels differ and "
                             "features of the same transformed batch")
        diffs[lvl] = standardised_difference(s, t).numpy()
    flat = [lvl for lvl, d in diffs.items() if d.size < 2]
    diffs = {lvl: d for lvl, d in diffs.items() if d.size >= 2}
    if not diffs:
        raise ValueError(f"plot_feature_difference: every level ({', '.join(flat)}) is 1x1: nothing to compare")
    fig = Figure(figsize=(2.4 * len(diffs) + 1.0, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(diffs), squeeze=False)[0])
    hi = max(float(d.max()) for d in diffs.values())
    for ax, (lvl, d) in zip(axes, diffs.items()):
        bare(ax)
        im = ax.imshow(d, cmap="viridis", vmin=0, vmax=hi, interpolation="nearest")
        ax.set_title(f"{lvl}: mean {d.mean():.2f}")
    _colorbar(fig, im, list(axes), shrink=0.85, label="|z(S) − z(T)|")
    left_out = f"; {', '.join(flat)} left out (1×1)" if flat else ""
    fig.suptitle(f"{title}: per-channel standardised difference (lower = closer){left_out}")
    return fig


# ----------------------------------------------------------------------------------------------------
# What a loss sees
# The losses drawn by the generic view: name, and what the loss weighs at a position (for the panel's title)
_LOSS_TERMS = {PKDLoss: ("PKD", "(z(S) − z(T))², z per channel"), CWDLoss: ("CWD", "p_T·log(p_T/p_S), spatial softmax"),
               MSELoss: ("MSE", "(S − T)²")}


def plot_loss_masks(loss_module: nn.Module, student_feat: Tensor, teacher_feat: Tensor, *,
                    boxes: Sequence[Tensor] | None = None, image_size: tuple[int, int] | None = None,
                    index: int = 0, seed: int = 0) -> Figure:
    """The view of one distillation loss (pkdkit.losses) on one FPN level, for image `index` of the batch.

    student_feat (N, Cs, H, W), teacher_feat (N, Ct, H, W): same batch, as the loss takes them (the
    loss's adapter is applied). boxes / image_size: as `FGDLoss` takes them (required for FGD).
    - MGDLoss: the random spatial mask (drawn from a `torch.Generator` seeded with `seed`, the module's own
      generator restored afterwards, the global RNG untouched), the generated map G(S * M), the teacher
      and the per-position loss.
    - FGDLoss: the foreground (boxes outlined) and background masks of `fgd_masks`, the teacher's spatial
      and channel attention, and the per-position focal loss (foreground + background terms).
    - PKDLoss, CWDLoss, MSELoss: student, teacher and the per-position loss.
    A per-position loss map sums, over all positions and images of the batch, to the loss's value (for
    FGD: its focal part), so the titles can quote both.
    """
    kinds = (MGDLoss, FGDLoss, *_LOSS_TERMS)
    if not isinstance(loss_module, kinds):
        raise ValueError(f"plot_loss_masks: expected one of {[k.__name__ for k in kinds]}, "
                         f"got {type(loss_module).__name__}")
    devices = [student_feat.device] if student_feat.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        if isinstance(loss_module, MGDLoss):
            return _mgd_view(loss_module, student_feat, teacher_feat, index, seed)
        if isinstance(loss_module, FGDLoss):
            return _fgd_view(loss_module, student_feat, teacher_feat, boxes, image_size, index)
        return _contribution_view(loss_module, student_feat, teacher_feat, index)


def map_panel(fig: Figure, ax: Any, data: Tensor | np.ndarray, title: str, cmap: str = "magma",
              vmin: float | None = None, vmax: float | None = None, colorbar: bool = True) -> None:
    """Draw an (H, W) map (or (H, W, 3) image) on `ax` with its title; a signed map ("RdBu_r") is centred on 0."""
    data = data.detach().cpu().numpy() if isinstance(data, Tensor) else data
    if cmap == "RdBu_r" and vmin is None:  # signed: symmetric around 0
        vmax = float(np.abs(data).max()) or 1.0
        vmin = -vmax
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    bare(ax)
    if colorbar:
        _colorbar(fig, im, ax, shrink=0.8, location="bottom", aspect=15)


def _loss_figure(n_panels: int, title: str) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(2.9 * n_panels, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n_panels))
    fig.suptitle(title)
    return fig, axes


@contextlib.contextmanager
def _seeded(loss: MGDLoss, seed: int) -> Iterator[None]:
    """MGD's masks drawn from a CPU generator seeded with `seed`; the module's own generator is restored."""
    previous = loss.generator
    loss.generator = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        loss.generator = previous


def _mgd_view(loss: MGDLoss, s_feat: Tensor, t_feat: Tensor, index: int, seed: int) -> Figure:
    with _seeded(loss, seed):
        generated, teacher, keep = loss.generate(s_feat, t_feat)
    with _seeded(loss, seed):  # the same mask again
        per_position = loss.loss_map(s_feat, t_feat)
    n = teacher.shape[0]
    _one_image(teacher, index, "plot_loss_masks")
    value = float(per_position.sum())

    fig, axes = _loss_figure(4, f"MGD: loss {value:.4g} on this batch (N={n}), λ={loss.lambda_mgd:g}, seed {seed}")
    mask = keep[index, 0]
    map_panel(fig, axes[0], mask, f"random mask: {100 * mask.mean():.0f}% kept", cmap="gray", vmin=0, vmax=1,
              colorbar=False)
    axes[0].set_xlabel("white: kept, black: masked", fontsize=9)
    g, t = generated[index].abs().mean(dim=0), teacher[index].abs().mean(dim=0)
    hi = float(torch.maximum(g.max(), t.max()))
    map_panel(fig, axes[1], g, "generated G(S·M): mean |·|", vmin=0, vmax=hi)
    map_panel(fig, axes[2], t, "teacher: mean |·|", vmin=0, vmax=hi)
    map_panel(fig, axes[3], per_position[index], f"loss per position (Σ = {float(per_position[index].sum()):.3g})",
              cmap="viridis")
    return fig


def _fgd_view(loss: FGDLoss, s_feat: Tensor, t_feat: Tensor, boxes: Sequence[Tensor] | None,
              image_size: tuple[int, int] | None, index: int) -> Figure:
    _, teacher = loss.prepare(s_feat, t_feat)
    n, c, h, w = teacher.shape
    _one_image(teacher, index, "plot_loss_masks")
    check_boxes(list(boxes) if boxes is not None else None, image_size, n)
    boxes = [b.to(teacher.device) for b in boxes]
    value = float(loss(s_feat, t_feat, boxes=boxes, image_size=image_size))
    per_position = loss.loss_map(s_feat, t_feat, boxes=boxes, image_size=image_size)  # (N, H, W), focal terms
    mask_fg, mask_bg = fgd_masks(boxes, image_size, (h, w))
    spatial_t, channel_t = fgd_attention(teacher, loss.temp)

    fig, axes = _loss_figure(5, f"FGD: loss {value:.4g} on this batch (N={n}), temperature {loss.temp:g}")
    map_panel(fig, axes[0], mask_fg[index], "foreground mask (1/box area)", cmap="viridis", vmin=0)
    for x1, y1, x2, y2 in boxes[index].tolist():  # outline the boxes in feature-cell coordinates
        sx, sy = w / image_size[1], h / image_size[0]
        axes[0].add_patch(Rectangle((x1 * sx - 0.5, y1 * sy - 0.5), (x2 - x1) * sx, (y2 - y1) * sy,
                                    fill=False, edgecolor="white", lw=1.2))
    map_panel(fig, axes[1], mask_bg[index], "background mask (1/#cells)", cmap="viridis", vmin=0)
    map_panel(fig, axes[2], spatial_t[index], "teacher spatial attention")
    ch = channel_t[index].sort(descending=True).values.cpu().numpy()
    axes[3].bar(np.arange(c), ch, width=1.0, color="tab:orange")
    axes[3].axhline(1.0, color="0.4", lw=0.8, ls="--")
    axes[3].set(title="teacher channel attention", xlabel="channel (sorted)", xlim=(-0.5, c - 0.5))
    axes[3].title.set_fontsize(10)
    map_panel(fig, axes[4], per_position[index],
              f"focal loss per position (Σ = {float(per_position[index].sum()):.3g})", cmap="viridis")
    return fig


def _contribution_view(loss: PKDLoss | CWDLoss | MSELoss, s_feat: Tensor, t_feat: Tensor, index: int) -> Figure:
    student, teacher = loss.prepare(s_feat, t_feat)
    n = teacher.shape[0]
    _one_image(teacher, index, "plot_loss_masks")
    value = float(loss(s_feat, t_feat))
    per_position = loss.loss_map(s_feat, t_feat)
    name, what = _LOSS_TERMS[type(loss)]
    fig, axes = _loss_figure(3, f"{name}: loss {value:.4g} on this batch (N={n})")
    map_panel(fig, axes[0], student[index].abs().mean(dim=0), "student (adapted): mean |·|")
    map_panel(fig, axes[1], teacher[index].abs().mean(dim=0), "teacher: mean |·|")
    m = per_position[index]
    map_panel(fig, axes[2], m, f"loss per position (Σ = {float(m.sum()):.3g})\n{what}",
              cmap="RdBu_r" if float(m.min()) < 0 else "viridis")
    return fig


# ----------------------------------------------------------------------------------------------------
# Training and evaluation summaries
def _epochs(history: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(history, Mapping):
        if "epochs" not in history:
            raise ValueError(f"plot_loss_curves: {name!r} is a dict without 'epochs' (expected a history.json "
                             f"dict {{'config': ..., 'epochs': [...]}}); keys: {sorted(history)}")
        history = history["epochs"]
    if not isinstance(history, Sequence) or not all(isinstance(r, Mapping) for r in history):
        raise ValueError(f"plot_loss_curves: {name!r} must be a list of per-epoch dicts or a history.json dict")
    return list(history)


def _split_loss(record: Mapping[str, Any]) -> tuple[float, float]:
    """(detection loss, distillation loss) of one epoch record; NaN where the record has none."""
    distill = [float(v) for k, v in record.items() if k.startswith("distill") and isinstance(v, (int, float))]
    kd = sum(distill) if distill else float("nan")
    if "loss" in record:
        det = float(record["loss"]) - (kd if distill else 0.0)
    else:
        parts = [float(v) for k, v in record.items() if not k.startswith("distill") and k not in _META_KEYS
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
        det = sum(parts) if parts else float("nan")
    return det, kd


def plot_loss_curves(histories: Mapping[str, Any], sequential: bool = True) -> Figure:
    """Detection and distillation loss per epoch, one colour per stage.

    histories: {stage name: per-epoch records (engine's ``history.json["epochs"]``) or the history.json
    dict itself}. Detection loss = ``loss`` minus the ``distill*`` terms (or, without ``loss``, the sum of
    the other numeric entries except epoch/lr/seconds); distillation loss = sum of the ``distill*`` terms.
    sequential: stages follow each other on one epoch axis (in dict order), separated by dashed lines;
    False overlays independent runs from epoch 1 (e.g. teacher candidates).
    """
    if not histories:
        raise ValueError("plot_loss_curves: no histories given")
    series, offset = [], 0  # (name, epochs on the x axis, detection loss, distillation loss)
    for name, history in histories.items():
        records = _epochs(history, name)
        det, kd = np.array([_split_loss(r) for r in records], dtype=float).reshape(-1, 2).T
        series.append((name, np.arange(1, len(records) + 1) + (offset if sequential else 0), det, kd))
        offset += len(records)
    any_kd = any(not np.all(np.isnan(kd)) for *_, kd in series)
    # Without distillation terms (supervised runs) only the detection loss is drawn: no empty panel.
    fig = Figure(figsize=(11, 3.8) if any_kd else (6.5, 3.8), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, 2 if any_kd else 1, sharex=True)))
    ax_det = axes[0]
    for i, (name, x, det, kd) in enumerate(series):
        ax_det.plot(x, det, marker="o", ms=4, color=f"C{i % 10}", label=name)
        if any_kd and not np.all(np.isnan(kd)):
            axes[1].plot(x, kd, marker="o", ms=4, color=f"C{i % 10}", label=name)
        if sequential and i > 0:
            for ax in axes:
                ax.axvline(x[0] - 0.5, color="0.55", ls="--", lw=1, gid="stage-separator")
    ax_det.set(title="detection loss", xlabel="epoch" + (" (all stages)" if sequential else ""), ylabel="loss")
    if any_kd:
        axes[1].set(title="distillation loss (sum over levels)", xlabel=ax_det.get_xlabel())
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*ax_det.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(histories), 4),
               title="stages" if sequential else None, fontsize=9)
    return fig


def _stat(record: Mapping[str, Any], stat: str, iou_type: str, run: str) -> float | None:
    try:
        value = EvalRecord.of(record).stat(stat, iou_type)
    except (KeyError, TypeError) as e:
        raise ValueError(f"plot_ap_bars: run {run!r} has no {iou_type} {stat} (expected an evaluate record "
                         f"with ['metrics'][{iou_type!r}]['stats'][{stat!r}]); missing {e}") from e
    return None if value < 0 else value  # COCOeval: -1 means undefined


def plot_ap_bars(rows: Mapping[str, Any], stat: str = "AP", iou_type: str = "bbox",
                 controls: Sequence[str] = CONTROLS) -> Figure:
    """Horizontal bars of one COCO stat (in %) per run, the first run (the baseline) on top.

    rows: {run: evaluate record or `coco_evaluate`'s output (`pkdkit.evaluate.EvalRecord.of`)} or
    {run: [records, one per seed]} for mean ± sample std error bars. Each bar is labelled with its value and
    its difference to the control with the *same* student epochs (`pkdkit.evaluate.equal_budget_controls`):
    the runs named in `controls` that are in `rows` (default: ``baseline`` and the equal-budget
    ``baseline_long``), else the first run; with several controls a gain names its control
    ("+1.6 vs baseline_long"), and a run whose epochs no control
    has shows no gain (a gain over a shorter-trained control would mix distillation with training longer).
    Records without a budget all count as one budget. Undefined stats (-1) show "n/a". Records with a budget
    (`pkdkit.evaluate.EvalRecord.budget`) show the student's total epochs beside the run name; each control
    is a vertical line.
    """
    if not rows:
        raise ValueError("plot_ap_bars: no runs given")
    names, means, stds, counts, budgets = [], [], [], [], []
    for run, value in rows.items():
        records = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, Mapping)) else [value]
        vals = [v for v in (_stat(r, stat, iou_type, run) for r in records) if v is not None]
        epochs = EvalRecord.of(records[0]).budget.get("epochs") if records else None
        names.append(f"{run} ({epochs} ep)" if epochs is not None else run)
        budgets.append(epochs)
        means.append(100 * float(np.mean(vals)) if vals else np.nan)
        stds.append(100 * float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        counts.append(len(records))
    means_a, stds_a = np.array(means), np.array(stds)
    runs = list(rows)
    control = equal_budget_controls(runs, budgets, controls)
    control_rows = [i for i, c in enumerate(control) if c == i]
    fig = Figure(figsize=(7.5, 0.55 * len(names) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(names))
    colors = ["0.6" if i in control_rows else "tab:blue" for i in range(len(names))]
    errors = stds_a if any(c > 1 for c in counts) else None
    ax.barh(y, np.nan_to_num(means_a), xerr=errors, color=colors, capsize=4 if errors is not None else 0,
            height=0.6, error_kw={"elinewidth": 1.2})
    for k, style in zip(control_rows, ("--", ":", "-.")):
        if not np.isnan(means_a[k]):
            ax.axvline(means_a[k], color="0.35", ls=style, lw=1)
    right = float(np.nanmax(means_a + stds_a)) if not np.all(np.isnan(means_a)) else 1.0
    for i, (m, s, k) in enumerate(zip(means_a, stds_a, counts)):
        if np.isnan(m):
            text = "n/a"
        else:
            text = f"{m:.1f}" + (f" ± {s:.1f} (n={k})" if k > 1 else "")
            c = control[i]
            if c is not None and c != i and not np.isnan(means_a[c]):
                text += f"   {format_delta(m - means_a[c])}" + (f" vs {runs[c]}" if len(control_rows) > 1 else "")
        ax.text((0 if np.isnan(m) else m + s) + 0.02 * right, i, text, va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, right * 1.5 if right > 0 else 1)
    ax.set(xlabel=f"{iou_type} {stat} (%)", title=f"{iou_type} {stat}" + (" (mean ± std over seeds)"
                                                                          if errors is not None else "")
           + "; gains against the control with the same epochs")
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_samples(dataset: Any, n: int = 6, *, indices: Sequence[int] | None = None, cols: int = 3) -> Figure:
    """Images of a `CocoDetection` with their ground-truth boxes and class names.

    dataset[i] -> ((3, H, W) in [0, 1], target with `boxes` (K, 4) xyxy and `labels`); names come from
    `dataset.label_map`. indices: which images (default the first `n`).
    """
    indices = list(range(min(n, len(dataset)))) if indices is None else list(indices)
    if not indices:
        raise ValueError("plot_samples: no images to show (empty dataset or indices)")
    fig, axes = image_grid(len(indices), cols, 3.0)
    label_map = getattr(dataset, "label_map", None)
    for ax, i in zip(axes.flat, indices):
        image, target = dataset[i]
        ax.imshow(_image_hwc(image))
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            color = f"C{label % 10}"
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.5))
            name = label_map.name_of_label(label) if label_map is not None else str(label)
            ax.text(x1, y1, name, color="white", fontsize=7, va="bottom",
                    bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
        image_id = int(target["image_id"]) if "image_id" in target else i
        k = len(target["boxes"])
        ax.set_title(f"image {image_id}: {k} object{'s' if k != 1 else ''}", fontsize=9)
    return finish_grid(fig, axes)


def plot_predictions(drawn: Sequence[tuple[str, torch.Tensor]], cols: int = 3) -> Figure:
    """A grid of drawn images (name, uint8 `(3, H, W)`, e.g. `pkdkit.predict`'s), titled with their names."""
    if not drawn:
        raise ValueError("plot_predictions: no images to show")
    fig, axes = image_grid(len(drawn), cols, 3.2)
    for ax, (name, pixels) in zip(axes.flat, drawn):
        ax.imshow(pixels.permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=8)
    return finish_grid(fig, axes)


def image_grid(n: int, cols: int, inches: float) -> tuple[Figure, np.ndarray]:
    """(figure, axes (rows, cols)): `n` image panels of `inches` each, in rows of at most `cols`; draw into the
    first `n` axes, then `finish_grid`."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(inches * cols, inches * rows), layout="constrained")
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def finish_grid(fig: Figure, axes: np.ndarray) -> Figure:
    """An `image_grid` once drawn: no ticks, the panels left without an image hidden."""
    for ax in axes.flat:
        bare(ax)
        if not ax.images:
            ax.set_axis_off()
    return fig


def plot_detections(dataset: Any, results: Mapping[str, Sequence[Mapping[str, Any]]], image_ids: Sequence[int], *,
                    score_threshold: float = 0.3) -> Figure:
    """Ground truth and each model's detections on the same images: rows = images, columns = GT + models.

    dataset: a `CocoDetection` (its COCO ground truth and image files); results: {model: COCO results list
    (image_id, category_id, bbox xywh or an RLE segmentation, score)}; detections below `score_threshold` are not
    drawn.
    """
    image_ids = list(image_ids)
    if not image_ids:
        raise ValueError("plot_detections: no image ids to show")
    coco = dataset.coco
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    by_model = {m: {} for m in results}
    for m, dets in results.items():
        for d in dets:
            if d["score"] >= score_threshold:
                by_model[m].setdefault(d["image_id"], []).append(d)
    cols = ["ground truth", *results]
    fig = Figure(figsize=(2.6 * len(cols), 2.6 * len(image_ids)), layout="constrained")
    axes = np.asarray(fig.subplots(len(image_ids), len(cols), squeeze=False))
    for r, image_id in enumerate(image_ids):
        image = _image_hwc(dataset[dataset.ids.index(image_id)][0])
        panels = [[{**a, "score": None} for a in coco.imgToAnns.get(image_id, [])]]
        panels += [by_model[m].get(image_id, []) for m in results]
        for c, (title, boxes) in enumerate(zip(cols, panels)):
            ax = axes[r, c]
            ax.imshow(image)
            for d in boxes:
                x, y, w, h = result_box(d)
                color = f"C{d['category_id'] % 10}"
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, lw=1.3,
                                       ls="--" if d.get("iscrowd") else "-"))
                label = names.get(d["category_id"], str(d["category_id"]))
                if d["score"] is not None:
                    label += f" {d['score']:.2f}"
                ax.text(x, y, label, color="white", fontsize=6, va="bottom",
                        bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
            ax.set_title(f"{title} · image {image_id}" if c == 0 else f"{title} ({len(boxes)})", fontsize=8)
            bare(ax)
    return fig


def note(ax: Any, text: str) -> None:
    """A panel that says why there is nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.3")
    bare(ax)


_LATENCIES = {"ort_cpu_ms": "ONNX Runtime, CPU", "torch_cpu_ms": "PyTorch, CPU", "ort_cuda_ms": "ONNX Runtime, CUDA",
              "torch_cuda_ms": "PyTorch, CUDA"}


def plot_speed_accuracy(profiles: Sequence[Any], latency: str | None = None) -> Figure:
    """Latency against AP, one labelled point per model (`pkdkit.profile.Profile`s or their `to_dict()`): the
    figure an engineer picks a model from (up and to the left is better). `latency`: which one (a key of
    `_LATENCIES`); default ONNX Runtime on the CPU when every model has it, else PyTorch on the CPU. Models
    without an AP are left out (named in the title)."""
    rows = [p if isinstance(p, Mapping) else p.to_dict() for p in profiles]
    if latency is None:
        latency = "ort_cpu_ms" if rows and all(r.get("ort_cpu_ms") is not None for r in rows) else "torch_cpu_ms"
    if latency not in _LATENCIES:
        raise ValueError(f"plot_speed_accuracy: latency must be one of {sorted(_LATENCIES)}, not {latency!r}")
    shown = [r for r in rows if r.get("ap") is not None and r.get(latency) is not None]
    if not shown:
        raise ValueError("plot_speed_accuracy: no model has both an AP and this latency")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    seen: list[float] = []
    for r in shown:
        x, y = r[latency], 100 * r["ap"]
        size = 20 + 12 * r["params"] / 1e6  # marker area in points^2
        ax.scatter([x], [y], s=size, alpha=0.75, zorder=3)
        left = any(abs(x - s) < 1e-9 for s in seen)  # same cost as a model already drawn: label on the other side
        ax.annotate(f"{r['name']}\n{r['params'] / 1e6:.1f} M, {r['flops'] / 1e9:.2g} GFLOPs", (x, y),
                    xytext=((-1 if left else 1) * (size ** 0.5 / 2 + 4), 0), textcoords="offset points", va="center",
                    ha="right" if left else "left", fontsize=8)
        seen.append(x)
    xs, ys = [r[latency] for r in shown], [100 * r["ap"] for r in shown]
    pad_x, pad_y = 0.35 * (max(xs) - min(xs) or max(xs)), 0.15 * (max(ys) - min(ys) or 1.0)
    ax.set_xlim(max(0.0, min(xs) - pad_x), max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    first = shown[0]
    ax.set(xlabel=f"latency at batch 1 (ms, median; {_LATENCIES[latency]}, {first['threads']} thread(s))",
           ylabel="bbox AP (%)", title="Speed and accuracy (point size: parameters)"
           + (f"; no AP: {', '.join(r['name'] for r in rows if r not in shown)}" if len(shown) < len(rows) else ""))
    ax.grid(alpha=0.3)
    return fig
