"""Teacher selection: adaptation costs between real (tiny) torchvision detectors and teacher orders."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from pkdkit.data import CocoDetection, LabelMap
from pkdkit.models import DetectorSpec, build_detector, save_detector
from pkdkit.ordering import (
    DEFAULT_STRATEGY, STRATEGIES, CostMatrix, Selection, load_selection, order_by_ap, order_greedy, order_minimax,
    order_shortest_path, plot_cost_matrix, save_selection, select_teachers,
)
from pkdkit.plan import Stage, selection_to_stages
from pkdkit.selection import adaptation_cost, cost_matrix, run_selection

TINY = dict(num_classes=6, fpn_channels=16, min_size=64, max_size=64)
LEVELS = ["p3", "p4"]  # 64 px images: p5-p7 have too few pixels on a handful of images for a 16-channel fit


class MixedFPN(nn.Module):
    """A backbone+FPN whose every output level goes through one fixed 1x1 conv: `scale * mixing @ f`."""

    def __init__(self, backbone: nn.Module, mixing: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels
        self.mix = nn.Conv2d(mixing.shape[1], mixing.shape[0], 1, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(scale * mixing[:, :, None, None])

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, self.mix(v)) for k, v in self.inner(x).items())


class KeepLevels(nn.Module):
    """A backbone+FPN that returns only some of its output maps (by the backbone's own key)."""

    def __init__(self, backbone: nn.Module, keep: list[str]):
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels
        self.keep = keep

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v) for k, v in self.inner(x).items() if k in self.keep)


