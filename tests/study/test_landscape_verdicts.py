"""Landscape verdicts: the seed-paired ratio of each sharpness measure against SAM k=1, checked against a second
computation (numpy and scipy's t interval on the log ratios) and closed-form cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hf_sam.study.landscape_verdicts import (
    FLATTER,
    SHARPER,
    THE_SAME,
    UNRESOLVED,
    agreement,
    landscape_markdown,
    landscape_table,
)

SEEDS = range(6)


def _runs(method: str, lam: list[float], trace: list[float], budget: str = "epochs") -> list[dict]:
    return [
        {"task": "t", "budget": budget, "method": method, "rho": 0.05, "seed": s,
         "hessian_top_eigenvalue": lam[s], "hessian_trace": trace[s]}
        for s in SEEDS
    ]  # fmt: skip


def _data() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    sam_lam = list(50 + 10 * rng.random(6))
    sam_trace = list(500 + 50 * rng.random(6))
    rows = _runs("sam", sam_lam, sam_trace)
    rows += _runs("normalized-k3", [x * 0.5 * (1 + 0.01 * rng.standard_normal()) for x in sam_lam], sam_trace)
    rows += _runs("normalized-k2", [x * (1 + 0.01 * rng.standard_normal()) for x in sam_lam],
                  [x * math.exp(0.5 * rng.standard_normal()) for x in sam_trace])  # fmt: skip
    rows += _runs("adamw", [x * 3 for x in sam_lam], [-1.0] + sam_trace[1:])
    return pd.DataFrame(rows)


def test_ratios_match_a_second_computation_and_their_words():
    data = _data()
    table = landscape_table(data).set_index(["method", "measure"])
    sam = data[data["method"] == "sam"].set_index("seed")
    for method in ("normalized-k3", "normalized-k2"):
        own = data[data["method"] == method].set_index("seed")
        logs = np.log(own["hessian_top_eigenvalue"] / sam["hessian_top_eigenvalue"])
        low, high = stats.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=stats.sem(logs))
        row = table.loc[(method, "hessian_top_eigenvalue")]
        assert row["ratio"] == pytest.approx(math.exp(logs.mean()), rel=1e-12)
        assert (row["low"], row["high"]) == pytest.approx((math.exp(low), math.exp(high)), rel=1e-12)
    assert table.loc[("normalized-k3", "hessian_top_eigenvalue"), "verdict"] == FLATTER
    assert table.loc[("normalized-k3", "hessian_trace"), "ratio"] == pytest.approx(1.0)  # the same values
    assert table.loc[("normalized-k3", "hessian_trace"), "verdict"] == THE_SAME
    assert table.loc[("normalized-k2", "hessian_top_eigenvalue"), "verdict"] == THE_SAME
    assert table.loc[("normalized-k2", "hessian_trace"), "verdict"] == UNRESOLVED
    assert table.loc[("adamw", "hessian_top_eigenvalue"), "verdict"] == SHARPER
    assert table.loc[("adamw", "hessian_trace"), "verdict"] == "not positive in every pair"
    assert "m_sharpness" not in set(landscape_table(data)["measure"]), "a measure the runs lack gets no row"


def test_report_lines_and_agreement_with_the_accuracy_verdicts():
    table = landscape_table(_data())
    lines = landscape_markdown(table)
    assert lines[0].startswith("| task | budget | method | rho | seeds | λ_max ratio [95%] | tr(H) ratio [95%] |")
    assert any("`normalized-k3`" in line and FLATTER in line for line in lines)
    accuracy = pd.DataFrame(
        [{"task": "t", "budget": "epochs", "method": m, "rho": 0.05, "verdict": v}
         for m, v in (("normalized-k3", "worse"), ("normalized-k2", "equivalent within ±1 point"), ("adamw", "worse"))]
    )  # fmt: skip
    said = " ".join(agreement(table, accuracy))
    assert "agree (flatter and better, sharper and worse, the same and equivalent) in 2 of 3" in said
    assert "contradict each other (flatter yet worse, or sharper yet better) in 1" in said
    assert "`normalized-k3` on t (epochs): λ_max flatter, accuracy worse" in said


def test_verdicts_csv_carries_each_measure_beside_the_accuracy_verdict():
    from hf_sam.study.report import with_landscape

    data = _data()
    accuracy = pd.DataFrame(
        [{"task": "t", "budget": "epochs", "method": m, "rho": 0.05, "verdict": "better"}
         for m in ("normalized-k3", "normalized-k2", "adamw")]
    )  # fmt: skip
    merged = with_landscape(accuracy, landscape_table(data)).set_index("method")
    assert merged.loc["normalized-k3", "hessian_top_eigenvalue_verdict"] == FLATTER
    assert merged.loc["normalized-k3", "verdict"] == "better"
    assert math.isnan(merged.loc["adamw", "hessian_trace_ratio"])
    assert merged.loc["adamw", "hessian_trace_verdict"] == "not positive in every pair"
