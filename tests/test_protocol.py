"""The comparison protocol: which runs the walk-through compares, their budgets, and how they are reported.
Plain data, no training: the runs themselves are exercised in test_distill.py and test_notebooks.py."""
from __future__ import annotations

import json

import pytest

from pkdkit.evaluate import comparison_table
from pkdkit.presets import PRESETS, get_preset
from pkdkit.ordering import Selection
from pkdkit.workflow import comparison_orders, order_check, orders_table, seed_study, stage_count


def selection(order: list[str]) -> Selection:
    return Selection(strategy="minimax", student="student", order=order, costs=[0.1] * len(order),
                     total=0.1 * len(order), max_step=0.1, explanation="")


def record(ap: float, epochs: int, init: str = "initial (random, seed 0)") -> dict:
    return {"metrics": {"bbox": {"stats": {s: ap for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")}}},
            "config": {"budget": {"init": init, "epochs": epochs}}}


def test_progressive_uses_exactly_the_selected_order_and_the_long_runs_match_its_budget():
    orders = comparison_orders(selection(["t1", "t2"]), {"t1": .2, "t2": .3, "t0": .1})
    assert list(orders) == ["one_shot", "one_shot_long", "progressive", "reversed"]
    assert orders["progressive"] == {"order": ["t1", "t2"], "source": "selection (minimax)", "stages_x_epochs": 1}
    assert orders["reversed"]["order"] == ["t2", "t1"]
    assert orders["one_shot"]["order"] == ["t2"] and orders["one_shot"]["stages_x_epochs"] == 1
    # reversed starts with t2 from the same initialisation for E epochs: its stage 1 is the one-shot run
    assert orders["one_shot"]["same_as"] == "reversed" and orders["one_shot"]["same_stage"] == 1
    assert orders["one_shot_long"]["order"] == ["t2"] and orders["one_shot_long"]["stages_x_epochs"] == 2
    assert stage_count(orders) == 2
    table = orders_table(orders, 12)
    assert "| progressive | t1 → t2 | selection (minimax) | 2 × 12 = 24 |" in table
    assert "| one_shot_long | t2 |" in table and "| 2 × 12 = 24 |" in table.split("one_shot_long")[1].split("\n")[0]


def test_a_single_selected_teacher_is_said_plainly_and_the_by_ap_chain_is_labelled_as_extra():
    orders = comparison_orders(selection(["t2"]), {"t1": .2, "t2": .3, "t3": .5})
    assert orders["progressive"]["order"] == ["t2"]  # no silent fallback: the selection's order
    assert orders["one_shot"]["same_as"] == "progressive"  # the same run, trained once
    assert orders["by_ap"]["order"] == ["t1", "t2"] and "not the selected order" in orders["by_ap"]["source"]
    assert orders["reversed"]["order"] == ["t2", "t1"] and "by_ap" in orders["reversed"]["source"]
    assert orders["one_shot_long"]["stages_x_epochs"] == 2
    alone = comparison_orders(selection(["t1"]), {"t1": .2, "t2": .3})  # nothing weaker: no chain, no long run
    assert list(alone) == ["one_shot", "progressive"]
    no_reversed = comparison_orders(selection(["t1", "t2"]), {"t1": .2, "t2": .3}, run_reversed=False)
    assert list(no_reversed) == ["one_shot", "one_shot_long", "progressive"]
    assert "same_as" not in no_reversed["one_shot"]


def test_order_check_says_whether_the_selected_order_was_the_best_one_run():
    orders = comparison_orders(selection(["t1", "t2"]), {"t1": .2, "t2": .3})
    records = {"baseline": record(.1, 12), "one_shot": record(.2, 12), "one_shot_long": record(.25, 24),
               "progressive": record(.22, 24), "reversed": record(.18, 24)}
    check = order_check(records, orders)
    assert check["selected"] == ["t1", "t2"] and check["best_run"] == "one_shot_long"
    assert check["selected_is_best"] is False and check["best_ap"] == .25
    assert set(check["orders_run"]) == {"one_shot", "one_shot_long", "progressive", "reversed"}


def test_tables_show_every_runs_epochs_and_initialisation():
    table = comparison_table({"baseline": record(.10, 12), "baseline_long": record(.12, 24),
                              "progressive": record(.15, 24, "initial (random, seed 0) + neck/head of t1")})
    lines = table.splitlines()
    assert lines[0].startswith("| run | epochs | init | AP |")
    assert lines[3].startswith("| baseline_long | 24 | initial (random, seed 0) | 12.0 |")
    assert lines[4].startswith("| progressive | 24 | initial (random, seed 0) + neck/head of t1 | 15.0 |")
    assert "epochs" not in comparison_table({"a": {"bbox": {"stats": {"AP": .1}}}}, stats=("AP",))


def test_seed_study_aggregates_with_budgets_and_reports_the_order_check_per_seed(tmp_path):
    orders = comparison_orders(selection(["t1", "t2"]), {"t1": .2, "t2": .3})
    reports = []
    for seed, ap in enumerate((.20, .24)):
        records = {"baseline": record(.1, 12), "progressive": record(ap, 24, f"initial (random, seed {seed})"),
                   "one_shot": record(.22, 12),
                   "by_ap": record(.2, 12 * (seed + 1))}
        metrics = {"parameters": {"seed": seed},
                   "evaluation": {n: r["metrics"]["bbox"]["stats"] for n, r in records.items()},
                   "comparison": {"runs": {n: {"budget": r["config"]["budget"]} for n, r in records.items()},
                                  "order_check": order_check(records, orders)}}
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "metrics.json").write_text(json.dumps(metrics))
        reports.append(tmp_path / f"s{seed}")
    study = seed_study(reports)
    assert study["runs"]["progressive"]["AP"]["mean"] == pytest.approx(.22)
    # each seed starts from its own initialisation: the label says so instead of naming seed 0 for all
    assert "| progressive | 24 | initial (random, the seed's) | 22.0 ± 2.8 |" in study["table"]
    assert "| baseline | 12 | initial (random, seed 0) |" in study["table"]  # the same label in every seed
    assert [c["selected_is_best"] for c in study["order_checks"]] == [False, True]
    assert "| 1 | t1 → t2 | 24.0 | progressive: t1 → t2 | 24.0 | yes |" in study["order_table"]
    # a run that cost other epochs in another seed is flagged, never averaged silently as one budget
    assert study["mixed_budgets"] == {"by_ap": [12, 24]} and "| by_ap | 12/24 |" in study["table"]
    assert "**by_ap is not one budget**" in study["table"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_stage_trains_the_baselines_schedule(name):
    preset = get_preset(name)
    assert preset.distill.epochs == preset.train.epochs  # equal budgets: S stages of E epochs vs E and S x E
    assert preset.loss_weight == ("auto" if preset.synth else 1.0)  # from-scratch features are calibrated


def test_order_check_says_no_difference_shown_inside_the_noise():
    from pkdkit.spread import AP_NOISE

    orders = comparison_orders(selection(["t1", "t2"]), {"t1": .2, "t2": .3})
    base = {"baseline": record(.1, 12), "one_shot": record(.2, 12), "one_shot_long": record(.21, 24)}
    close = order_check({**base, "progressive": record(.205, 24), "reversed": record(.212, 24)}, orders)
    assert close["verdict"] == "no difference shown" and close["noise"] == AP_NOISE == 0.0113
    assert "within the noise of 1.1 AP points" in close["sentence"] and "no difference shown" in close["sentence"]
    worse = order_check({**base, "progressive": record(.18, 24), "reversed": record(.212, 24)}, orders)
    assert worse["verdict"] == "worse" and "3.2 points higher, beyond the noise" in worse["sentence"]
    best = order_check({**base, "progressive": record(.25, 24), "reversed": record(.212, 24)}, orders)
    assert best["verdict"] == "best" and "3.8 points above the next (`reversed`)" in best["sentence"]
    assert order_check({**base, "progressive": record(.205, 24), "reversed": record(.212, 24)}, orders,
                       noise=0.005)["verdict"] == "worse"
    # the selected single teacher is the one-shot run itself: not a competitor of its own
    alone = comparison_orders(selection(["t2"]), {"t2": .3})
    assert order_check({"progressive": record(.2, 12), "one_shot": record(.2, 12)}, alone)["verdict"] == "best"


def test_seed_study_reports_the_support_of_each_choice_and_how_often_a_supported_choice_was_best(tmp_path):
    from pkdkit.files import write_json

    orders = comparison_orders(selection(["t1", "t2"]), {"t1": .2, "t2": .3})
    reports = []
    # seed 0: supported and clearly best; seed 1: supported but beaten beyond the noise; seed 2: a coin toss
    for seed, (ap, support) in enumerate([(.30, .9), (.20, .85), (.24, .55)]):
        records = {"baseline": record(.1, 12), "progressive": record(ap, 24), "one_shot": record(.22, 12),
                   "one_shot_long": record(.25 + .001 * seed, 24), "reversed": record(.24 - .001 * seed, 24)}
        check = order_check(records, orders)
        share = {"share": support, "supported": support >= .8, "runner_up": ["t2"], "runner_up_share": 1 - support,
                 "resamples": 200}
        metrics = {"parameters": {"seed": seed}, "run_dir": str(tmp_path / f"run{seed}"),
                   "evaluation": {n: r["metrics"]["bbox"]["stats"] for n, r in records.items()},
                   "comparison": {"runs": {n: {"budget": r["config"]["budget"]} for n, r in records.items()},
                                  "order_check": check}}
        if seed < 2:
            metrics["selection"] = {"order": ["t1", "t2"], "order_support": share}
        else:  # the support only in the run directory's selection.json
            sel = selection(["t1", "t2"])
            sel.order_support = share
            from pkdkit.ordering import CostMatrix, save_selection
            save_selection(sel, CostMatrix(["student", "t1", "t2"], [[0.0] * 3] * 3, ["p3"]),
                           tmp_path / f"run{seed}" / "selection" / "selection.json")
        write_json(metrics, tmp_path / f"s{seed}" / "metrics.json")
        reports.append(tmp_path / f"s{seed}")
    study = seed_study(reports)
    checks = study["order_checks"]
    assert [c["support"]["share"] for c in checks] == [.9, .85, .55]
    assert [c["verdict"] for c in checks] == ["best", "worse", "no difference shown"]
    assert checks[0]["noise_source"] == "the spread over these 3 seeds" and checks[0]["noise"] > 0.01
    assert "| 0 | t1 → t2 | 30.0 |" in study["order_table"] and "| 90% | best |" in study["order_table"]
    assert "| 55% | no difference shown |" in study["order_table"]
    summary = study["selection_check"]
    assert (summary["with_support"], summary["supported"], summary["supported_best"],
            summary["supported_within_noise"]) == (3, 2, 1, 1)
    assert "2 of the 3 seeds with a recorded support; the best order run in 1 of them" in summary["text"]