def invertible(n: int, seed: int, condition: float = 4.0) -> torch.Tensor:
    """A random (n, n) matrix with singular values from 1 to `condition`."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q1 @ torch.diag(torch.linspace(1.0, condition, n)) @ q2


def with_backbone(model: nn.Module, wrap) -> nn.Module:
    out = copy.deepcopy(model)
    out.backbone = wrap(out.backbone)
    return out


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return build_detector(DetectorSpec(arch="retinanet", backbone="resnet18", **TINY)).eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(8)]


@pytest.fixture(scope="module")
def chain(student) -> dict[str, nn.Module]:
    """student, t1, t2, t3: the student's backbone+FPN weights moved 1, 2, 3 steps along one random
    direction, so each teacher is a small step from the previous one and far from the student."""
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g) * p.std()
                 for n, p in student.backbone.named_parameters() if p.dim() == 4}
    models = {"student": student}
    for k in (1, 2, 3):
        t = copy.deepcopy(student)
        with torch.no_grad():
            for n, p in t.backbone.named_parameters():
                if n in direction:
                    p.add_(0.02 * k * direction[n])
        models[f"t{k}"] = t
    return models


@pytest.fixture(scope="module")
def chain_matrix(chain, images) -> CostMatrix:
    return cost_matrix(chain, images, levels=LEVELS, batch_size=4)


def toy_matrix() -> CostMatrix:
    """S: student. Straight to F costs 0.5; S->A->F has a smaller largest step (0.3) but a larger total;
    S->B->A->F has the same largest step and a smaller total than S->A->F. D is farther than F."""
    names = ["S", "A", "B", "F", "D"]
    c = {("S", "A"): .3, ("S", "B"): .1, ("S", "F"): .5, ("S", "D"): .7,
         ("A", "B"): .4, ("A", "F"): .3, ("A", "D"): .6,
         ("B", "A"): .15, ("B", "F"): .45, ("B", "D"): .6,
         ("F", "A"): .9, ("F", "B"): .9, ("F", "D"): .2,
         ("D", "A"): .9, ("D", "B"): .9, ("D", "F"): .9}
    m = [[0.0 if u == v else c.get((u, v), 1.0) for v in names] for u in names]
    return CostMatrix(names=names, matrix=m, levels=["p3"])


# ---------------------------------------------------------------------------------------------------
# adaptation cost
def test_model_against_itself_costs_nothing(student, images):
    r = adaptation_cost(student, student, images, levels=LEVELS)
    assert r.total < 1e-4
    assert set(r.per_level) == set(LEVELS) and r.method == "closed_form" and r.n_images == len(images)


def test_teacher_that_is_an_invertible_mixing_of_the_student_costs_nothing(student, images):
    mixed = with_backbone(student, lambda b: MixedFPN(b, invertible(16, seed=2), scale=5.0))
    assert adaptation_cost(student, mixed, images, levels=LEVELS).total < 1e-4


def test_cost_unchanged_by_teacher_scale_and_rotation_and_by_student_mixing(chain, images):
    s, t = chain["student"], chain["t3"]
    base = adaptation_cost(s, t, images, levels=LEVELS).total
    assert base > 1e-3
    g = torch.Generator().manual_seed(3)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    t_rot = with_backbone(t, lambda b: MixedFPN(b, rotation, scale=7.0))
    assert adaptation_cost(s, t_rot, images, levels=LEVELS).total == pytest.approx(base, rel=1e-6)
    s_mixed = with_backbone(s, lambda b: MixedFPN(b, invertible(16, seed=4), scale=0.1))
    assert adaptation_cost(s_mixed, t, images, levels=LEVELS).total == pytest.approx(base, rel=1e-3)


def test_cost_matrix_equals_pairwise_costs_and_is_asymmetric(chain, chain_matrix, images):
    m = chain_matrix.as_array()
    assert chain_matrix.names == ["student", "t1", "t2", "t3"] and chain_matrix.levels == LEVELS
    assert np.all(np.diag(m) == 0) and chain_matrix.n_images == len(images)
    pair = adaptation_cost(chain["t3"], chain["t1"], images, levels=LEVELS, batch_size=4)
    assert chain_matrix.cost("t3", "t1") == pytest.approx(pair.total, rel=1e-9)
    assert chain_matrix.cost("t3", "t1") != chain_matrix.cost("t1", "t3")
    # farther along the chain costs more from the student
    assert m[0, 1] < m[0, 2] < m[0, 3]


def test_sgd_cost_is_close_to_and_not_below_closed_form(chain, images):
    closed = adaptation_cost(chain["student"], chain["t3"], images, levels=LEVELS)
    sgd = adaptation_cost(chain["student"], chain["t3"], images, levels=LEVELS, method="sgd", sgd_steps=200)
    assert sgd.method == "sgd"
    assert closed.total * 0.999 <= sgd.total <= closed.total * 1.5 + 1e-3


def test_the_cost_does_not_depend_on_the_calibration_batch_size(tiny_coco, chain):
    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    s, t = chain["student"], chain["t2"]
    images = [ds[i][0] for i in range(len(ds))]
    by_4 = adaptation_cost(s, t, images, levels=LEVELS, batch_size=4)
    by_3 = adaptation_cost(s, t, images, levels=LEVELS, batch_size=3)
    assert by_4.n_images == by_3.n_images == len(ds)
    assert by_3.total == pytest.approx(by_4.total, rel=1e-9)


def test_calibration_images_must_be_image_tensors(tiny_coco, chain):
    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    with pytest.raises(ValueError, match=r"calibration image 0: expected a \(3, H, W\) tensor, found tuple"):
        adaptation_cost(chain["student"], chain["t2"], ds, levels=LEVELS)


def test_levels_with_too_few_pixels_are_left_out_with_a_warning(student, images):
    with pytest.warns(UserWarning, match="too few pixel samples"):
        r = adaptation_cost(student, student, images)  # 8 images of 64 px: p5-p7 hold 8-32 pixels
    assert list(r.per_level) == ["p3", "p4"]
    with pytest.raises(ValueError, match="too few pixel samples"):
        adaptation_cost(student, student, images, levels=["p3", "p6"])


def test_empty_calibration_set_raises(student):
    with pytest.raises(ValueError, match="no calibration images"):
        adaptation_cost(student, student, [])


def test_models_without_a_common_level_raise(student, images):
    only_first = with_backbone(student, lambda b: KeepLevels(b, ["0"]))  # p3
    only_last = with_backbone(student, lambda b: KeepLevels(b, ["p7"]))
    with pytest.raises(ValueError, match="share no FPN level"):
        cost_matrix({"a": only_first, "b": only_last}, images)
    with pytest.raises(ValueError, match=r"levels \['p2'\] are not in every model"):
        adaptation_cost(student, student, images, levels=["p2"])


def test_models_that_normalise_images_differently_raise(student, images):
    other = build_detector(DetectorSpec(arch="retinanet", backbone="resnet18", **TINY))
    other.transform.image_mean = [0.5, 0.5, 0.5]  # another input size is fine (tests/test_coco.py), this is not
    with pytest.raises(ValueError, match="transform images differently.*image_mean"):
        adaptation_cost(student, other, images)


# ---------------------------------------------------------------------------------------------------
# orders
@pytest.mark.parametrize("strategy,options", [("minimax", {}), ("greedy", {}), ("shortest_path", {"objective": "sum"}),
                                              ("shortest_path", {"objective": "max"})])
def test_chain_of_perturbed_teachers_is_recovered(chain_matrix, strategy, options):
    sel = select_teachers(chain_matrix, "student", ["t3", "t1", "t2"], strategy=strategy, **options)
    assert sel.order == ["t1", "t2", "t3"]
    assert sel.costs == pytest.approx([chain_matrix.cost("student", "t1"), chain_matrix.cost("t1", "t2"),
                                       chain_matrix.cost("t2", "t3")])
    assert sel.total == pytest.approx(sum(sel.costs)) and sel.max_step == max(sel.costs)
    assert "t3 is the final teacher" in sel.explanation


def test_shortest_path_sum_goes_straight_and_max_takes_small_steps():
    m = toy_matrix()
    teachers = ["A", "B", "F"]
    assert order_shortest_path(m, "S", teachers, objective="sum").order == ["F"]  # 0.5 < 0.55 < 0.6
    by_max = order_shortest_path(m, "S", teachers, objective="max")
    assert by_max.order == ["B", "A", "F"] and by_max.max_step == 0.3  # ties with S->A->F, smaller total
    assert order_shortest_path(m, "S", teachers, objective="max", max_teachers=2).order == ["A", "F"]


def matrix_of(costs: dict[tuple[str, str], float], names: list[str], default: float = 0.9) -> CostMatrix:
    return CostMatrix(names=names, matrix=[[0.0 if u == v else costs.get((u, v), default) for v in names]
                                           for u in names], levels=["p3"])


def test_default_order_uses_an_intermediate_when_every_step_through_it_is_cheaper():
    m = matrix_of({("S", "A"): .3, ("A", "T"): .35, ("S", "T"): .4}, ["S", "A", "T"])
    aps = {"A": .2, "T": .4}
    assert select_teachers(m, "S", ["A", "T"], aps=aps).order == ["A", "T"]
    # summing costs goes straight: .4 < .3 + .35 (the failure the default avoids)
    assert order_shortest_path(m, "S", ["A", "T"], aps=aps).order == ["T"]


@pytest.mark.parametrize("into, out_of", [(.5, .1), (.1, .5), (.45, .45)])
def test_default_order_leaves_out_a_teacher_with_a_step_dearer_than_the_direct_one(into, out_of):
    m = matrix_of({("S", "A"): into, ("A", "T"): out_of, ("S", "T"): .4}, ["S", "A", "T"])
    sel = order_minimax(m, "S", ["A", "T"], aps={"A": .2, "T": .4})
    assert sel.order == ["T"] and "not used" in sel.explanation


def test_default_order_follows_a_chain_of_cheap_steps_when_the_jumps_are_dear():
    names = ["S", "a", "b", "c"]
    cheap = {("S", "a"): .2, ("a", "b"): .2, ("b", "c"): .25}
    dear = {("S", "b"): .5, ("S", "c"): .6, ("a", "c"): .45}
    m = matrix_of({**cheap, **dear}, names)
    aps = {"a": .1, "b": .2, "c": .3}
    assert order_minimax(m, "S", ["c", "b", "a"], aps=aps).order == ["a", "b", "c"]
    # and it always ends at the target: the strongest by AP, or the one the user names
    assert order_minimax(m, "S", ["c", "b", "a"], aps=aps, final="b").order == ["a", "b"]
    assert "left out, stronger than b: c" in order_minimax(m, "S", ["a", "b", "c"], aps=aps, final="b").explanation


def test_default_order_prefers_more_small_steps_when_the_largest_step_ties():
    sel = order_minimax(toy_matrix(), "S", ["A", "B", "F"], final="F")
    assert sel.order == ["B", "A", "F"] and sel.max_step == .3  # (.3, .15, .1) beats S->A->F (.3, .3)


def test_greedy_takes_closest_step_drops_farther_candidates_and_stops_at_final():
    m = toy_matrix()
    sel = order_greedy(m, "S", ["A", "B", "F", "D"], final="F")
    assert sel.order == ["B", "A", "F"]
    assert "dropped D" in sel.explanation and "from B: A is the closest" in sel.explanation
    # the final teacher defaults to the highest AP
    assert order_greedy(m, "S", ["A", "B", "F"], aps={"A": .2, "B": .3, "F": .1}).order == ["B"]


def test_order_by_ap_is_ascending_and_stops_at_final():
    m = toy_matrix()
    aps = {"A": .3, "B": .1, "F": .4, "D": .35}
    assert order_by_ap(m, "S", ["A", "B", "F", "D"], aps=aps).order == ["B", "A", "D", "F"]
    assert order_by_ap(m, "S", ["A", "B", "F", "D"], aps=aps, final="D").order == ["B", "A", "D"]
    with pytest.raises(ValueError, match="no AP given for teachers \\['D'\\]"):
        order_by_ap(m, "S", ["A", "D"], aps={"A": .3})


def test_select_teachers_rejects_bad_requests():
    m = toy_matrix()
    assert set(STRATEGIES) == {"minimax", "greedy", "shortest_path", "by_ap"} and DEFAULT_STRATEGY == "minimax"
    with pytest.raises(ValueError, match="no candidate teachers"):
        select_teachers(m, "S", [])
    with pytest.raises(ValueError, match="student 'S' is also listed"):
        select_teachers(m, "S", ["A", "S"])
    with pytest.raises(ValueError, match="'X' is not in the cost matrix"):
        select_teachers(m, "S", ["A", "X"])
    with pytest.raises(ValueError, match="unknown teacher-order strategy"):
        select_teachers(m, "S", ["A"], strategy="random")
    with pytest.raises(ValueError, match="shortest_path strategy only"):
        select_teachers(m, "S", ["A"], strategy="greedy", objective="max")


# ---------------------------------------------------------------------------------------------------
# output
def test_selection_json_round_trip(tmp_path, chain_matrix):
    sel = select_teachers(chain_matrix, "student", ["t1", "t2", "t3"])
    path = save_selection(sel, chain_matrix, tmp_path / "run" / "selection.json", config={"n_images": 8})
    loaded, matrix, config = load_selection(path)
    assert loaded == sel and matrix == chain_matrix and config == {"n_images": 8}
    raw = json.loads(path.read_text())
    assert raw["order"] == ["t1", "t2", "t3"] and raw["cost_matrix"]["names"] == chain_matrix.names
    assert [p.name for p in path.parent.iterdir()] == ["selection.json"]  # no temp file left


def test_plot_draws_heatmap_with_the_chosen_path(chain_matrix):
    sel = select_teachers(chain_matrix, "student", ["t1", "t2", "t3"], strategy="greedy")
    fig = plot_cost_matrix(chain_matrix, sel)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.images) == 1 and len(fig.axes) == 2  # heatmap + colorbar
    boxes = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
    assert len(boxes) == len(sel.order)  # one box per step
    assert [t.get_text() for t in ax.get_xticklabels()] == chain_matrix.names


def test_selection_to_stages_follows_the_order():
    sel = Selection("greedy", "S", ["B", "F"], [0.1, 0.2], 0.3, 0.2, "")
    stages = selection_to_stages(sel, {"F": "f.pt", "B": "b.pt", "A": "a.pt"}, loss="mgd", train={"epochs": 2})
    assert stages == [Stage(name="B", teacher="b.pt", loss="mgd", train={"epochs": 2}),
                      Stage(name="F", teacher="f.pt", loss="mgd", train={"epochs": 2})]
    with pytest.raises(ValueError, match=r"no checkpoint given for selected teachers \['F'\]"):
        selection_to_stages(sel, {"B": "b.pt"})


def test_run_selection_writes_json_and_figure(tmp_path, tiny_coco, chain):
    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    spec = DetectorSpec(arch="retinanet", backbone="resnet18", **TINY)
    label_map = LabelMap.from_categories(ds.coco.dataset["categories"])
    ckpts = {name: save_detector(tmp_path / f"{name}.pt", model, spec, label_map) for name, model in chain.items()}
    student = ckpts.pop("student")
    with pytest.warns(UserWarning, match="too few pixel samples"):
        sel, returned = run_selection(student, ckpts, ds, tmp_path / "out", n_images=6, strategy="greedy")
    assert sel.order == ["t1", "t2", "t3"]
    loaded, matrix, config = load_selection(tmp_path / "out" / "selection.json")
    assert loaded == sel and matrix == returned
    assert matrix.names == ["student", "t1", "t2", "t3"] and matrix.n_images == 6
    assert config["strategy"] == "greedy" and config["teachers"]["t1"] == str(ckpts["t1"])
    assert (tmp_path / "out" / "selection.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------
# intervals, order support and the near-tie rule
def test_chain_costs_have_intervals_around_them_and_the_chain_is_supported(chain_matrix):
    m = chain_matrix
    assert m.has_intervals and m.chunks == 8 and len(m.resamples) == 200 and m.confidence == 0.9
    for i, a in enumerate(m.names):
        for j, b in enumerate(m.names):
            low, high = m.interval(a, b)
            assert low <= m.matrix[i][j] <= high and (high > low) == (i != j)
    sel = select_teachers(m, "student", ["t3", "t1", "t2"])
    assert sel.order == ["t1", "t2", "t3"]  # each step is far below the jumps over it: the rule keeps the chain
    assert sel.order_support["share"] >= 0.9 and sel.order_support["supported"]
    assert "near-tie rule: the chain is cheaper than the direct step beyond the noise" in sel.explanation
    assert "support: chosen in" in sel.explanation and ": supported" in sel.explanation


def swapped_teachers(n_base: int = 8, pixels: int = 64, channels: int = 6, seed: int = 0):
    """Feature batches (one image each) of a student S and two teachers A, B with exactly the same costs on
    the whole set: images i and i + n_base show S the same features X_i; A sees X_i M + E_i on image i and
    X_i M + F_i on its twin, B the other way round. Only a resample that draws twins unequally tells them
    apart, and then as often one way as the other."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g)
    xs = [torch.randn(pixels, channels, generator=g) for _ in range(n_base)]
    es = [torch.randn(pixels, channels, generator=g) for _ in range(n_base)]
    fs = [torch.randn(pixels, channels, generator=g) for _ in range(n_base)]
    first = [(x, x @ mix + e, x @ mix + f) for x, e, f in zip(xs, es, fs)]
    twins = [(x, x @ mix + f, x @ mix + e) for x, e, f in zip(xs, es, fs)]
    return [(1, {"p3": list(feats)}) for feats in first + twins]


