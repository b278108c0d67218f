"""Verdicts a reader can trust: every method against SAM k=1 on the same task, budget and rho, as
the mean of seed-paired differences with a 95% Student t interval, and the word the interval allows."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

REFERENCE = "sam"


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of paired differences (t interval; needs at least 2 pairs)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """From the interval alone: better, worse, or no difference shown."""
    if math.isnan(low) or math.isnan(high):
        return "too few seeds"
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "no difference shown"


def verdict_table(data: pd.DataFrame, value: str = "eval_accuracy") -> pd.DataFrame:
    """One row per (task, budget, method != SAM k=1): pairs, mean difference, 95% interval, verdict.

    ``data`` has one row per run and budget (columns task, budget, method, rho, seed, ``value``).
    Methods are paired with SAM k=1 of the same task, budget and seed; SAM's rho is the method's own
    (AdamW, which has no rho, is paired with SAM at every rho of the grid).
    """
    rows = []
    for (task, budget), part in data.groupby(["task", "budget"], sort=False):
        reference = part[part["method"] == REFERENCE]
        for method, runs in part[part["method"] != REFERENCE].groupby("method", sort=False):
            for rho in sorted(reference["rho"].unique()) if method == "adamw" else sorted(runs["rho"].unique()):
                ref = reference[reference["rho"] == rho].set_index("seed")[value]
                own = runs if method == "adamw" else runs[runs["rho"] == rho]
                own = own.set_index("seed")[value]
                seeds = sorted(set(ref.index) & set(own.index))
                if not seeds:
                    continue
                mean, low, high = paired_interval([float(own[s] - ref[s]) for s in seeds])
                rows.append(
                    {
                        "task": task, "budget": budget, "method": method, "rho": rho, "pairs": len(seeds),
                        "difference": mean, "low": low, "high": high, "verdict": verdict(low, high),
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> list[str]:
    """The verdict table as Markdown lines."""
    if table.empty:
        return ["No method shares seeds with SAM k=1: no verdicts.", ""]
    lines = [
        "| task | budget | method | rho | seeds | accuracy − SAM k=1 | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        interval = "n/a" if math.isnan(row.low) else f"[{row.low:+.4f}, {row.high:+.4f}]"
        lines.append(
            f"| {row.task} | {row.budget} | `{row.method}` | {row.rho:g} | {row.pairs} | {row.difference:+.4f} "
            f"| {interval} | {row.verdict} |"
        )
    return [*lines, ""]
