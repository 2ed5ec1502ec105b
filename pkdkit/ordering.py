"""Teacher ordering: the cost matrix between models, the orders it suggests, and the selection record.

Plain numpy over a `CostMatrix` (computing the costs from detectors is `pkdkit.selection`):

- `CostMatrix`: adaptation costs between named models, `cost(a, b)` = how hard it is for a to imitate b.
- orders: `order_minimax` (the default: the path of smallest steps, which can be progressive),
  `order_greedy` (the paper's spirit), `order_shortest_path` (sum or bottleneck objective), `order_by_ap`
  (baseline), dispatched by `select_teachers` through `STRATEGIES`; each returns a `Selection`;
  `strategies_table` compares what every strategy chooses.
- `save_selection` / `load_selection` (selection.json) and `plot_cost_matrix` (heatmap with the chosen path).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from pkdkit.files import write_json

OBJECTIVES = ("sum", "max")


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


def strategies_table(matrix: CostMatrix, student: str, aps: dict[str, float] | None = None) -> str:
    """Markdown: the order each of `STRATEGIES` chooses from `student` over every other model of `matrix`,
    with its total cost and largest step (`aps`: the teachers' AP, for "by_ap" and the final teacher)."""
    teachers = [n for n in matrix.names if n != student]
    rows = ["| strategy | order | total cost | largest step |", "|---|---|---:|---:|"]
    for name in STRATEGIES:
        s = select_teachers(matrix, student, teachers, strategy=name, aps=aps)
        rows.append(f"| {name} | {' → '.join(s.order)} | {s.total:.3f} | {s.max_step:.3f} |")
    return "\n".join(rows)


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