def test_two_interchangeable_teachers_get_support_near_one_half():
    from pkdkit.selection import feature_cost_matrix

    m = feature_cost_matrix(["S", "A", "B"], swapped_teachers())
    assert m.cost("S", "A") == pytest.approx(m.cost("S", "B"), rel=1e-9) and m.chunks == 16
    sel = select_teachers(m, "S", ["A", "B"])  # no APs: the final teacher is the farther one, A or B
    support = sel.order_support
    assert len(sel.order) == 1 and 0.3 <= support["share"] <= 0.7 and not support["supported"]
    assert {tuple(sel.order), tuple(support["runner_up"])} == {("A",), ("B",)}
    assert support["share"] + support["runner_up_share"] > 0.95
    assert "the data do not decide between them" in sel.explanation


def test_moments_memory_is_flat_in_the_number_of_images():
    from pkdkit.selection import _Moments

    def size(n_images: int) -> int:
        mom = _Moments([8, 8], chunks=16, device=torch.device("cpu"))
        for k in range(0, n_images, 4):
            mom.add([torch.randn(4 * 10, 8), torch.randn(4 * 10, 8)], first_image=k, n_images=4)
        assert mom.total_n == 10 * n_images
        return sum(t.numel() * t.element_size() for t in (mom.n, mom.sum, mom.gram))

    assert size(8) == size(400) == 8 * (16 + 16 * 16 + 16 * 16 * 16)


