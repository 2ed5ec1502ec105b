"""Conclusions phrased from numbers with their spread: a difference inside the noise is "no difference shown".

One training run's AP moves with the seed (and with the CPU type: kernels differ between machines), so two
runs a few tenths of a point apart do not show that one order of teachers is better than another. The noise
a difference of two APs is judged against:

- with a seed study (`pkdkit.workflow.seed_study`), `seed_noise`: sqrt(2) x the pooled sample standard
  deviation over seeds of the runs compared (the spread of a difference of two independent runs);
- else `AP_NOISE`, the same quantity measured once in the 3-seed study of the tiny preset as it was committed
  before this module (reports/experiment-tiny: pooled sample std of AP over its 6 runs and 3 seeds 0.80 AP
  points, so 1.13 points for a difference), used as the single-run noise. The study regenerated since (7 runs,
  every shared run bit-identical) gave 1.08 points, and the one after the loader's per-item generators changed
  every run's weights 0.54 points; the constant is kept (the larger, so the more cautious) so that committed
  verdicts stay reproducible.

`judge_order_check` turns `pkdkit.workflow.order_check`'s numbers into a verdict and a sentence.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

AP_NOISE = 0.0113  # AP (fraction), the single-run noise of a difference of two runs: see the module docstring
AP_NOISE_SOURCE = "the single-run noise of the committed 3-seed study (reports/experiment-tiny)"
VERDICTS = ("best", "no difference shown", "worse")


def seed_noise(runs: Mapping[str, Mapping[str, Any]], names: Sequence[str], stat: str = "AP") -> float | None:
    """sqrt(2) x the pooled sample std over seeds of `stat` of the runs `names` (`seed_study`'s "runs":
    {run: {stat: {"std", "values"}}}), as a fraction; None with fewer than two seeds."""
    stds = [runs[n][stat]["std"] for n in names if n in runs and len(runs[n][stat]["values"]) > 1]
    if not stds:
        return None
    return math.sqrt(2 * sum(s * s for s in stds) / len(stds))


def judge_order_check(check: Mapping[str, Any], noise: float = AP_NOISE,
                      source: str = AP_NOISE_SOURCE) -> dict[str, Any]:
    """The verdict on an order check (`pkdkit.workflow.order_check`: "selected", "selected_ap", "best_run",
    "best_order", "best_ap", "aps" {run: AP of each order run}, "same_run" [runs that are the selected run]):
    {"noise", "noise_source", "gap" (best AP - selected AP), "verdict", "sentence"}.

    verdict: "worse" when the best order run's AP is more than `noise` above the selected one's; "best"
    when the selected order is more than `noise` above every other order run; else "no difference shown".
    """
    gap = check["best_ap"] - check["selected_ap"]
    others = {n: ap for n, ap in check.get("aps", {}).items()
              if n != "progressive" and n not in check.get("same_run", [])}
    runner = max(others, key=others.get) if others else None
    lead = check["selected_ap"] - others[runner] if runner else math.inf
    noise_text = f"the noise of {100 * noise:.1f} AP points ({source})"
    selected = f"Selected order {' → '.join(check['selected'])}: AP {100 * check['selected_ap']:.1f}."
    if gap > noise:
        verdict = "worse"
        text = (f"{selected} Best of the orders run: `{check['best_run']}` ({' → '.join(check['best_order'])}), "
                f"AP {100 * check['best_ap']:.1f}, {100 * gap:.1f} points higher, beyond {noise_text}: the selected "
                "order was not the best one.")
    elif lead > noise:
        verdict = "best"
        text = (f"{selected} It is the best of the orders run, {100 * lead:.1f} points above the next "
                f"(`{runner}`), beyond {noise_text}." if runner else f"{selected} It is the only order run.")
    else:
        verdict = "no difference shown"
        best = check["best_run"] if gap > 0 else runner
        apart = abs(gap) if gap > 0 else lead
        text = (f"{selected} Best of the other orders run: `{best}`, {100 * apart:.1f} points apart, within "
                f"{noise_text}: no difference shown between the selected order and the best one.")
    return {"noise": noise, "noise_source": source, "gap": gap, "verdict": verdict,
            "sentence": text + " (One seed: read the seed study before concluding anything.)"}
