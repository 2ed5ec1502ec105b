"""Teacher selection: adaptation costs between detectors, computed from their features.

The paper (Cao et al., "Learning Lightweight Object Detectors via Progressive Knowledge Distillation")
distils a student from a *sequence* of teachers, weak to strong, and picks that sequence from an
estimate of how far each model is from the next one: the *adaptation cost*, the distillation error that
remains when only a light adapter maps one model's features onto another's. Its exact procedure is not in
the released code; this module implements

- `adaptation_cost(a, b, images)`: how well a 1x1 linear adapter maps a's FPN features onto b's on
  calibration images, as a normalised residual (0: b is a linear function of a; 1: a explains nothing).
  `cost(a -> b)` is how hard it is for student `a` to imitate teacher `b`; it is not symmetric.
- `cost_matrix(models, images)`: every ordered pair at once, one forward per model per batch.
- `run_selection`: model references in, cost matrix and teacher order (`pkdkit.ordering`) out, and files.

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
from typing import Any, Iterator, Sequence

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
            raise ValueError(f"models {names[0]!r} and {name!r} transform images differently ({detail}); "
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


def _pairwise_costs(models: "OrderedDict[str, nn.Module]", images: Sequence[torch.Tensor], *, levels: Sequence[str] | None,
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
    for m in models.values():
        m.to(device)
    with eval_mode(*models.values()):
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
    costs, used, n_images = _pairwise_costs(
        OrderedDict([("a", a), ("b", b)]), images, levels=levels, method=method, ridge=ridge,
        batch_size=batch_size, device=device, sgd_steps=sgd_steps, lr=lr, pairs=[(0, 1)])
    per_level = {lvl: costs[(0, 1)][lvl] for lvl in used}
    return CostResult(total=float(np.mean(list(per_level.values()))), per_level=per_level, method=method,
                      n_images=n_images)


def cost_matrix(models: dict[str, nn.Module], images: Sequence[torch.Tensor], *, method: str = "closed_form",
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
                  out_dir: str | os.PathLike, *, n_images: int = 64, strategy: str = DEFAULT_STRATEGY,
                  method: str = "closed_form", device: str = "cpu", aps: dict[str, float] | None = None,
                  final: str | None = None, objective: str = "sum", batch_size: int = 8,
                  sizes: dict[str, tuple[int, int]] | None = None) -> tuple[Selection, CostMatrix]:
    """Model references in, (selection, cost matrix) and files out: load the student and teachers (pkdkit
    checkpoints or torchvision weight names, `pkdkit.models.load_model`), compute the cost matrix on the
    first `n_images` images of `dataset`, order the teachers (`pkdkit.ordering.select_teachers`) and write
    `out_dir/selection.json` and `out_dir/selection.png`. The student is called "student" in the matrix.
    `sizes`: {name: (min_size, max_size)} input sizes that override a model's own."""
    check_teacher_names(list(teacher_ckpts))
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
    config = {"student": str(student_ckpt), "teachers": {k: str(v) for k, v in teacher_ckpts.items()},
              "n_images": matrix.n_images, "strategy": strategy, "method": method, "device": str(device),
              "aps": aps, "final": final, "objective": objective, "batch_size": batch_size}
    json_file, figure_file = selection_files(out_dir)
    save_selection(selection, matrix, json_file, config)
    plot_cost_matrix(matrix, selection).savefig(figure_file, dpi=120)
    return selection, matrix
