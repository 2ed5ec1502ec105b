"""Teacher selection: adaptation costs between detectors and the order of teachers they suggest.

The paper (Cao et al., "Learning Lightweight Object Detectors via Progressive Knowledge Distillation")
distils a student from a *sequence* of teachers, weak to strong, and picks that sequence from an
estimate of how far each model is from the next one: the *adaptation cost*, the distillation error that
remains when only a light adapter maps one model's features onto another's. Its exact procedure is not in
the released code; this module implements

- `adaptation_cost(a, b, images)`: how well a 1x1 linear adapter maps a's FPN features onto b's on
  calibration images, as a normalised residual (0: b is a linear function of a; 1: a explains nothing).
  `cost(a -> b)` is how hard it is for student `a` to imitate teacher `b`; it is not symmetric.
- `cost_matrix(models, images)`: every ordered pair at once, one forward per model per batch.
- orders over a `CostMatrix`: `order_minimax` (the default: the path of smallest steps, which can be
  progressive), `order_greedy` (the paper's spirit), `order_shortest_path` (sum or bottleneck objective),
  `order_by_ap` (baseline), dispatched by `select_teachers` through `STRATEGIES`.
- `save_selection` / `load_selection` (selection.json), `plot_cost_matrix` (heatmap with the chosen path),
  `selection_to_stages` (stage dicts for a distillation plan) and `run_selection` (checkpoints in, files out).

All models see the same transformed batch (the first model's transform makes it), as in distillation;
a model with another input size sees it rescaled to its own and its maps are resized back, so the cost
compares features of identical inputs on one grid.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle
from torch import nn

from pkdkit.features import backbone_features, common_levels, features_at, input_scale
from pkdkit.files import write_json
from pkdkit.models import load_model

METHODS = ("closed_form", "sgd")
OBJECTIVES = ("sum", "max")


@dataclass
class CostResult:
    """Adaptation cost a -> b: `total` is the mean of `per_level` (one value per FPN level, in [0, 1])."""

    total: float
    per_level: dict[str, float]
    method: str
    n_images: int


@dataclass
class CostMatrix:
    """Adaptation costs between named models: `matrix[i][j]` = cost(names[i] -> names[j]) (row: from,
    column: to), averaged over `levels`; `per_level[level][i][j]` the same for one level. Diagonal 0."""

    names: list[str]
    matrix: list[list[float]]
    levels: list[str]
    method: str = "closed_form"
    n_images: int = 0
    per_level: dict[str, list[list[float]]] = field(default_factory=dict)

    def cost(self, a: str, b: str) -> float:
        """cost(a -> b): how hard it is for `a` to imitate `b`."""
        return self.matrix[self.index(a)][self.index(b)]

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"model {name!r} is not in the cost matrix; it holds {self.names}")
        return self.names.index(name)

    def as_array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostMatrix":
        return cls(**d)


@dataclass
class Selection:
    """A teacher order: `order` lists teacher names, first distilled first; `costs[k]` is the adaptation
    cost of step k (student -> order[0], order[0] -> order[1], ...); `total` their sum, `max_step` the
    largest; `explanation` says in words why this order was chosen."""

    strategy: str
    student: str
    order: list[str]
    costs: list[float]
    total: float
    max_step: float
    explanation: str

    @property
    def path(self) -> list[str]:
        """[student, *order]."""
        return [self.student, *self.order]


# ----------------------------------------------------------------------------------------------------
# Calibration batches and features
def _image_batches(images: Any, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Lists of (3, H, W) images from: a dataset of (image, target) items (e.g. `CocoDetection`), a list
    of (3, H, W) tensors, a (N, 3, H, W) tensor, or an iterable of batches (lists of images, (N, 3, H, W)
    tensors, or (images, targets) pairs as `collate_fn` makes them)."""

    def as_images(batch: Any) -> list[torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            return list(batch) if batch.dim() == 4 else [batch]
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (tuple, list)) \
                and all(isinstance(t, dict) for t in batch[1]):
            batch = batch[0]  # (images, targets) from a detection DataLoader
        return list(batch)

    def chunks(items: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        chunk: list[torch.Tensor] = []
        for img in items:
            chunk.append(img)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    if isinstance(images, torch.Tensor):
        yield from chunks(as_images(images))
    elif isinstance(images, torch.utils.data.Dataset) and hasattr(images, "__len__"):
        items = (images[i] for i in range(len(images)))  # a map-style dataset: take the images
        yield from chunks(x[0] if isinstance(x, (tuple, list)) else x for x in items)
    elif isinstance(images, (list, tuple)) and all(isinstance(x, torch.Tensor) and x.dim() == 3 for x in images):
        yield from chunks(images)
    else:
        for batch in images:
            imgs = as_images(batch)
            if imgs:
                yield imgs


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
            raise ValueError(f"models {names[0]!r} and {name!r} transform images differently ({detail}); "
                             "adaptation costs need every model to see the same transformed batch")


def _feature_batches(models: "OrderedDict[str, nn.Module]", images: Any, levels: Sequence[str] | None,
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


class _Moments:
    """Running sums of one level's features of all models side by side, Z = [X_1 | X_2 | ...] (P, sum C),
    in float64: n, sum Z and Z^T Z. Memory is (sum C)^2 however many images are seen."""

    def __init__(self, channels: list[int], device: torch.device):
        self.offsets = np.cumsum([0, *channels]).tolist()
        total = self.offsets[-1]
        self.n = 0
        self.sum = torch.zeros(total, dtype=torch.float64, device=device)
        self.gram = torch.zeros(total, total, dtype=torch.float64, device=device)

    def add(self, feats: list[torch.Tensor]) -> None:
        z = torch.cat(feats, dim=1).double()
        self.n += z.shape[0]
        self.sum += z.sum(0)
        self.gram += z.T @ z

    def block(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    def covariance(self) -> torch.Tensor:
        mean = self.sum / self.n
        return self.gram / self.n - torch.outer(mean, mean)


def _closed_form_cost(cov: torch.Tensor, xs: slice, ys: slice, ridge: float) -> float:
    """In-sample normalised residual of the best affine map x -> y: min_W,c E||y - W^T x - c||^2 / tr(Cov y).

    W = (Cxx + lam I)^-1 Cxy with lam = ridge * tr(Cxx) / C_x (scale-free); the bias is implied by
    centring. The residual is that of this W, so the ridge can only make the cost larger, never negative.
    """
    cxx, cxy, cyy = cov[xs, xs], cov[xs, ys], cov[ys, ys]
    total = torch.trace(cyy).item()
    if total <= 0.0:  # b is constant on the calibration set: a bias alone reproduces it
        return 0.0
    lam = ridge * torch.trace(cxx).item() / cxx.shape[0]
    if lam <= 0.0:  # a is constant: it explains nothing
        return 1.0
    w = torch.linalg.solve(cxx + lam * torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device), cxy)
    resid = total - 2 * torch.sum(w * cxy).item() + torch.sum(w * (cxx @ w)).item()
    return max(resid / total, 0.0)


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
    cov, mean = mom.covariance(), mom.sum / mom.n
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
        out[j] = sq[start:start + c].sum().item() / (mom.n * c)
        start += c
    return out


def _pairwise_costs(models: "OrderedDict[str, nn.Module]", images: Any, *, levels: Sequence[str] | None,
                    method: str, ridge: float, batch_size: int, device: str | torch.device, sgd_steps: int,
                    lr: float, pairs: list[tuple[int, int]] | None = None
                    ) -> tuple[dict[tuple[int, int], dict[str, float]], list[str], int]:
    """{(i, j): {level: cost(i -> j)}} for the requested ordered pairs (all i != j by default), the levels
    used and the number of calibration images. One backbone forward per model per batch.

    In-sample residuals of a fit with C_a + 1 parameters per output channel are optimistic when a level
    has few pixels, so every cost gets the degrees-of-freedom correction of the adjusted R^2,
    (n - 1) / (n - C_a - 1) for n pixel samples, and levels with n < 2 (C_a + 1) are not used.
    """
    if method not in METHODS:
        raise ValueError(f"unknown adaptation-cost method {method!r}; expected one of {METHODS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.to(device).eval()
    try:
        _check_same_transform(models)
        n = len(models)
        pairs = pairs if pairs is not None else [(i, j) for i in range(n) for j in range(n) if i != j]
        moments: dict[str, _Moments] = {}
        cache: dict[str, list[list[torch.Tensor]]] = {}
        n_images = 0
        for n_batch, feats in _feature_batches(models, images, levels, batch_size, device):
            n_images += n_batch
            for lvl, per_model in feats.items():
                if lvl not in moments:
                    moments[lvl] = _Moments([f.shape[1] for f in per_model], device)
                moments[lvl].add(per_model)
                if method == "sgd":  # the trained adapters need the features themselves
                    for k, f in enumerate(per_model):
                        cache.setdefault(lvl, [[] for _ in models])[k].append(f.float())
        if not n_images:
            raise ValueError("no calibration images: the image set is empty")
        sources = sorted({i for i, _ in pairs})
        used = _levels_with_enough_samples(moments, sources, n_images, explicit=levels is not None)
        costs: dict[tuple[int, int], dict[str, float]] = {p: {} for p in pairs}
        for lvl in used:
            mom = moments[lvl]
            cov = mom.covariance()
            for i in sources:
                targets = [j for a, j in pairs if a == i]
                if method == "closed_form":
                    raw = {j: _closed_form_cost(cov, mom.block(i), mom.block(j), ridge) for j in targets}
                else:
                    raw = _sgd_costs(cache[lvl], mom, i, targets, sgd_steps, lr)
                c_in = mom.block(i).stop - mom.block(i).start
                dof = (mom.n - 1) / (mom.n - c_in - 1)
                for j, c in raw.items():
                    costs[(i, j)][lvl] = min(c * dof, 1.0)
        return costs, used, n_images
    finally:
        for name, m in models.items():
            m.train(modes[name])


def _levels_with_enough_samples(moments: dict[str, _Moments], sources: list[int], n_images: int,
                                explicit: bool) -> list[str]:
    """Levels with at least 2 (C + 1) pixel samples for every source model's C channels."""
    need = {lvl: 2 * (max(m.block(i).stop - m.block(i).start for i in sources) + 1) for lvl, m in moments.items()}
    short = [lvl for lvl, m in moments.items() if m.n < need[lvl]]
    used = [lvl for lvl in moments if lvl not in short]
    if short:
        detail = ", ".join(f"{lvl}: {moments[lvl].n} < {need[lvl]}" for lvl in short)
        msg = (f"too few pixel samples on {n_images} calibration images to fit a 1x1 adapter at levels "
               f"{short} ({detail}); use more or larger images")
        if explicit or not used:
            raise ValueError(msg)
        warnings.warn(msg + f"; using levels {used}", stacklevel=4)
    return used


# ----------------------------------------------------------------------------------------------------
# Adaptation cost and cost matrix
def adaptation_cost(a: nn.Module, b: nn.Module, images: Any, *, levels: Sequence[str] | None = None,
                    method: str = "closed_form", ridge: float = 1e-5, batch_size: int = 8,
                    device: str | torch.device = "cpu", sgd_steps: int = 200, lr: float = 1e-2) -> CostResult:
    """How hard it is for detector `a` (student) to imitate detector `b` (teacher) through a 1x1 adapter.

    Both run in eval mode without gradients on the same calibration batches: `a.transform` makes the
    batch `(N, 3, H, W)` and both backbones+FPNs run on it, so the two models must normalise and resize
    alike (else ValueError). `images`: a dataset of (image, target) items such as `CocoDetection`, a list
    of (3, H, W) tensors in [0, 1], or an iterable of batches. The models are moved to `device` and put
    back in their train/eval mode afterwards.

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
    costs, used, n_images = _pairwise_costs(
        OrderedDict([("a", a), ("b", b)]), images, levels=levels, method=method, ridge=ridge,
        batch_size=batch_size, device=device, sgd_steps=sgd_steps, lr=lr, pairs=[(0, 1)])
    per_level = {lvl: costs[(0, 1)][lvl] for lvl in used}
    return CostResult(total=float(np.mean(list(per_level.values()))), per_level=per_level, method=method,
                      n_images=n_images)


def cost_matrix(models: dict[str, nn.Module], images: Any, *, method: str = "closed_form",
                levels: Sequence[str] | None = None, ridge: float = 1e-5, batch_size: int = 8,
                device: str | torch.device = "cpu", sgd_steps: int = 200, lr: float = 1e-2) -> CostMatrix:
    """Adaptation cost of every ordered pair of `models` ({name: detector}), see `adaptation_cost`.

    Each model's features are computed once per calibration batch and the statistics of all pairs are
    accumulated together: the cost is one backbone forward per model per batch, not per pair. Levels:
    those common to all models (ValueError when there are none). `matrix[i][j]` = cost(i -> j).
    """
    if len(models) < 2:
        raise ValueError(f"a cost matrix needs at least two models, got {list(models)}")
    named = OrderedDict((str(k), m) for k, m in models.items())
    costs, used, n_images = _pairwise_costs(named, images, levels=levels, method=method, ridge=ridge,
                                            batch_size=batch_size, device=device, sgd_steps=sgd_steps, lr=lr)
    n = len(named)
    per_level = {lvl: [[costs[(i, j)][lvl] if i != j else 0.0 for j in range(n)] for i in range(n)]
                 for lvl in used}
    matrix = [[float(np.mean([per_level[lvl][i][j] for lvl in used])) for j in range(n)] for i in range(n)]
    return CostMatrix(names=list(named), matrix=matrix, levels=list(used), method=method, n_images=n_images,
                      per_level=per_level)


# ----------------------------------------------------------------------------------------------------
# Orders
def _check_names(matrix: CostMatrix, student: str, teachers: Sequence[str],
                 aps: dict[str, float] | None, final: str | None) -> list[str]:
    teachers = list(teachers)
    if not teachers:
        raise ValueError(f"no candidate teachers to order for student {student!r}")
    for name in [student, *teachers]:
        matrix.index(name)
    if student in teachers:
        raise ValueError(f"the student {student!r} is also listed as a teacher: {teachers}")
    if len(set(teachers)) != len(teachers):
        raise ValueError(f"teachers are listed more than once: {teachers}")
    if final is not None and final not in teachers:
        raise ValueError(f"final teacher {final!r} is not among the candidates {teachers}")
    if aps is not None:
        missing = [t for t in teachers if t not in aps]
        if missing:
            raise ValueError(f"no AP given for teachers {missing} (APs given: {sorted(aps)})")
    return teachers


def _final_teacher(matrix: CostMatrix, student: str, teachers: list[str], aps: dict[str, float] | None,
                   final: str | None) -> tuple[str, str]:
    """(final teacher, why): `final` if given, else the highest AP, else the farthest from the student."""
    if final is not None:
        return final, f"{final} is the final teacher (given)"
    if aps is not None:
        best = max(teachers, key=lambda t: aps[t])
        return best, f"{best} is the final teacher (highest AP, {aps[best]:.3f})"
    far = max(teachers, key=lambda t: matrix.cost(student, t))
    return far, f"{far} is the final teacher (no APs given: the farthest from {student}, cost " \
                f"{matrix.cost(student, far):.4f})"


def _selection(strategy: str, matrix: CostMatrix, student: str, order: list[str], why: list[str]) -> Selection:
    path = [student, *order]
    costs = [matrix.cost(u, v) for u, v in zip(path, path[1:])]
    steps = " -> ".join(path)
    summary = f"{strategy}: {steps}; step costs {', '.join(f'{c:.4f}' for c in costs)}; " \
              f"total {sum(costs):.4f}, largest step {max(costs):.4f}"
    return Selection(strategy=strategy, student=student, order=order, costs=costs, total=float(sum(costs)),
                     max_step=float(max(costs)), explanation="\n".join([summary, *why]))


def order_greedy(matrix: CostMatrix, student: str, teachers: Sequence[str], *,
                 aps: dict[str, float] | None = None, final: str | None = None) -> Selection:
    """Greedy weak-to-strong order in the spirit of the paper (whose exact procedure is not released).

    1. The final teacher is `final`, else the teacher with the highest AP when `aps` are given, else the
       teacher farthest from the student (largest cost(student -> t)).
    2. Candidates farther from the student than the final teacher (cost(student -> t) >
       cost(student -> final)) are dropped: they would be a harder step than the goal itself.
    3. Starting at the student, repeatedly append the remaining candidate with the smallest adaptation
       cost from the *current* model (the last teacher appended), until the final teacher is appended.
       Candidates still left then are not used.

    The approximation: after a stage the distilled student is taken to look like its last teacher, so
    costs from that teacher's features stand in for costs from the (not yet trained) distilled student.
    Each step is locally the easiest; nothing guarantees the whole path is (see `order_shortest_path`).
    """
    teachers = _check_names(matrix, student, teachers, aps, final)
    final, why_final = _final_teacher(matrix, student, teachers, aps, final)
    reach = matrix.cost(student, final)
    dropped = [t for t in teachers if t != final and matrix.cost(student, t) > reach]
    remaining = [t for t in teachers if t not in dropped]
    why = [why_final]
    if dropped:
        why.append(f"dropped {', '.join(dropped)}: farther from {student} than {final} ({reach:.4f})")
    order: list[str] = []
    current = student
    while final not in order:
        options = sorted(remaining, key=lambda t: matrix.cost(current, t))
        pick = options[0]
        why.append(f"from {current}: {pick} is the closest ("
                   + ", ".join(f"{t} {matrix.cost(current, t):.4f}" for t in options) + ")")
        order.append(pick)
        remaining.remove(pick)
        current = pick
    if remaining:
        why.append(f"not used (the final teacher was reached first): {', '.join(remaining)}")
    return _selection("greedy", matrix, student, order, why)


def _best_walk(cost: np.ndarray, start: int, goal: int, max_edges: int, allowed: np.ndarray,
               key: Callable[[tuple[float, float], float], tuple[float, float]]) -> list[int] | None:
    """Best walk start -> goal with at most `max_edges` allowed edges under a monotone `key` (a DP over
    the number of edges, Bellman-Ford style). Among equally good walks the one with fewest edges wins,
    which has no repeated node since costs are >= 0; loops that rounding could leave are cut anyway."""
    n = cost.shape[0]
    layer: dict[int, tuple[tuple[float, float], list[int]]] = {start: ((0.0, 0.0), [start])}
    best: tuple[tuple[float, float], list[int]] | None = None
    for _ in range(max_edges):
        nxt: dict[int, tuple[tuple[float, float], list[int]]] = {}
        for u, (val, path) in layer.items():
            for v in range(n):
                if v == u or v == start or not allowed[u, v]:
                    continue
                cand = key(val, float(cost[u, v]))
                if v not in nxt or cand < nxt[v][0]:
                    nxt[v] = (cand, path + [v])
        if goal in nxt and (best is None or nxt[goal][0] < best[0]):
            best = nxt[goal]
        layer = nxt
    if best is None:
        return None
    path = best[1]
    out: list[int] = []
    for v in path:  # cut loops
        if v in out:
            out = out[: out.index(v)]
        out.append(v)
    return out


def order_shortest_path(matrix: CostMatrix, student: str, teachers: Sequence[str], *,
                        aps: dict[str, float] | None = None, final: str | None = None, objective: str = "sum",
                        max_teachers: int | None = None) -> Selection:
    """The teacher sequence from the student to the final teacher (chosen as in `order_greedy`) that
    minimises, over the directed graph student + candidates with edge weights cost(u -> v),

    - ``objective="sum"``: the total adaptation cost of all steps (ties: the smaller largest step), or
    - ``objective="max"``: the largest single step (minimax / bottleneck path; ties: the smaller total),

    using at most `max_teachers` teachers (the final one included; default: all candidates). Exact: a
    dynamic programme over the number of steps (costs are >= 0, so the best walk is a simple path).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    teachers = _check_names(matrix, student, teachers, aps, final)
    final, why_final = _final_teacher(matrix, student, teachers, aps, final)
    k = len(teachers) if max_teachers is None else max_teachers
    if k < 1:
        raise ValueError(f"max_teachers must be >= 1, got {max_teachers}")
    nodes = [student, *teachers]
    cost = np.array([[matrix.cost(u, v) for v in nodes] for u in nodes])
    allowed = np.ones_like(cost, dtype=bool)
    by_sum = lambda val, c: (val[0] + c, max(val[1], c))  # noqa: E731  (total, largest step)
    if objective == "max":
        walk = _best_walk(cost, 0, nodes.index(final), k, allowed, lambda val, c: (max(val[0], c), 0.0))
        bottleneck = max(cost[u, v] for u, v in zip(walk, walk[1:]))
        allowed = cost <= bottleneck  # then the smallest total among paths with that largest step
    walk = _best_walk(cost, 0, nodes.index(final), k, allowed, by_sum)
    order = [nodes[i] for i in walk[1:]]
    direct = matrix.cost(student, final)
    what = "total" if objective == "sum" else "largest step"
    why = [why_final,
           f"objective {objective!r}: minimising the {what} of the path over {len(teachers)} candidates "
           f"(at most {k} teachers); going straight to {final} costs {direct:.4f}"]
    return _selection("shortest_path", matrix, student, order, why)


def order_by_ap(matrix: CostMatrix, student: str, teachers: Sequence[str], *,
                aps: dict[str, float] | None = None, final: str | None = None) -> Selection:
    """Baseline: teachers by ascending AP (weak to strong). With `final`, teachers stronger than it are
    left out and it comes last. Costs along the order are reported from `matrix`."""
    if aps is None:
        raise ValueError("order_by_ap needs the teachers' APs (aps={name: AP})")
    teachers = _check_names(matrix, student, teachers, aps, final)
    order = sorted(teachers, key=lambda t: aps[t])
    why = ["teachers by ascending AP: " + ", ".join(f"{t} {aps[t]:.3f}" for t in order)]
    if final is not None:
        left = [t for t in order if aps[t] > aps[final]]
        order = [t for t in order if t != final and t not in left] + [final]
        why.append(f"{final} is the final teacher (given)" + (f"; left out: {', '.join(left)}" if left else ""))
    return _selection("by_ap", matrix, student, order, why)


MAX_MINIMAX_CANDIDATES = 8  # every simple path is scored: 109,601 paths at 8 intermediate candidates


def order_minimax(matrix: CostMatrix, student: str, teachers: Sequence[str], *,
                  aps: dict[str, float] | None = None, final: str | None = None) -> Selection:
    """The default order: the path from the student to the final teacher whose steps are smallest, compared
    largest step first (a lexicographic bottleneck path).

    The final (target) teacher is `final`, else the highest AP, else the farthest from the student, as in
    `order_greedy`; with APs, teachers stronger than the final one are left out. Every simple path
    student -> ... -> final is scored by its step costs sorted from largest to smallest and the smallest
    score wins (ties between a path and the same path with an extra step go to the shorter one). So:

    - an intermediate teacher is used when every step through it is cheaper than the direct step;
    - a teacher whose step into or out of it is dearer than the direct step is left out;
    - a chain student -> a -> b -> c of cheap steps is followed when the jumps over it are dearer.

    Summing costs instead (`order_shortest_path(objective="sum")`) almost always goes straight to the final
    teacher with linear-probe costs, since one step is rarely dearer than two; the largest step is what a
    progressive order should keep small (shared/PAPER.md). Exact: all paths are scored, so at most
    `MAX_MINIMAX_CANDIDATES` other teachers are allowed.
    """
    teachers = _check_names(matrix, student, teachers, aps, final)
    final, why_final = _final_teacher(matrix, student, teachers, aps, final)
    why = [why_final]
    stronger = [t for t in teachers if aps is not None and t != final and aps[t] > aps[final]]
    if stronger:
        why.append(f"left out, stronger than {final}: {', '.join(stronger)}")
    middle = [t for t in teachers if t != final and t not in stronger]
    if len(middle) > MAX_MINIMAX_CANDIDATES:
        raise ValueError(f"minimax scores every path and allows at most {MAX_MINIMAX_CANDIDATES} intermediate "
                         f"teachers, got {len(middle)}; use strategy='shortest_path' with objective='max'")

    def score(path: tuple[str, ...]) -> tuple[float, ...]:
        full = (student, *path)
        return tuple(sorted((matrix.cost(u, v) for u, v in zip(full, full[1:])), reverse=True))

    paths = (p + (final,) for k in range(len(middle) + 1) for p in itertools.permutations(middle, k))
    best = min(paths, key=lambda p: (score(p), len(p)))
    direct = matrix.cost(student, final)
    why.append(f"going straight to {final} costs {direct:.4f}; the chosen path's largest step is "
               f"{max(score(best)):.4f}")
    unused = [t for t in middle if t not in best]
    if unused:
        why.append("not used (every path through them has a dearer step): " + ", ".join(
            f"{t} (in {matrix.cost(student, t):.4f} from {student})" for t in unused))
    return _selection("minimax", matrix, student, list(best), why)


STRATEGIES: dict[str, Callable[..., Selection]] = {
    "minimax": order_minimax,
    "greedy": order_greedy,
    "shortest_path": order_shortest_path,
    "by_ap": order_by_ap,
}
DEFAULT_STRATEGY = "minimax"


def select_teachers(matrix: CostMatrix, student: str, teachers: Sequence[str], strategy: str = DEFAULT_STRATEGY,
                    aps: dict[str, float] | None = None, final: str | None = None, objective: str = "sum",
                    max_teachers: int | None = None) -> Selection:
    """Order `teachers` for `student` with one of `STRATEGIES` ("minimax", "greedy", "shortest_path",
    "by_ap"). `objective` and `max_teachers` apply to "shortest_path" only."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown teacher-order strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    options: dict[str, Any] = {"aps": aps, "final": final}
    if strategy == "shortest_path":
        options.update(objective=objective, max_teachers=max_teachers)
    elif objective != "sum" or max_teachers is not None:
        raise ValueError(f"objective/max_teachers apply to the shortest_path strategy only, not {strategy!r}")
    return STRATEGIES[strategy](matrix, student, teachers, **options)


# ----------------------------------------------------------------------------------------------------
# Output
def save_selection(selection: Selection, matrix: CostMatrix, path: str | os.PathLike,
                   config: dict[str, Any] | None = None) -> Path:
    """Write selection.json (the selection, the cost matrix and the `config` that produced them)
    atomically: a temp file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(selection), "cost_matrix": matrix.to_dict(), "config": config or {}}
    return write_json(payload, path)


def load_selection(path: str | os.PathLike) -> tuple[Selection, CostMatrix, dict[str, Any]]:
    """Read what `save_selection` wrote: (selection, cost matrix, config)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        matrix = CostMatrix.from_dict(d.pop("cost_matrix"))
        config = d.pop("config", {})
        return Selection(**d), matrix, config
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a pkdkit selection.json: {e}") from e


def plot_cost_matrix(matrix: CostMatrix, selection: Selection | None = None, ax: Any = None) -> Figure:
    """Heatmap of the adaptation costs (rows: from, columns: to), values written in the cells, with the
    chosen path drawn over it: a box on each step's cell (student -> t1, t1 -> t2, ...) and arrows from
    one step to the next."""
    own = ax is None
    if own:
        fig = Figure(figsize=(1.2 * len(matrix.names) + 2.5, 1.0 * len(matrix.names) + 1.8))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    arr = matrix.as_array()
    im = ax.imshow(arr, cmap="viridis")
    fig.colorbar(im, ax=ax, label=f"adaptation cost ({matrix.method})")
    n = len(matrix.names)
    ax.set_xticks(range(n), matrix.names, rotation=45, ha="right")
    ax.set_yticks(range(n), matrix.names)
    ax.set_xlabel("to (teacher)")
    ax.set_ylabel("from (student side)")
    hi = arr.max() if arr.size else 0.0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{arr[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="black" if arr[i, j] > 0.6 * hi else "white")
    title = f"adaptation costs on {matrix.n_images} images, levels {', '.join(matrix.levels)}"
    if selection is not None:
        path = selection.path
        cells = [(matrix.index(u), matrix.index(v)) for u, v in zip(path, path[1:])]
        for k, (r, c) in enumerate(cells):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
            ax.text(c + 0.42, r - 0.42, str(k + 1), color="red", fontsize=8, ha="right", va="top",
                    fontweight="bold")
        for (r0, c0), (r1, c1) in zip(cells, cells[1:]):
            ax.add_patch(FancyArrowPatch((c0, r0), (c1, r1), arrowstyle="-|>", mutation_scale=14,
                                         color="red", linewidth=1.5, shrinkA=8, shrinkB=8))
        title += f"\n{selection.strategy}: {' -> '.join(path)}"
    ax.set_title(title, fontsize=9)
    if own:
        fig.tight_layout()
    return fig


def selection_to_stages(selection: Selection, teacher_checkpoints: dict[str, str | os.PathLike],
                        **stage_kwargs: Any) -> list[dict[str, Any]]:
    """Stage dicts for a distillation plan, in the selected order:
    ``{"name": teacher name, "teacher": checkpoint path, **stage_kwargs}`` (e.g. loss="mgd")."""
    missing = [t for t in selection.order if t not in teacher_checkpoints]
    if missing:
        raise ValueError(f"no checkpoint given for selected teachers {missing} "
                         f"(checkpoints given for {sorted(teacher_checkpoints)})")
    return [{"name": t, "teacher": str(teacher_checkpoints[t]), **stage_kwargs} for t in selection.order]


def run_selection(student_ckpt: str | os.PathLike, teacher_ckpts: dict[str, str | os.PathLike], dataset: Any,
                  out_dir: str | os.PathLike, *, n_images: int = 64, strategy: str = DEFAULT_STRATEGY,
                  method: str = "closed_form", device: str = "cpu", aps: dict[str, float] | None = None,
                  final: str | None = None, objective: str = "sum", batch_size: int = 8,
                  sizes: dict[str, tuple[int, int]] | None = None) -> Selection:
    """Model references in, files out: load the student and teachers (pkdkit checkpoints or torchvision
    weight names, `pkdkit.models.load_model`), compute the cost matrix on the first `n_images` images of
    `dataset`, order the teachers and write `out_dir/selection.json` and `out_dir/selection.png`. The
    student is called "student" in the matrix. `sizes`: {name: (min_size, max_size)} input sizes that
    override a model's own."""
    if "student" in teacher_ckpts:
        raise ValueError(f"a teacher may not be named 'student' (teachers: {sorted(teacher_ckpts)})")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    sizes = sizes or {}
    models = OrderedDict(student=load_model(student_ckpt, size=sizes.get("student"))[0])
    for name, ckpt in teacher_ckpts.items():
        models[name] = load_model(ckpt, size=sizes.get(name))[0]
    images = [dataset[i][0] for i in range(min(n_images, len(dataset)))]
    matrix = cost_matrix(models, images, method=method, batch_size=batch_size, device=device)
    selection = select_teachers(matrix, "student", list(teacher_ckpts), strategy=strategy, aps=aps, final=final,
                                objective=objective if strategy == "shortest_path" else "sum")
    out = Path(out_dir)
    config = {"student": str(student_ckpt), "teachers": {k: str(v) for k, v in teacher_ckpts.items()},
              "n_images": matrix.n_images, "strategy": strategy, "method": method, "device": str(device),
              "aps": aps, "final": final, "objective": objective, "batch_size": batch_size}
    save_selection(selection, matrix, out / "selection.json", config)
    plot_cost_matrix(matrix, selection).savefig(out / "selection.png", dpi=120)
    return selection