def test_cost_matrix_without_a_bootstrap_has_no_intervals(chain, images):
    m = cost_matrix(chain, images, levels=LEVELS, batch_size=4, resamples=0)
    assert not m.has_intervals and m.resamples == [] and m.interval("student", "t1") is None
    sel = select_teachers(m, "student", ["t1", "t2", "t3"])
    assert sel.order_support is None and "support" not in sel.explanation
    sgd = cost_matrix(chain, images[:4], levels=LEVELS, batch_size=4, method="sgd", sgd_steps=5)
    assert not sgd.has_intervals  # intervals are closed-form only
    with pytest.raises(ValueError, match="confidence must be in"):
        cost_matrix(chain, images, levels=LEVELS, confidence=90)


def with_intervals(m: CostMatrix, half: dict[tuple[str, str], float]) -> CostMatrix:
    """`m` with interval cost +- half[(u, v)] on the listed pairs (0 elsewhere)."""
    idx = {n: k for k, n in enumerate(m.names)}
    width = np.zeros((len(m.names),) * 2)
    for (u, v), h in half.items():
        width[idx[u], idx[v]] = h
    arr = m.as_array()
    m.low, m.high = (arr - width).tolist(), (arr + width).tolist()
    return m


def test_near_tie_rule_keeps_a_chain_only_when_it_is_cheaper_beyond_the_noise():
    costs = {("S", "A"): .3, ("A", "T"): .35, ("S", "T"): .45}
    aps = {"A": .2, "T": .4}
    clear = with_intervals(matrix_of(costs, ["S", "A", "T"]), {("S", "A"): .02, ("A", "T"): .02, ("S", "T"): .03})
    sel = select_teachers(clear, "S", ["A", "T"], aps=aps)  # largest step at most .37 < direct at least .42
    assert sel.order == ["A", "T"] and "beyond the noise" in sel.explanation
    noisy = with_intervals(matrix_of(costs, ["S", "A", "T"]), {("S", "A"): .02, ("A", "T"): .06, ("S", "T"): .06})
    sel = select_teachers(noisy, "S", ["A", "T"], aps=aps)  # .41 is not below .39: the direct order
    assert sel.order == ["T"] and sel.costs == [.45] and sel.strategy == "minimax"
    assert "near-tie rule: S -> A -> T is not cheaper than going straight to T" in sel.explanation
    assert select_teachers(noisy, "S", ["A", "T"], aps=aps, near_ties="ignore").order == ["A", "T"]
    assert select_teachers(noisy, "S", ["A", "T"], aps=aps, strategy="greedy").order == ["T"]
    assert select_teachers(noisy, "S", ["A", "T"], aps=aps, strategy="by_ap").order == ["A", "T"]  # not cost-based
    # without intervals the point estimates decide, as before
    assert select_teachers(matrix_of(costs, ["S", "A", "T"]), "S", ["A", "T"], aps=aps).order == ["A", "T"]
    with pytest.raises(ValueError, match="unknown near-tie rule"):
        select_teachers(noisy, "S", ["A", "T"], near_ties="sometimes")


