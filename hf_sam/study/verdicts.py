"""Verdicts a reader can trust: every method against SAM k=1 on the same task, budget and rho, as
the mean of seed-paired differences with a 95% Student t interval, and the word the interval allows:
better, worse, equivalent within +-1 accuracy point (the whole interval inside the margin), or no
difference shown. Runs that failed (ended at chance, diverged) are named, and the verdicts are computed
with them and, where that changes the word, without them."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

REFERENCE = "sam"
MARGIN = 0.01  # +-1 accuracy point: the interval half-width the study aims for, and the equivalence margin
EQUIVALENT = "equivalent within ±1 point"
CHANCE_SLACK = 0.02  # an accuracy within 2 points of chance is a run that learned nothing


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of paired differences (t interval; needs at least 2 pairs)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, higher_is_better: bool = True, margin: float = MARGIN) -> str:
    """From the interval alone: better or worse when it excludes 0, equivalent when it lies inside
    [-margin, +margin], else no difference shown."""
    if math.isnan(low) or math.isnan(high):
        return "too few seeds"
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    if -margin <= low and high <= margin:
        return EQUIVALENT
    return "no difference shown"


def seeds_needed(sd: float, margin: float = MARGIN, confidence: float = 0.95) -> int:
    """About how many seed pairs bring the half-width to ``margin`` at this spread of the differences."""
    if not sd > 0:
        return 2
    n = 2
    while stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) > margin and n < 10_000:
        n += 1
    return n


def failed_runs(data: pd.DataFrame, value: str = "eval_accuracy") -> pd.DataFrame:
    """The runs that learned nothing: accuracy within CHANCE_SLACK of chance (1 / labels, where the run
    recorded its label count) or a non-finite training loss; with the cause where the logs tell it."""
    rows = []
    for run in data.itertuples(index=False):
        record = run._asdict()
        labels = record.get("num_labels")
        chance = 1.0 / labels if labels and labels == labels else math.nan
        loss = record.get("train_loss")
        accuracy = record.get(value)
        at_chance = not math.isnan(chance) and accuracy is not None and accuracy <= chance + CHANCE_SLACK
        diverged = loss is not None and not math.isfinite(float(loss))
        if not (at_chance or diverged):
            continue
        skipped = record.get("train_sam_skipped_ascents") or 0.0
        if diverged:
            cause = "training loss not finite"
        elif skipped and skipped > 0:
            cause = f"non-finite ascents dropped ({skipped:.0f} on average in the logs)"
        elif not math.isnan(chance) and loss is not None and float(loss) >= 0.95 * math.log(labels):
            cause = f"stalled: training loss {float(loss):.3f} against ln({labels:.0f}) = {math.log(labels):.3f}"
        else:
            cause = f"ended at chance with training loss {float(loss):.3f}" if loss is not None else "ended at chance"
        rows.append(
            {
                "task": record["task"], "budget": record["budget"], "method": record["method"], "rho": record["rho"],
                "seed": record["seed"], value: accuracy, "chance": chance, "cause": cause,
            }
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["task", "budget", "method", "rho", "seed", value, "chance", "cause"])


def verdict_table(data: pd.DataFrame, value: str = "eval_accuracy", failed: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (task, budget, method != SAM k=1): pairs, mean difference, 95% interval, its
    half-width, the verdict, and (with ``failed``) the verdict without the failed runs where it differs.

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
                differences = [float(own[s] - ref[s]) for s in seeds]
                mean, low, high = paired_interval(differences)
                sd = float(pd.Series(differences).std()) if len(seeds) > 1 else math.nan
                row = {
                    "task": task, "budget": budget, "method": method, "rho": rho, "pairs": len(seeds),
                    "difference": mean, "low": low, "high": high, "half_width": (high - low) / 2,
                    "sd": sd, "verdict": verdict(low, high), "without_failed": "",
                }  # fmt: skip
                bad = _failed_seeds(failed, task, budget, rho, method)
                kept = [s for s in seeds if s not in bad]
                if bad & set(seeds) and len(kept) >= 2:
                    _, low2, high2 = paired_interval([float(own[s] - ref[s]) for s in kept])
                    if verdict(low2, high2) != row["verdict"]:
                        row["without_failed"] = f"{verdict(low2, high2)} [{low2:+.4f}, {high2:+.4f}]"
                rows.append(row)
    return pd.DataFrame(rows)


def _failed_seeds(failed: pd.DataFrame | None, task: str, budget: str, rho: float, method: str) -> set:
    """Seeds whose run of ``method`` or of SAM k=1 (the pair's other side) failed."""
    if failed is None or failed.empty:
        return set()
    part = failed[(failed["task"] == task) & (failed["budget"] == budget)]
    mine = part[(part["method"] == method) & ((part["rho"] == rho) | (method == "adamw"))]
    reference = part[(part["method"] == REFERENCE) & (part["rho"] == rho)]
    return set(mine["seed"]) | set(reference["seed"])


def markdown(table: pd.DataFrame) -> list[str]:
    """The verdict table as Markdown lines, with the +-1 point target's summary after it."""
    if table.empty:
        return ["No method shares seeds with SAM k=1: no verdicts.", ""]
    without = "without_failed" in table and (table["without_failed"] != "").any()
    lines = [
        "| task | budget | method | rho | seeds | accuracy − SAM k=1 | 95% interval | ± | verdict |"
        + (" without failed runs |" if without else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if without else ""),
    ]
    for row in table.itertuples():
        interval = "n/a" if math.isnan(row.low) else f"[{row.low:+.4f}, {row.high:+.4f}]"
        half = "n/a" if math.isnan(row.half_width) else f"{row.half_width:.4f}"
        lines.append(
            f"| {row.task} | {row.budget} | `{row.method}` | {row.rho:g} | {row.pairs} | {row.difference:+.4f} "
            f"| {interval} | {half} | {row.verdict} |" + (f" {row.without_failed} |" if without else "")
        )
    return [*lines, "", *target_summary(table), ""]


def target_summary(table: pd.DataFrame, margin: float = MARGIN) -> list[str]:
    """Which verdicts missed the +-margin half-width, and why: the spread of their paired differences,
    with the seeds that spread would need."""
    missed = table[~(table["half_width"] <= margin)]
    words = table["verdict"].value_counts()
    counts = ", ".join(f"{n} {word}" for word, n in words.items())
    # (a half-width, not the equivalence verdict, which needs the whole interval inside the margin)
    lines = [
        f"{len(table) - len(missed)} of {len(table)} intervals have a half-width of at most {100 * margin:g} point "
        f"({counts})."
    ]
    if missed.empty:
        return lines
    lines.append(
        f"Missed the ±{100 * margin:g} point target (half-width above {margin:g}): the paired differences spread "
        "too much for the seeds run (sd of the difference, and about the seed pairs it would need):"
    )
    for row in missed.itertuples():
        need = "n/a" if math.isnan(row.sd) else f"sd {row.sd:.4f}, about {seeds_needed(row.sd, margin)} seeds"
        lines.append(
            f"- {row.task}, {row.budget}, `{row.method}`: ± {row.half_width:.4f} with {row.pairs} seeds ({need})"
        )
    return lines


def failed_markdown(failed: pd.DataFrame, value: str = "eval_accuracy") -> list[str]:
    """The failed runs as Markdown lines (none: one line that says so)."""
    if failed.empty:
        return ["No run ended at chance or diverged.", ""]
    lines = [
        "| task | budget | method | rho | seed | accuracy | chance | cause |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in failed.itertuples():
        lines.append(
            f"| {row.task} | {row.budget} | `{row.method}` | {row.rho:g} | {row.seed} | {getattr(row, value):.4f} "
            f"| {row.chance:.4f} | {row.cause} |"
        )
    return [*lines, ""]
