"""Teacher selection: adaptation costs between detectors, computed from their features.

The paper (Cao et al., "Learning Lightweight Object Detectors via Progressive Knowledge Distillation")
distils a student from a *sequence* of teachers, weak to strong, and picks that sequence from an
estimate of how far each model is from the next one: the *adaptation cost*, the distillation error that
remains when only a light adapter maps one model's features onto another's. Its exact procedure is not in
the released code; this module implements

- `adaptation_cost(a, b, images)`: how well a 1x1 linear adapter maps a's FPN features onto b's on
  calibration images, as a normalised residual (0: b is a linear function of a; 1: a explains nothing).
  `cost(a -> b)` is how hard it is for student `a` to imitate teacher `b`; it is not symmetric.
- `cost_matrix(models, images)`: every ordered pair at once, one forward per model per batch, each cost with
  a 90% bootstrap interval (`feature_cost_matrix`: the same from features already computed).
- `run_selection`: model references in, cost matrix and teacher order (`pkdkit.ordering`) out, and files.

Intervals. The closed-form costs come from running moments of the features; these are kept per chunk of
images (`CHUNKS` = 16 chunks, image i in chunk i mod 16, so memory is 16 x one set of moments, flat in the
number of images). A bootstrap over chunks (`RESAMPLES` = 200 resamples with replacement, seeded) sums the
drawn chunks' moments and recomputes every cost in closed form: no feature is computed again, and on the tiny
preset (3 models, 64 images, CPU) it adds about 0.6 s to a cost matrix of about 9 s, the same however many
images. The resampled matrices are kept (`CostMatrix.resamples`) so that `pkdkit.ordering.select_teachers`
can report how often each order is chosen. The ``sgd`` method has no intervals: its adapters would have to be
trained again for every resample.

All models see the same transformed batch (the first model's transform makes it), as in distillation;
a model with another input size sees it rescaled to its own and its maps are resized back, so the cost
compares features of identical inputs on one grid.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pkdkit.errors import ConfigError
from pkdkit.features import backbone_features, common_levels, features_at, input_scale
from pkdkit.files import check_name
from pkdkit.models import eval_mode, load_model
from pkdkit.ordering import DEFAULT_STRATEGY, CostMatrix, Selection, plot_cost_matrix, save_selection, select_teachers

METHODS = ("closed_form", "sgd")


@dataclass
class CostResult:
    """Adaptation cost a -> b: `total` is the mean of `per_level` (one value per FPN level, in [0, 1])."""

    total: float
    per_level: dict[str, float]
    method: str
    n_images: int



# ----------------------------------------------------------------------------------------------------
# Calibration batches and features
def _image_batches(images: Sequence[torch.Tensor], batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Lists of at most `batch_size` consecutive images from a sequence of (3, H, W) tensors."""
    for start in range(0, len(images), batch_size):
        batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        for k, img in enumerate(batch):
            if not isinstance(img, torch.Tensor) or img.dim() != 3:
                raise ValueError(f"calibration image {start + k}: expected a (3, H, W) tensor, found "
                                 f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
        yield batch


def _check_same_transform(models: "OrderedDict[str, nn.Module]") -> None:
    """Every model must normalise images alike, since all of them see one transformed batch (a model with
    another input size sees it rescaled, `pkdkit.features.features_at`)."""
    def key(m: nn.Module) -> dict[str, Any]:
        t = m.transform
        return {"image_mean": [float(v) for v in t.image_mean], "image_std": [float(v) for v in t.image_std],
                "fixed_size": getattr(t, "fixed_size", None)}

    names = list(models)
    ref = key(models[names[0]])
    for name in names[1:]:
        k = key(models[name])
        diff = {f: (ref[f], k[f]) for f in ref if ref[f] != k[f]}
        if diff:
            detail = "; ".join(f"{f}: {names[0]}={a} vs {name}={b}" for f, (a, b) in diff.items())
            raise ConfigError(f"models {names[0]!r} and {name!r} transform images differently ({detail}); "
                             "adaptation costs need every model to see the same transformed batch")


def _feature_batches(models: "OrderedDict[str, nn.Module]", images: Sequence[torch.Tensor], levels: Sequence[str] | None,
                     batch_size: int, device: torch.device) -> Iterator[tuple[int, dict[str, list[torch.Tensor]]]]:
    """Per calibration batch: (N, {level: [features of each model as (N*H*W, C_m) rows]}) for `levels`
    (default: the levels all models have, found on the first batch).

    The first model's transform makes the batch (N, 3, H, W); every backbone+FPN runs on that tensor, seen
    at the model's own input size, with its maps resized to the first model's (`features_at`).
    """
    first = next(iter(models.values()))
    for imgs in _image_batches(images, batch_size):
        with torch.no_grad():
            batch, _ = first.transform([img.to(device) for img in imgs])
            ref = backbone_features(first, batch.tensors)
            sizes = {k: tuple(f.shape[-2:]) for k, f in ref.items()}
            per_model = {name: ref if m is first else features_at(m, batch.tensors, input_scale(m, first), sizes)
                         for name, m in models.items()}
        levels = common_levels({n: {k: f.shape[1] for k, f in feats.items()} for n, feats in per_model.items()},
                                levels)
        out: dict[str, list[torch.Tensor]] = {}
        for lvl in levels:
            maps = [per_model[name][lvl] for name in models]
            shapes = {name: tuple(f.shape[-2:]) for name, f in zip(models, maps)}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"level {lvl} has different sizes per model on a {tuple(batch.tensors.shape)} "
                                 f"batch: {shapes}")
            out[lvl] = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in maps]
        yield len(imgs), out


