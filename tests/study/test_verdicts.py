"""The study's verdicts on synthetic runs with known differences: an equivalence case, a resolved case, a
failed seed (named, and the verdict without it), and the +-1 point target's summary with the seeds needed."""

import math

import pandas as pd
import pytest
from scipy import stats

from hf_sam.study.verdicts import (
    EQUIVALENT,
    failed_runs,
    markdown,
    seeds_needed,
    target_summary,
    verdict,
    verdict_table,
)


def _runs(accuracies: dict[str, list[float]], labels: int = 10, losses: dict | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"task": "t", "budget": "epochs", "method": m, "rho": 0.05, "seed": s, "eval_accuracy": a,
             "num_labels": labels, "train_loss": (losses or {}).get((m, s), 0.3)}
            for m, accs in accuracies.items()
            for s, a in enumerate(accs)
        ]
    )  # fmt: skip


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    assert verdict(-0.004, 0.006) == EQUIVALENT
    assert verdict(-0.012, 0.006) == "no difference shown"  # straddles 0 and leaves the margin
    assert verdict(0.001, 0.008) == "better"  # resolved beats equivalent
    # ten seeds whose differences to SAM are +-0.002 around 0: t interval well inside +-0.01
    sam = [0.90 + 0.01 * i for i in range(10)]
    other = [a + (0.002 if i % 2 else -0.002) for i, a in enumerate(sam)]
    row = verdict_table(_runs({"sam": sam, "normalized-k2": other})).iloc[0]
    assert row["verdict"] == EQUIVALENT and row["half_width"] < 0.01


def test_resolved_difference_and_its_half_width():
    sam = [0.80, 0.82, 0.81, 0.79, 0.83]
    adamw = [a - 0.05 + d for a, d in zip(sam, [0.004, -0.003, 0.001, 0.0, -0.002], strict=True)]
    row = verdict_table(_runs({"sam": sam, "adamw": adamw})).iloc[0]
    ci = stats.ttest_rel(adamw, sam).confidence_interval(0.95)
    assert row["verdict"] == "worse"
    assert row["half_width"] == pytest.approx((ci.high - ci.low) / 2, rel=1e-9)


def test_a_failed_seed_is_named_and_the_verdict_without_it_is_given():
    sam = [0.90, 0.91, 0.92, 0.905, 0.915]
    lookbehind = [0.90, 0.912, 0.919, 0.904, 0.10]  # seed 4 stalled at chance (10 labels)
    losses = {("lookbehind-k2", 4): 2.30}
    runs = _runs({"sam": sam, "lookbehind-k2": lookbehind}, losses=losses)
    failed = failed_runs(runs)
    assert list(failed["seed"]) == [4] and list(failed["method"]) == ["lookbehind-k2"]
    assert "stalled" in failed.iloc[0]["cause"] and failed.iloc[0]["chance"] == pytest.approx(0.1)
    row = verdict_table(runs, failed=failed).iloc[0]
    assert row["verdict"] == "no difference shown"  # the failed seed widens the interval past everything
    assert row["without_failed"].startswith(EQUIVALENT)
    text = "\n".join(markdown(verdict_table(runs, failed=failed)))
    assert "without failed runs" in text


def test_a_diverged_run_is_failed_whatever_its_accuracy():
    runs = _runs({"sam": [0.9, 0.9], "msam": [0.5, 0.9]}, losses={("msam", 0): math.nan})
    failed = failed_runs(runs)
    assert list(zip(failed["method"], failed["seed"], failed["cause"], strict=True)) == [
        ("msam", 0, "training loss not finite")
    ]


def test_target_summary_names_the_misses_and_the_seeds_they_need():
    sam = [0.80, 0.85, 0.78, 0.83]
    wide = [0.82, 0.80, 0.81, 0.86]
    table = verdict_table(_runs({"sam": sam, "xsam-k3": wide}))
    lines = target_summary(table)
    assert lines[0].startswith("0 of 1 intervals have a half-width of at most 1 point")
    sd = table.iloc[0]["sd"]
    need = seeds_needed(sd)
    assert f"about {need} seeds" in lines[-1]
    # the seeds needed bring the half-width under the margin, one fewer does not
    half = lambda n: stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)  # noqa: E731
    assert half(need) <= 0.01 < half(need - 1)


def test_labels_are_spread_apart_in_their_points_order():
    from hf_sam.study.comparison_figures import spread_labels

    ys = [0.70, 0.701, 0.702, 0.60, 0.703]
    placed = spread_labels(ys, gap=0.01)
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    heights = [placed[i] for i in order]
    assert all(b - a >= 0.01 - 1e-12 for a, b in zip(heights, heights[1:], strict=False))
    assert placed[3] == pytest.approx(0.60)  # a label with room stays at its point
    assert abs(sum(placed) / len(placed) - sum(ys) / len(ys)) < 0.02  # the block stays near its points
