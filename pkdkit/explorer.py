"""An ipywidgets explorer of FPN features: pick a model, a level, a summary and an image; the figure shows
what the model saw, its map and the difference to a reference model. The static figures it draws with are
`pkdkit.viz`'s."""
from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from pkdkit.features import extract_features
from pkdkit.models import eval_mode
from pkdkit.viz import MODES, bare, feature_summary, level_order, map_panel, note, png_bytes, standardised_difference


class FeatureExplorer:
    """Browse FPN features of several detectors in a notebook (ipywidgets).

    >>> explorer = FeatureExplorer({"teacher": t, "student before": s0, "student after": s1}, images)
    >>> explorer                                   # the controls and the figure
    >>> fig = explorer.update(model="student after", level="p4", mode="pca", image=1)   # headless

    models: {name: detector}; the first is the reference of the difference panel. images: (3, H, W) in
    [0, 1]. The figure shows the input as the model saw it (resized and padded, so it lines up with the
    maps) | the chosen model's map at the chosen level (`feature_summary`: mean, pca, max or one channel)
    | the per-channel standardised difference to the reference model (as `plot_feature_difference`).
    Features are computed once per (model, image) in eval mode without gradients (each module's
    train/eval flag is restored afterwards) and kept on the CPU; the constructor computes image 0 for
    every model to learn the levels.
    """

    def __init__(self, models: Mapping[str, nn.Module], images: Sequence[Tensor]):
        import ipywidgets as widgets

        if not models:
            raise ValueError("FeatureExplorer: no models given")
        if not images:
            raise ValueError("FeatureExplorer: no images given")
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"FeatureExplorer: images[{i}] must be a (3, H, W) tensor, got "
                                 f"{tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__}")
        self.models = dict(models)
        self.images = list(images)
        self._cache: dict[tuple[str, int], tuple[OrderedDict[str, Tensor], np.ndarray]] = {}
        self.reference = next(iter(self.models))
        found = {lvl for name in self.models for lvl in self._features(name, 0)[0]}
        levels = sorted(found, key=level_order)
        first_levels = list(self._features(self.reference, 0)[0])

        style = {"description_width": "initial"}
        self.controls = {
            "model": widgets.Dropdown(options=list(self.models), description="model", style=style),
            "level": widgets.Dropdown(options=levels, value=first_levels[0], description="level"),
            "mode": widgets.Dropdown(options=[*MODES, "channel"], value="mean", description="mode"),
            "channel": widgets.IntSlider(value=0, min=0, max=0, description="channel", disabled=True),
            "image": widgets.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image"),
        }
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.controls[k] for k in ("model", "level", "mode")]),
                                    widgets.HBox([self.controls[k] for k in ("channel", "image")]), self.output])
        self.figure: Figure | None = None
        self._hold = False
        self._sync_channel_range()
        for w in self.controls.values():
            w.observe(self._on_change, names="value")
        self._draw()

    # --- features -------------------------------------------------------------------------------
    def _features(self, name: str, i: int) -> tuple["OrderedDict[str, Tensor]", np.ndarray]:
        """({level: (C, H, W) on CPU}, what the backbone saw as an (H, W, 3) image) of model `name`, image i."""
        key = (name, i)
        if key not in self._cache:
            model = self.models[name]
            p = next(model.parameters())
            with eval_mode(model), torch.no_grad():
                feats, batch = extract_features(model, [self.images[i].to(p.device, p.dtype)])
            mean = torch.tensor(model.transform.image_mean).view(3, 1, 1)
            std = torch.tensor(model.transform.image_std).view(3, 1, 1)
            seen = (batch.tensors[0].float().cpu() * std + mean).clamp(0, 1)
            self._cache[key] = (OrderedDict((k, v[0].float().cpu()) for k, v in feats.items()),
                                seen.permute(1, 2, 0).numpy())
        return self._cache[key]

    # --- widgets --------------------------------------------------------------------------------
    def _sync_channel_range(self) -> None:
        c = self.controls
        feats = self._features(c["model"].value, c["image"].value)[0]
        level = feats.get(c["level"].value)
        c["channel"].max = (level.shape[0] - 1) if level is not None else 0
        c["channel"].disabled = c["mode"].value != "channel"

    def _on_change(self, change: dict[str, Any]) -> None:
        if self._hold:
            return
        self._hold = True
        try:
            self._sync_channel_range()
        finally:
            self._hold = False
        self._draw()

    def update(self, **changes: Any) -> Figure:
        """Set controls (model=, level=, mode=, channel=, image=) and redraw once; returns the figure.

        Raises ValueError for a value the control does not offer (listing the choices)."""
        unknown = sorted(set(changes) - set(self.controls))
        if unknown:
            raise TypeError(f"FeatureExplorer.update: unknown control(s) {unknown}; controls: {list(self.controls)}")
        self._hold = True
        try:
            for key in ("model", "level", "mode", "image"):
                if key in changes:
                    self._set(key, changes[key])
            self._sync_channel_range()  # the channel range follows model and level
            if "channel" in changes:
                self._set("channel", changes["channel"])
        finally:
            self._hold = False
        return self._draw()

    def _set(self, key: str, value: Any) -> None:
        w = self.controls[key]
        if hasattr(w, "options"):
            if value not in w.options:
                raise ValueError(f"FeatureExplorer: {key}={value!r} is not available; choices: {list(w.options)}")
        elif not (isinstance(value, (int, np.integer)) and w.min <= value <= w.max):
            raise ValueError(f"FeatureExplorer: {key}={value!r} is out of range [{w.min}, {w.max}]")
        w.value = value

    # --- drawing --------------------------------------------------------------------------------
    def _draw(self) -> Figure:
        c = {k: w.value for k, w in self.controls.items()}
        name, level, i = c["model"], c["level"], c["image"]
        feats, seen = self._features(name, i)
        ref_feats = self._features(self.reference, i)[0]
        fig = Figure(figsize=(12, 4.0), layout="constrained")
        axes = fig.subplots(1, 3)
        axes[0].imshow(seen)
        axes[0].set_title(f"image {i} (as {name} sees it)", fontsize=10)
        mode = c["channel"] if c["mode"] == "channel" else c["mode"]
        if level not in feats:
            note(axes[1], f"{name} has no {level}\n(levels {', '.join(feats)})")
        else:
            summary = feature_summary(feats[level], mode)
            signed = c["mode"] == "channel"
            what = f"channel {mode}" if signed else {"mean": "mean |·|", "max": "max |·|", "pca": "PCA (RGB)"}[mode]
            h, w = summary.shape[:2]
            map_panel(fig, axes[1], summary, f"{name}: {level} {what} ({h}×{w})",
                      cmap="RdBu_r" if signed else "magma", colorbar=mode != "pca")
        if name == self.reference:
            note(axes[2], f"{name} is the reference:\npick another model to compare")
        elif level not in feats or level not in ref_feats:
            note(axes[2], f"{level} missing in {name if level not in feats else self.reference}")
        elif feats[level][0].numel() < 2:
            note(axes[2], f"{level} is 1×1: no spatial pattern to compare")
        elif feats[level].shape != ref_feats[level].shape:
            note(axes[2], f"{level}: {name} {tuple(feats[level].shape)} vs {self.reference} "
                          f"{tuple(ref_feats[level].shape)}:\nno channel-wise difference")
        else:
            d = standardised_difference(feats[level], ref_feats[level])
            map_panel(fig, axes[2], d, f"|z({name}) − z({self.reference})|: mean {float(d.mean()):.2f}",
                      cmap="viridis", vmin=0)
        for ax in axes:
            bare(ax)
        self.figure = fig
        png = base64.b64encode(png_bytes(fig, dpi=90)).decode("ascii")
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png, "text/plain": repr(fig)}},)
        return fig

    def _ipython_display_(self) -> None:
        """Show the controls and figure; the bundle also carries a PNG of the current figure, which is what
        a frontend without the live widget (a headless papermill run opened later) shows instead."""
        from IPython.display import display

        bundle = dict(self.widget._repr_mimebundle_())
        bundle["text/plain"] = f"FeatureExplorer(models={list(self.models)}, images={len(self.images)})"
        if self.figure is not None:
            bundle["image/png"] = base64.b64encode(png_bytes(self.figure, dpi=90)).decode("ascii")
        display(bundle, raw=True)
