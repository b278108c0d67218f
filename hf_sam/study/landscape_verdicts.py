"""Verdicts on the loss landscape, not only on accuracy: is a method's minimum flatter or sharper than SAM k=1's?

The paper's central claim is that single-step and multi-step SAM reach distinct landscapes. Every method is
paired with SAM k=1 on the same task, budget, rho and seed, and for each sharpness measure the seed-paired
ratio method / SAM k=1 is summarized as a geometric mean with a 95% Student t interval (on the log ratios, so
that 0.5 and 2 are the same distance from 1). The word comes from the interval alone: *flatter* when all of
it lies below 1, *sharper* when all of it lies above 1, *the same within ±10%* when all of it lies inside
[1/1.1, 1.1], and *no difference shown* otherwise. A measure that is not positive in every pair (a training
sharpness that dropout noise made negative, AdamW's, which makes no SAM pass) gets no ratio.
"""

from __future__ import annotations

import math

import pandas as pd

from .verdicts import REFERENCE, paired_interval

MEASURES = {  # column: what the report calls it
    "hessian_top_eigenvalue": "λ_max",
    "hessian_trace": "tr(H)",
    "m_sharpness": "m-sharpness",
    "train_sam_sharpness": "training sharpness",
}
SAME = 1.1  # "the same within ±10%": the whole ratio interval inside [1/1.1, 1.1]
FLATTER, SHARPER, THE_SAME, UNRESOLVED = "flatter", "sharper", "the same within ±10%", "no difference shown"


def ratio_verdict(low: float, high: float, same: float = SAME) -> str:
    """The word a ratio interval allows (see the module's docstring)."""
    if math.isnan(low) or math.isnan(high):
        return "too few seeds"
    if high < 1:
        return FLATTER
    if low > 1:
        return SHARPER
    if 1 / same <= low and high <= same:
        return THE_SAME
    return UNRESOLVED


def paired_ratio(own: list[float], reference: list[float]) -> tuple[float, float, float] | None:
    """(geometric mean, low, high) of own / reference over the pairs, or None where a value is not positive."""
    if not all(a > 0 and b > 0 for a, b in zip(own, reference, strict=True)):
        return None
    mean, low, high = paired_interval([math.log(a / b) for a, b in zip(own, reference, strict=True)])
    return math.exp(mean), math.exp(low), math.exp(high)


def landscape_table(data: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, budget, method != SAM k=1, rho, measure) with pairs, ratio, interval and verdict.

    ``data``: one row per run and budget (task, budget, method, rho, seed and the measure columns present).
    AdamW, which has no rho, is paired with SAM at every rho of the grid, as in the accuracy verdicts.
    """
    rows = []
    measures = [m for m in MEASURES if m in data.columns]
    for (task, budget), part in data.groupby(["task", "budget"], sort=False):
        reference = part[part["method"] == REFERENCE]
        for method, runs in part[part["method"] != REFERENCE].groupby("method", sort=False):
            for rho in sorted(reference["rho"].unique()) if method == "adamw" else sorted(runs["rho"].unique()):
                ref = reference[reference["rho"] == rho].set_index("seed")
                own = (runs if method == "adamw" else runs[runs["rho"] == rho]).set_index("seed")
                seeds = sorted(set(ref.index) & set(own.index))
                for measure in measures:
                    pairs = [
                        (float(own.at[s, measure]), float(ref.at[s, measure]))
                        for s in seeds
                        if pd.notna(own.at[s, measure]) and pd.notna(ref.at[s, measure])
                    ]
                    if not pairs:
                        continue
                    ratio = paired_ratio([a for a, _ in pairs], [b for _, b in pairs])
                    ratio_, low, high = ratio if ratio else (math.nan, math.nan, math.nan)
                    rows.append(
                        {
                            "task": task, "budget": budget, "method": method, "rho": rho, "measure": measure,
                            "pairs": len(pairs), "ratio": ratio_, "low": low, "high": high,
                            "verdict": ratio_verdict(low, high) if ratio else "not positive in every pair",
                        }
                    )  # fmt: skip
    return pd.DataFrame(
        rows, columns=["task", "budget", "method", "rho", "measure", "pairs", "ratio", "low", "high", "verdict"]
    )


def landscape_markdown(table: pd.DataFrame) -> list[str]:
    """The landscape verdicts as Markdown: one row per method, one column per measure."""
    if table.empty:
        return ["No method shares seeds and measures with SAM k=1: no landscape verdicts.", ""]
    measures = [m for m in MEASURES if m in set(table["measure"])]
    lines = [
        "| task | budget | method | rho | seeds | " + " | ".join(f"{MEASURES[m]} ratio [95%]" for m in measures) + " |",
        "|---|---|---|---|---|" + "---|" * len(measures),
    ]
    keys = ["task", "budget", "method", "rho"]
    for key, part in table.groupby(keys, sort=False):
        by_measure = part.set_index("measure")
        cells = []
        for m in measures:
            if m not in by_measure.index:
                cells.append("")
                continue
            row = by_measure.loc[m]
            if math.isnan(row["low"]):
                cells.append(row["verdict"])
            else:
                cells.append(f"{row['ratio']:.2f} [{row['low']:.2f}, {row['high']:.2f}] {row['verdict']}")
        task, budget, method, rho = key
        lines.append(
            f"| {task} | {budget} | `{method}` | {rho:g} | {int(part['pairs'].max())} | " + " | ".join(cells) + " |"
        )
    return [*lines, ""]


def agreement(landscape: pd.DataFrame, accuracy: pd.DataFrame) -> list[str]:
    """Whether the landscape and the accuracy verdicts tell the same story, method by method: a method judged
    flatter on λ_max should not be worse in accuracy if flatness is what generalizes."""
    if landscape.empty or accuracy.empty:
        return []
    keys = ["task", "budget", "method", "rho"]
    eig = landscape[landscape["measure"] == "hessian_top_eigenvalue"].set_index(keys)["verdict"]
    acc = accuracy.set_index(keys)["verdict"]
    pairs = [(key, eig[key], acc[key]) for key in eig.index if key in acc.index]
    if not pairs:
        return []
    agree = sum(
        (e == FLATTER and a == "better") or (e == SHARPER and a == "worse") or (e == THE_SAME and "equivalent" in a)
        for _, e, a in pairs
    )
    clash = [
        f"`{key[2]}` on {key[0]} ({key[1]}): λ_max {e}, accuracy {a}"
        for key, e, a in pairs
        if (e == FLATTER and a == "worse") or (e == SHARPER and a == "better")
    ]
    lines = [
        f"λ_max and accuracy agree (flatter and better, sharper and worse, the same and equivalent) in {agree} of "
        f"{len(pairs)} comparisons; they contradict each other (flatter yet worse, or sharper yet better) in "
        f"{len(clash)}; the rest leave one side unresolved."
    ]
    lines += [f"- {c}" for c in clash]
    return [*lines, ""]
