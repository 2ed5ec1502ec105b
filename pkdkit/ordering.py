"""Teacher ordering: the cost matrix between models, the orders it suggests, and the selection record.

Plain numpy over a `CostMatrix` (computing the costs from detectors is `pkdkit.selection`):

- `CostMatrix`: adaptation costs between named models, `cost(a, b)` = how hard it is for a to imitate b,
  with a bootstrap interval per cost when `pkdkit.selection` computed it from image chunks (`interval`).
- orders: `order_minimax` (the default: the path of smallest steps, which can be progressive),
  `order_greedy` (the paper's spirit), `order_shortest_path` (sum or bottleneck objective), `order_by_ap`
  (baseline), dispatched by `select_teachers` through `STRATEGIES`; each returns a `Selection`;
  `strategies_table` compares what every strategy chooses.
- `save_selection` / `load_selection` (selection.json) and `plot_cost_matrix` (heatmap with the chosen path).

How sure a selection is. The costs are estimated on a finite set of calibration images, and two costs a few
thousandths apart can swap on other images (or on another CPU). `pkdkit.selection.cost_matrix` therefore keeps
its feature statistics per chunk of images and recomputes the whole matrix on bootstrap resamples of the chunks
(`CostMatrix.resamples`), which gives every cost a 90% interval (`CostMatrix.low`, `high`). `select_teachers`
uses them twice:

- **order support** (`Selection.order_support`): the same strategy, with the same APs and options, is run on
  every resampled matrix; the share of resamples that choose the same order is its support, reported with the
  runner-up order and its share (`support_sentence`). A support of at least `SUPPORTED` (0.8) is called
  *supported*; below it, "the data do not decide between them".
- **near-tie rule** (`near_ties="direct"`, the default; `NEAR_TIES`): a multi-teacher order is kept only when
  its steps are cheaper than going straight to its final teacher *beyond the noise*: the upper bound of its
  largest step's interval is below the lower bound of the direct step's. Otherwise the selection is the direct
  (one-shot) order, and its explanation says so. The rule is conservative (two 90% intervals that do not overlap),
  on purpose: a curriculum costs S x the training of one stage and should be chosen on evidence. It applies to
  the cost-based strategies (not `by_ap`) and only when the matrix has intervals (`near_ties="ignore"`: point
  estimates decide, as before this rule).
"""
from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from pkdkit.files import write_json

OBJECTIVES = ("sum", "max")
NEAR_TIES = ("direct", "ignore")  # see the module docstring
SUPPORTED = 0.8  # an order chosen in at least this share of bootstrap resamples is "supported"