CHUNKS = 16  # image chunks the moments are kept in (the bootstrap's resampling unit)
RESAMPLES = 200  # bootstrap resamples of the chunks
CONFIDENCE = 0.9  # central interval of each cost over the resamples


class _Moments:
    """Running sums of one level's features of all models side by side, Z = [X_1 | X_2 | ...] (P, sum C),
    in float64, kept per chunk of images (image i goes to chunk i mod `chunks`): n (K,), sum Z (K, sum C) and
    Z^T Z (K, sum C, sum C). Memory is K (sum C)^2 however many images are seen; the whole set's moments are
    the sum over chunks, and a bootstrap resample of chunks is a weighted sum (`weighted`)."""

    def __init__(self, channels: list[int], chunks: int, device: torch.device):
        self.offsets = np.cumsum([0, *channels]).tolist()
        total = self.offsets[-1]
        self.n = torch.zeros(chunks, dtype=torch.float64, device=device)
        self.sum = torch.zeros(chunks, total, dtype=torch.float64, device=device)
        self.gram = torch.zeros(chunks, total, total, dtype=torch.float64, device=device)

    def add(self, feats: list[torch.Tensor], first_image: int, n_images: int) -> None:
        """Add one batch: `feats[m]` model m's (n_images * H * W, C_m) rows, image by image, the batch's first
        image being image `first_image` of the calibration set."""
        z = torch.cat(feats, dim=1).double().reshape(n_images, -1, self.offsets[-1])
        chunk_of = [(first_image + k) % self.n.shape[0] for k in range(n_images)]
        for c in sorted(set(chunk_of)):
            zc = z[[k for k, ck in enumerate(chunk_of) if ck == c]].reshape(-1, z.shape[-1])
            self.n[c] += zc.shape[0]
            self.sum[c] += zc.sum(0)
            self.gram[c] += zc.T @ zc

    @property
    def total_n(self) -> int:
        return int(self.n.sum().item())

    def block(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    def weighted(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n (B,), covariance (B, D, D)) of the feature sets made of each chunk taken weights[b, k] times."""
        w = weights.to(self.gram)
        n = w @ self.n
        mean = (w @ self.sum) / n[:, None]
        cov = (w / n[:, None]) @ self.gram.flatten(1)
        return n, torch.baddbmm(cov.view(len(w), *self.gram.shape[1:]), mean[:, :, None], mean[:, None, :], alpha=-1)

    def covariance(self) -> torch.Tensor:
        """(D, D) covariance of all features seen."""
        return self.weighted(torch.ones(1, self.n.shape[0]))[1][0]


def _closed_form_costs(cov: torch.Tensor, xs: slice, targets: list[slice], ridge: float) -> torch.Tensor:
    """In-sample normalised residual of the best affine map x -> y, min_W,c E||y - W^T x - c||^2 / tr(Cov y),
    for every target block y in `targets` and each covariance of the batch `cov` (B, D, D): (B, len(targets)).

    W = (Cxx + lam I)^-1 Cxy with lam = ridge * tr(Cxx) / C_x (scale-free); the bias is implied by
    centring. The residual is that of this W, so the ridge can only make the cost larger, never negative.
    A constant target (tr Cov y = 0) costs 0 (a bias reproduces it); a constant source explains nothing (1).
    """
    cols = torch.cat([torch.arange(t.start, t.stop) for t in targets]).to(cov.device)
    owner = torch.cat([torch.full((t.stop - t.start,), k) for k, t in enumerate(targets)]).to(cov.device)
    cxx, cxy = cov[:, xs, xs], cov[:, xs][:, :, cols]
    eye = torch.eye(cxx.shape[-1], dtype=cov.dtype, device=cov.device)
    lam = ridge * cxx.diagonal(dim1=-2, dim2=-1).sum(-1) / cxx.shape[-1]
    a = torch.where((lam > 0)[:, None, None], cxx + lam[:, None, None] * eye, eye)  # a constant source: no solve
    w = torch.linalg.solve(a, cxy)
    per_col = torch.stack([cov.diagonal(dim1=-2, dim2=-1)[:, cols], (w * cxy).sum(1),
                           (w * (cxx @ w)).sum(1)])  # (3, B, Dy): var y, <W, Cxy>, <W, Cxx W>
    sums = torch.zeros(3, cov.shape[0], len(targets), dtype=cov.dtype, device=cov.device).index_add_(2, owner, per_col)
    total, resid = sums[0], sums[0] - 2 * sums[1] + sums[2]
    cost = torch.where(lam[:, None] > 0, (resid / total.clamp_min(1e-300)).clamp_min(0.0), torch.ones_like(total))
    return torch.where(total > 0, cost, torch.zeros_like(total))


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, run the block with one intra-op thread: adapter steps are tiny matmuls, and on a 2-core
    machine two threads made them about 8x slower (synchronisation costs more than it saves)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sgd_costs(feats: list[list[torch.Tensor]], mom: "_Moments", source: int, targets: list[int], steps: int,
               lr: float) -> dict[int, float]:
    """In-sample normalised residual, {target: cost}, of 1x1 adapters (per-pixel linear maps with bias)
    from model `source`'s features to each target's, trained from zero with Adam on the MSE for `steps`
    steps, one calibration batch per step (cycling). `feats[m]`: model m's (P_k, C_m) rows per batch.

    Inputs are standardised per channel, targets centred and divided by one scalar (their RMS deviation):
    the adapter's function class is unchanged, but the step budget then means the same for every pair
    whatever the feature scales. The adapters to all targets are one Linear trained on the sum of their
    losses; Adam works per weight and each weight only sees its own target's loss, so this is exactly
    training them one by one.
    """
    cov, mean = mom.covariance(), mom.sum.sum(0) / mom.total_n
    var = cov.diagonal().clamp_min(0)
    xsl = mom.block(source)
    mx, sx = mean[xsl].float(), var[xsl].sqrt().float().clamp_min(1e-12)
    out = {j: 0.0 for j in targets if var[mom.block(j)].sum() <= 0}  # constant targets: a bias is enough
    targets = [j for j in targets if j not in out]
    if not targets:
        return out
    blocks = [mom.block(j) for j in targets]
    shift = torch.cat([mean[b] for b in blocks]).float()
    scale = torch.cat([torch.full_like(var[b], var[b].mean().sqrt().item()) for b in blocks]).float()
    weight = torch.cat([torch.full_like(var[b], 1.0 / len(var[b])) for b in blocks]).float()  # MSE per target
    batches = [((x - mx) / sx, (torch.cat([feats[j][k] for j in targets], dim=1) - shift) / scale)
               for k, x in enumerate(feats[source])]
    adapter = nn.Linear(len(mx), len(shift)).to(mx.device)
    nn.init.zeros_(adapter.weight)
    nn.init.zeros_(adapter.bias)
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    with torch.enable_grad(), _one_cpu_thread(mx.device):
        for step in range(steps):
            x, y = batches[step % len(batches)]
            loss = (((adapter(x) - y) ** 2) * weight).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        sq = sum(((adapter(x) - y) ** 2).double().sum(0) for x, y in batches)
    start = 0
    for j, b in zip(targets, blocks):  # standardised targets have total variance C_j per pixel
        c = b.stop - b.start
        out[j] = sq[start:start + c].sum().item() / (mom.total_n * c)
        start += c
    return out


@dataclass
class _Costs:
    """What `_pairwise_costs` computes: {(i, j): {level: cost(i -> j)}} for the requested ordered pairs, the
    levels used, the number of calibration images, the non-empty image chunks and, with a bootstrap,
    {(i, j): (B,) level-averaged costs over B resamples of those chunks}."""

    per_level: dict[tuple[int, int], dict[str, float]]
    levels: list[str]
    n_images: int
    chunks: int
    resamples: dict[tuple[int, int], np.ndarray]


def _pairwise_costs(models: "OrderedDict[str, nn.Module]", images: Sequence[torch.Tensor], *, levels: Sequence[str] | None,
                    method: str, ridge: float, batch_size: int, device: str | torch.device, sgd_steps: int,
                    lr: float, pairs: list[tuple[int, int]] | None = None, chunks: int = CHUNKS,
                    resamples: int = 0, seed: int = 0) -> _Costs:
    """Costs of the requested ordered pairs (all i != j by default). One backbone forward per model per batch.

    In-sample residuals of a fit with C_a + 1 parameters per output channel are optimistic when a level
    has few pixels, so every cost gets the degrees-of-freedom correction of the adjusted R^2,
    (n - 1) / (n - C_a - 1) for n pixel samples, and levels with n < 2 (C_a + 1) are not used.

    With `resamples` > 0 (closed form only), the non-empty image chunks are resampled with replacement
    (`seed`), the same resample for every level and pair, and every cost is recomputed from the resample's
    summed moments: a small linear solve per source model, level and resample.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown adaptation-cost method {method!r}; expected one of {METHODS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    device = torch.device(device)
    for m in models.values():
        m.to(device)
    with eval_mode(*models.values()):
        _check_same_transform(models)
        return _costs_of_features(_feature_batches(models, images, levels, batch_size, device), len(models),
                                  explicit=levels is not None, method=method, ridge=ridge, sgd_steps=sgd_steps,
                                  lr=lr, pairs=pairs, chunks=chunks, resamples=resamples, seed=seed)


def _costs_of_features(batches: Iterable[tuple[int, dict[str, list[torch.Tensor]]]], n_models: int, *,
                       explicit: bool, method: str, ridge: float, sgd_steps: int, lr: float,
                       pairs: list[tuple[int, int]] | None, chunks: int, resamples: int, seed: int) -> _Costs:
    """`_pairwise_costs` from the feature batches (`_feature_batches`' form) of `n_models` models."""
    pairs = pairs if pairs is not None else [(i, j) for i in range(n_models) for j in range(n_models) if i != j]
    moments: dict[str, _Moments] = {}
    cache: dict[str, list[list[torch.Tensor]]] = {}
    n_images = 0
    for n_batch, feats in batches:
        for lvl, per_model in feats.items():
            if lvl not in moments:
                moments[lvl] = _Moments([f.shape[1] for f in per_model], chunks, per_model[0].device)
            moments[lvl].add(per_model, n_images, n_batch)
            if method == "sgd":  # the trained adapters need the features themselves
                for k, f in enumerate(per_model):
                    cache.setdefault(lvl, [[] for _ in range(n_models)])[k].append(f.float())
        n_images += n_batch
    if not n_images:
        raise ConfigError("no calibration images: the image set is empty")
    sources = sorted({i for i, _ in pairs})
    used = _levels_with_enough_samples(moments, sources, n_images, explicit=explicit)
    filled = min(chunks, n_images)  # chunks 0 .. filled-1 hold images
    weights = torch.ones(1, chunks, dtype=torch.float64)  # row 0: the whole set; then one row per resample
    if method == "closed_form" and resamples > 0 and filled > 1:
        drawn = np.random.default_rng(seed).multinomial(filled, np.full(filled, 1.0 / filled), size=resamples)
        weights = torch.cat([weights, torch.zeros(resamples, chunks, dtype=torch.float64)])
        weights[1:, :filled] = torch.from_numpy(drawn).double()
    costs: dict[tuple[int, int], dict[str, float]] = {p: {} for p in pairs}
    boot = {p: np.zeros(len(weights) - 1) for p in pairs}
    targets = {i: [j for a, j in pairs if a == i] for i in sources}
    for lvl in used:
        mom = moments[lvl]
        if method == "closed_form":
            raw = _resampled_closed_form(mom, weights, targets, ridge)  # {i: ((1 + B, targets), (1 + B,))}
        else:
            sgd = {i: _sgd_costs(cache[lvl], mom, i, js, sgd_steps, lr) for i, js in targets.items()}
            raw = {i: (np.array([[sgd[i][j] for j in js]]), np.array([mom.total_n])) for i, js in targets.items()}
        for i, (values, n_pixels) in raw.items():
            c_in = mom.block(i).stop - mom.block(i).start
            dof = (n_pixels - 1) / np.maximum(n_pixels - c_in - 1, 1e-12)  # resamples hold ~n pixels too
            for k, j in enumerate(targets[i]):
                corrected = np.minimum(values[:, k] * dof, 1.0)
                costs[(i, j)][lvl] = float(corrected[0])
                boot[(i, j)] += corrected[1:] / len(used)
    return _Costs(per_level=costs, levels=used, n_images=n_images, chunks=filled,
                  resamples=boot if len(weights) > 1 else {})


def _resampled_closed_form(mom: _Moments, weights: torch.Tensor, targets: dict[int, list[int]], ridge: float,
                           memory: int = 2 ** 28) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Closed-form costs source -> each of its targets ({source: [target, ...]}) for every weighting of the
    chunks (`weights` (B, K)): {source: ((B, len(targets)) costs before the degrees-of-freedom correction,
    (B,) pixel samples)}. The covariances are made `memory` bytes' worth of weightings at a time, once for
    all sources."""
    d = mom.gram.shape[-1]
    step = max(1, memory // (8 * d * d))
    parts: dict[int, list[np.ndarray]] = {i: [] for i in targets}
    counts = []
    for start in range(0, len(weights), step):
        n, cov = mom.weighted(weights[start:start + step])
        counts.append(n.cpu().numpy())
        for i, js in targets.items():
            parts[i].append(_closed_form_costs(cov, mom.block(i), [mom.block(j) for j in js], ridge).cpu().numpy())
    n_pixels = np.concatenate(counts)
    return {i: (np.concatenate(p), n_pixels) for i, p in parts.items()}


def _levels_with_enough_samples(moments: dict[str, _Moments], sources: list[int], n_images: int,
                                explicit: bool) -> list[str]:
    """Levels with at least 2 (C + 1) pixel samples for every source model's C channels."""
    need = {lvl: 2 * (max(m.block(i).stop - m.block(i).start for i in sources) + 1) for lvl, m in moments.items()}
    short = [lvl for lvl, m in moments.items() if m.total_n < need[lvl]]
    used = [lvl for lvl in moments if lvl not in short]
    if short:
        detail = ", ".join(f"{lvl}: {moments[lvl].total_n} < {need[lvl]}" for lvl in short)
        msg = (f"too few pixel samples on {n_images} calibration images to fit a 1x1 adapter at levels "
               f"{short} ({detail}); use more or larger images")
        if explicit or not used:
            raise ConfigError(msg)
        warnings.warn(msg + f"; using levels {used}", stacklevel=4)
    return used


# ----------------------------------------------------------------------------------------------------
# Adaptation cost and cost matrix
def adaptation_cost(a: nn.Module, b: nn.Module, images: Sequence[torch.Tensor], *, levels: Sequence[str] | None = None,
                    method: str = "closed_form", ridge: float = 1e-5, batch_size: int = 8,
                    device: str | torch.device = "cpu", sgd_steps: int = 200, lr: float = 1e-2) -> CostResult:
    """How hard it is for detector `a` (student) to imitate detector `b` (teacher) through a 1x1 adapter.

    Both run in eval mode without gradients on the same calibration batches: `a.transform` makes the
    batch `(N, 3, H, W)` and both backbones+FPNs run on it, so the two models must normalise and resize
    alike (else ValueError). `images`: a sequence of (3, H, W) tensors in [0, 1] (a list, or a dataset whose
    items are images). The models are moved to `device` and put back in their train/eval mode afterwards.

    Per FPN level (default: every level both have), with x (C_a,) and y (C_b,) the features of one pixel,
    the cost is the residual of the best affine map, relative to the total variance of b's features:

        cost_l = min_{W, c} E ||y - W x - c||^2 / E ||y - E y||^2      (= 1 - R^2 of a linear probe)

    averaged over levels. The residual is measured on the calibration pixels the adapter was fitted on,
    which flatters levels with few pixels, so it gets the degrees-of-freedom correction of the adjusted
    R^2, (n - 1) / (n - C_a - 1) for n pixel samples; levels with n < 2 (C_a + 1) are left out with a
    warning (an error when `levels` names them): on 64 images of 96 px, P7 (1x1 per image) is.

    The cost is 0 when b's features are an invertible channel mixing of a's (b can be matched exactly)
    and 1 when a's features explain nothing of b's. It does not change when b's features are scaled or
    rotated (orthogonal mixing), nor when a's are mixed by any invertible 1x1 map. A general
    (non-orthogonal) mixing of a different b changes which channels dominate the squared error, and so
    the cost, exactly as it would change an MSE distillation loss on b's raw features.

    method:
    - ``"closed_form"``: the exact optimum of that linear probe (least squares with a ridge of
      `ridge * tr(Cov x) / C_a`, scale-free). Sufficient statistics (n, sum z, z^T z of the stacked
      features) are accumulated in float64 over batches, so memory stays flat however many images are
      used. Deterministic and fast: the default.
    - ``"sgd"``: the paper-style variant: a 1x1 adapter trained from zero with Adam (`lr`) on the MSE for
      `sgd_steps` steps, one calibration batch per step, and the same normalised residual of what it
      reached. This is what a distillation adapter actually achieves in a budget, closer to the paper's
      notion; it depends on steps and learning rate, is never below the closed form (up to the tiny
      ridge) and keeps the calibration features in memory, so use it with few images.
    """
    costs = _pairwise_costs(
        OrderedDict([("a", a), ("b", b)]), images, levels=levels, method=method, ridge=ridge,
        batch_size=batch_size, device=device, sgd_steps=sgd_steps, lr=lr, pairs=[(0, 1)])
    per_level = {lvl: costs.per_level[(0, 1)][lvl] for lvl in costs.levels}
    return CostResult(total=float(np.mean(list(per_level.values()))), per_level=per_level, method=method,
                      n_images=costs.n_images)


def cost_matrix(models: dict[str, nn.Module], images: Sequence[torch.Tensor], *, method: str = "closed_form",
                levels: Sequence[str] | None = None, ridge: float = 1e-5, batch_size: int = 8,
                device: str | torch.device = "cpu", sgd_steps: int = 200, lr: float = 1e-2, chunks: int = CHUNKS,
                resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> CostMatrix:
    """Adaptation cost of every ordered pair of `models` ({name: detector}), see `adaptation_cost`, each with
    a bootstrap interval.

    Each model's features are computed once per calibration batch and the statistics of all pairs are
    accumulated together: the cost is one backbone forward per model per batch, not per pair. Levels:
    those common to all models (ValueError when there are none). `matrix[i][j]` = cost(i -> j).

    Intervals (closed form only): the moments are kept per chunk of images (image i in chunk i mod `chunks`,
    so memory is `chunks` times one set of moments, flat in the number of images), and the whole matrix is
    recomputed on `resamples` bootstrap resamples of the non-empty chunks (with replacement, `seed`), each
    resampled cost shifted by its pair's median offset from the full-set cost (repeated images flatter an
    in-sample fit: without the shift the resamples sit below the cost they should spread around): the
    central `confidence` interval of each cost over them is `low`/`high`, the resampled matrices are
    `resamples` (`pkdkit.ordering.select_teachers` turns them into the order's support). The recomputation
    is one small linear solve per source model, level and resample, from the chunks' summed moments: no
    feature is computed again. `resamples=0`, `chunks=1`, fewer than 2 images, or the ``sgd`` method (whose
    adapters would have to be trained again per resample): no intervals.
    """
    if len(models) < 2:
        raise ValueError(f"a cost matrix needs at least two models, got {list(models)}")
    _check_confidence(confidence)
    named = OrderedDict((str(k), m) for k, m in models.items())
    costs = _pairwise_costs(named, images, levels=levels, method=method, ridge=ridge, batch_size=batch_size,
                            device=device, sgd_steps=sgd_steps, lr=lr, chunks=chunks, resamples=resamples, seed=seed)
    return _cost_matrix_of(list(named), costs, method, confidence)


def feature_cost_matrix(names: Sequence[str], batches: Iterable[tuple[int, dict[str, list[torch.Tensor]]]], *,
                        levels_given: bool = False, ridge: float = 1e-5, chunks: int = CHUNKS,
                        resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> CostMatrix:
    """`cost_matrix` (closed form) from features already computed: `batches` yields, per batch of N images,
    (N, {level: [model m's features as (N * H * W, C_m) rows, image by image, for each of `names`]}). For
    features that do not come from detectors, e.g. constructed ones whose costs are known. `levels_given`:
    a level with too few pixel samples is an error rather than left out with a warning."""
    _check_confidence(confidence)
    costs = _costs_of_features(batches, len(names), explicit=levels_given, method="closed_form", ridge=ridge,
                               sgd_steps=0, lr=0.0, pairs=None, chunks=chunks, resamples=resamples, seed=seed)
    return _cost_matrix_of(list(names), costs, "closed_form", confidence)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _cost_matrix_of(names: list[str], costs: _Costs, method: str, confidence: float) -> CostMatrix:
    """The CostMatrix of `_pairwise_costs`' result: level means, and the bootstrap's intervals and resamples."""
    n, used = len(names), costs.levels
    per_level = {lvl: [[costs.per_level[(i, j)][lvl] if i != j else 0.0 for j in range(n)] for i in range(n)]
                 for lvl in used}
    matrix = [[float(np.mean([per_level[lvl][i][j] for lvl in used])) for j in range(n)] for i in range(n)]
    out = CostMatrix(names=names, matrix=matrix, levels=list(used), method=method, n_images=costs.n_images,
                     per_level=per_level, confidence=confidence, chunks=costs.chunks)
    if costs.resamples:
        # Resampling with replacement repeats images, which flatters an in-sample fit: every resampled cost
        # is shifted by its pair's median offset from the full-set cost, so that the resamples spread around it
        boot = np.zeros((len(next(iter(costs.resamples.values()))), n, n))
        for (i, j), values in costs.resamples.items():
            boot[:, i, j] = values + (matrix[i][j] - np.median(values))
        tail = 100 * (1 - confidence) / 2
        out.low = np.percentile(boot, tail, axis=0).tolist()
        out.high = np.percentile(boot, 100 - tail, axis=0).tolist()
        out.resamples = boot.tolist()
    return out


def selection_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(selection, figure): what `run_selection` writes into `out_dir`, `selection.json` and `selection.png`."""
    return Path(out_dir) / "selection.json", Path(out_dir) / "selection.png"


def check_teacher_names(names: list[str]) -> None:
    """Teacher names are unique, not "student" (the student's name in the cost matrix) and each one path
    component (a teacher's name becomes a stage folder's name in a plan); else ConfigError."""
    for name in names:
        check_name(name, "teacher name")
        if name == "student":
            raise ConfigError(f"a teacher may not be named 'student', the name of the student in the cost matrix "
                              f"(teachers: {names}); give it another name: NAME=CHECKPOINT")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"teacher names must be unique; {repeated} given more than once (teachers: {names})")


def run_selection(student_ckpt: str | os.PathLike, teacher_ckpts: dict[str, str | os.PathLike], dataset: Any,
                  out_dir: str | os.PathLike, *, n_images: int | None = None, strategy: str = DEFAULT_STRATEGY,
                  method: str = "closed_form", device: str = "cpu", aps: dict[str, float] | None = None,
                  final: str | None = None, objective: str = "sum", batch_size: int = 8,
                  sizes: dict[str, tuple[int, int]] | None = None, near_ties: str = "direct",
                  resamples: int = RESAMPLES) -> tuple[Selection, CostMatrix]:
    """Model references in, (selection, cost matrix) and files out: load the student and teachers (pkdkit
    checkpoints or torchvision weight names, `pkdkit.models.load_model`), compute the cost matrix with its
    bootstrap intervals (`cost_matrix`) on the first `n_images` images of `dataset` (None: all of them), order
    the teachers (`pkdkit.ordering.select_teachers`, with its near-tie rule and order support) and write
    `out_dir/selection.json` and `out_dir/selection.png`. The student is called "student" in the matrix.
    `sizes`: {name: (min_size, max_size)} input sizes that override a model's own."""
    check_teacher_names(list(teacher_ckpts))
    if n_images is not None and n_images < 1:
        raise ConfigError(f"n_images must be >= 1 (or None: all images), got {n_images}")
    sizes = sizes or {}
    models = OrderedDict(student=load_model(student_ckpt, size=sizes.get("student"))[0])
    for name, ckpt in teacher_ckpts.items():
        models[name] = load_model(ckpt, size=sizes.get(name))[0]
    images = [dataset[i][0] for i in range(len(dataset) if n_images is None else min(n_images, len(dataset)))]
    matrix = cost_matrix(models, images, method=method, batch_size=batch_size, device=device, resamples=resamples)
    selection = select_teachers(matrix, "student", list(teacher_ckpts), strategy=strategy, aps=aps, final=final,
                                objective=objective if strategy == "shortest_path" else "sum", near_ties=near_ties)
    config = {"student": str(student_ckpt), "teachers": {k: str(v) for k, v in teacher_ckpts.items()},
              "n_images": matrix.n_images, "strategy": strategy, "method": method, "device": str(device),
              "aps": aps, "final": final, "objective": objective, "batch_size": batch_size, "near_ties": near_ties,
              "resamples": resamples}
    json_file, figure_file = selection_files(out_dir)
    save_selection(selection, matrix, json_file, config)
    plot_cost_matrix(matrix, selection).savefig(figure_file, dpi=120)
    return selection, matrix