def test_order_support_counts_resampled_orders_and_says_how_sure_it_is():
    from pkdkit.ordering import SUPPORTED, order_support, support_sentence

    s = order_support(["r50"], [("r50",)] * 54 + [("r34", "r50")] * 46)
    assert s["share"] == .54 and s["runner_up"] == ["r34", "r50"] and s["runner_up_share"] == .46
    assert not s["supported"] and s["resamples"] == 100
    assert s["sentence"] == ("chosen in 54% of 100 resamples; runner-up r34 -> r50, 46%: the data do not decide "
                             "between them")
    sure = order_support(["a", "b"], [("a", "b")] * 9 + [("b",)])
    assert sure["supported"] and SUPPORTED == 0.8 and support_sentence(sure).endswith("supported (at least 80%)")
    assert order_support(["a"], [("a",)] * 3)["runner_up"] is None


def test_near_tie_fallback_says_what_the_costs_alone_chose(chain_matrix):
    m = copy.deepcopy(chain_matrix)
    m.low = [[0.0] * 4 for _ in range(4)]  # intervals as wide as the costs: nothing is beyond the noise
    m.high = [[1.0] * 4 for _ in range(4)]
    sel = select_teachers(m, "student", ["t1", "t2", "t3"])
    assert sel.order == ["t3"] and sel.order_support["set_aside"] == ["t1", "t2", "t3"]
    assert "by the costs alone" in sel.order_support["sentence"] and "near-tie rule" in sel.order_support["sentence"]


def test_old_selection_json_without_intervals_still_loads(tmp_path, chain_matrix):
    sel = select_teachers(chain_matrix, "student", ["t1", "t2", "t3"])
    path = save_selection(sel, chain_matrix, tmp_path / "selection.json")
    raw = json.loads(path.read_text())
    assert raw["order_support"]["share"] == sel.order_support["share"]
    assert raw["cost_matrix"]["low"] == chain_matrix.low and len(raw["cost_matrix"]["resamples"]) == 200
    for key in ("low", "high", "confidence", "chunks", "resamples"):
        del raw["cost_matrix"][key]
    del raw["order_support"]
    path.write_text(json.dumps(raw))
    loaded, matrix, _ = load_selection(path)
    assert loaded.order == sel.order and loaded.order_support is None
    assert not matrix.has_intervals and matrix.matrix == chain_matrix.matrix
    plot_cost_matrix(matrix, loaded)  # an old matrix still plots