@dataclass
class CostMatrix:
    """Adaptation costs between named models: `matrix[i][j]` = cost(names[i] -> names[j]) (row: from,
    column: to), averaged over `levels`; `per_level[level][i][j]` the same for one level. Diagonal 0.

    With a bootstrap (closed-form costs of `pkdkit.selection.cost_matrix`): `resamples[b]` is the whole matrix
    recomputed on resample b of the `chunks` image chunks, and `low[i][j]`, `high[i][j]` the central
    `confidence` interval of cost(i -> j) over the resamples (percentiles). Without one (the ``sgd`` method,
    selection.json files written before intervals existed) they are None / empty.
    """

    names: list[str]
    matrix: list[list[float]]
    levels: list[str]
    method: str = "closed_form"
    n_images: int = 0
    per_level: dict[str, list[list[float]]] = field(default_factory=dict)
    low: list[list[float]] | None = None
    high: list[list[float]] | None = None
    confidence: float = 0.9
    chunks: int = 0
    resamples: list[list[list[float]]] = field(default_factory=list)

    def cost(self, a: str, b: str) -> float:
        """cost(a -> b): how hard it is for `a` to imitate `b`."""
        return self.matrix[self.index(a)][self.index(b)]

    @property
    def has_intervals(self) -> bool:
        return self.low is not None and self.high is not None

    def interval(self, a: str, b: str) -> tuple[float, float] | None:
        """(low, high): the bootstrap interval of cost(a -> b), None without a bootstrap."""
        if not self.has_intervals:
            return None
        i, j = self.index(a), self.index(b)
        return self.low[i][j], self.high[i][j]

    def resampled(self) -> list["CostMatrix"]:
        """The bootstrap resamples as cost matrices (without intervals of their own)."""
        return [CostMatrix(names=self.names, matrix=m, levels=self.levels, method=self.method,
                           n_images=self.n_images) for m in self.resamples]

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
    largest; `explanation` says in words why this order was chosen (and how sure it is).

    `order_support` (when the cost matrix has bootstrap resamples, see `select_teachers`): {"share": the share
    of resamples whose selection is this order, "runner_up": the most frequent other order or None,
    "runner_up_share", "resamples": their number, "supported": share >= `SUPPORTED`, "sentence": in words}."""

    strategy: str
    student: str
    order: list[str]
    costs: list[float]
    total: float
    max_step: float
    explanation: str
    order_support: dict[str, Any] | None = None

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
                    max_teachers: int | None = None, near_ties: str = "direct") -> Selection:
    """Order `teachers` for `student` with one of `STRATEGIES` ("minimax", "greedy", "shortest_path",
    "by_ap"). `objective` and `max_teachers` apply to "shortest_path" only.

    When `matrix` has intervals, `near_ties` applies the near-tie rule ("direct", the default: a
    multi-teacher order is kept only when its largest step is cheaper than the direct step beyond the noise,
    else the direct order; "ignore": the point estimates decide), and with bootstrap resamples the selection
    gets its `order_support` (the same strategy and options on every resampled matrix; module docstring).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown teacher-order strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if near_ties not in NEAR_TIES:
        raise ValueError(f"unknown near-tie rule {near_ties!r}; expected one of {NEAR_TIES}")
    options: dict[str, Any] = {"aps": aps, "final": final}
    if strategy == "shortest_path":
        options.update(objective=objective, max_teachers=max_teachers)
    elif objective != "sum" or max_teachers is not None:
        raise ValueError(f"objective/max_teachers apply to the shortest_path strategy only, not {strategy!r}")
    selection = STRATEGIES[strategy](matrix, student, teachers, **options)
    by_costs = selection.order
    if near_ties == "direct" and strategy != "by_ap":
        selection = _near_tie_rule(matrix, selection)
    if matrix.resamples:
        orders = [tuple(STRATEGIES[strategy](m, student, teachers, **options).order) for m in matrix.resampled()]
        selection.order_support = order_support(selection.order, orders,
                                                set_aside=by_costs if by_costs != selection.order else None)
        selection.explanation += "\nsupport: " + selection.order_support["sentence"]
    return selection


def _near_tie_rule(matrix: CostMatrix, selection: Selection) -> Selection:
    """The selection itself when it is one teacher, when `matrix` has no intervals, or when its largest step's
    upper bound is below the direct step's lower bound; else the direct order (module docstring)."""
    if len(selection.order) < 2 or not matrix.has_intervals:
        return selection
    path, final = selection.path, selection.order[-1]
    largest = max(zip(path, path[1:]), key=lambda uv: matrix.interval(*uv)[1])
    hi = matrix.interval(*largest)[1]
    lo = matrix.interval(selection.student, final)[0]
    step = f"{largest[0]} -> {largest[1]} at most {hi:.4f}; {selection.student} -> {final} at least {lo:.4f}"
    pct = f"{100 * matrix.confidence:.0f}%"
    if hi < lo:
        selection.explanation += f"\nnear-tie rule: the chain is cheaper than the direct step beyond the noise " \
                                 f"({pct} intervals: largest step {step})"
        return selection
    why = [*selection.explanation.split("\n")[1:],
           f"near-tie rule: {' -> '.join(path)} is not cheaper than going straight to {final} beyond the noise "
           f"({pct} intervals overlap: largest step {step}), so the direct (one-shot) order is chosen; "
           "near_ties='ignore' keeps the point estimates' order"]
    return _selection(selection.strategy, matrix, selection.student, [final], why)


def order_support(order: Sequence[str], resampled_orders: Sequence[Sequence[str]],
                  set_aside: Sequence[str] | None = None) -> dict[str, Any]:
    """How often `order` is the selection over bootstrap resamples (`resampled_orders`: one order each):
    {"share", "runner_up" (the most frequent other order, None if there is none), "runner_up_share",
    "resamples", "supported" (share >= `SUPPORTED`), "sentence" (`support_sentence`)}. `set_aside`: the order
    the point estimates chose when the near-tie rule replaced it by `order` (then also under "set_aside")."""
    counts = Counter(tuple(o) for o in resampled_orders)
    n = sum(counts.values())
    if not n:
        raise ValueError("order_support: no resampled orders")
    others = [(c, o) for o, c in counts.items() if o != tuple(order)]
    runner = max(others, key=lambda co: (co[0], -len(co[1])), default=None)  # ties: the shorter order
    support = {"share": counts[tuple(order)] / n, "runner_up": list(runner[1]) if runner else None,
               "runner_up_share": runner[0] / n if runner else 0.0, "resamples": n}
    support["supported"] = support["share"] >= SUPPORTED
    if set_aside is not None:
        support["set_aside"] = list(set_aside)
    support["sentence"] = support_sentence(support)
    return support


def support_sentence(support: dict[str, Any]) -> str:
    """The order support in words: "chosen in 54% of 200 resamples; runner-up a -> b, 46%: the data do not
    decide between them". Supported (share >= `SUPPORTED`): "...: supported"."""
    text = f"chosen in {100 * support['share']:.0f}% of {support['resamples']} resamples"
    if support.get("set_aside"):  # the near-tie rule chose the direct order over the costs' own choice
        if support.get("runner_up"):
            text += f" by the costs alone, against {100 * support['runner_up_share']:.0f}% for " \
                    f"{' -> '.join(support['runner_up'])}"
        return text + f"; chosen here by the near-tie rule (the longer order {' -> '.join(support['set_aside'])} " \
                      "is not cheaper beyond the noise)"
    if support.get("runner_up"):
        text += f"; runner-up {' -> '.join(support['runner_up'])}, {100 * support['runner_up_share']:.0f}%"
    if support["share"] >= SUPPORTED:
        return text + f": supported (at least {100 * SUPPORTED:.0f}%)"
    return text + ": the data do not decide between them"


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
    """Heatmap of the adaptation costs (rows: from, columns: to), values written in the cells with their
    bootstrap interval below when the matrix has one, and the chosen path drawn over it: a box on each
    step's cell (student -> t1, t1 -> t2, ...) and arrows from one step to the next. The title gives the
    selection's order support when it has one."""
    own = ax is None
    n = len(matrix.names)
    if own:
        scale = 1.5 if matrix.has_intervals else 1.2
        fig = Figure(figsize=(scale * n + 2.5, 0.85 * scale * n + 1.9))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    arr = matrix.as_array()
    im = ax.imshow(arr, cmap="viridis")
    fig.colorbar(im, ax=ax, label=f"adaptation cost ({matrix.method})")
    ax.set_xticks(range(n), matrix.names, rotation=45, ha="right")
    ax.set_yticks(range(n), matrix.names)
    ax.set_xlabel("to (teacher)")
    ax.set_ylabel("from (student side)")
    hi = arr.max() if arr.size else 0.0
    digits = max(3, 2 - int(np.floor(np.log10(hi)))) if hi > 0 else 3  # small costs keep 2 significant digits
    for i in range(n):
        for j in range(n):
            text = f"{arr[i, j]:.{digits}f}"
            if matrix.has_intervals and i != j:
                text += f"\n[{matrix.low[i][j]:.{digits}f}, {matrix.high[i][j]:.{digits}f}]"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if arr[i, j] > 0.6 * hi else "white")
    title = f"adaptation costs on {matrix.n_images} images, levels {', '.join(matrix.levels)}"
    if matrix.has_intervals:
        title += f"\n[{100 * matrix.confidence:.0f}% interval: {len(matrix.resamples)} bootstrap resamples " \
                 f"of {matrix.chunks} image chunks]"
    if selection is not None:
        path = selection.path
        cells = [(matrix.index(u), matrix.index(v)) for u, v in zip(path, path[1:])]
        for k, (r, c) in enumerate(cells):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
            ax.text(c + 0.44, r - 0.44, str(k + 1), color="red", fontsize=8, ha="right", va="top",
                    fontweight="bold")
        for (r0, c0), (r1, c1) in zip(cells, cells[1:]):
            ax.add_patch(FancyArrowPatch((c0, r0), (c1, r1), arrowstyle="-|>", mutation_scale=14,
                                         color="red", linewidth=1.5, shrinkA=8, shrinkB=8))
        title += f"\n{selection.strategy}: {' -> '.join(path)}"
        if selection.order_support:
            title += f" (chosen in {100 * selection.order_support['share']:.0f}% of resamples)"
    ax.set_title(title, fontsize=9)
    if own:
        fig.tight_layout()
    return fig
