"""The study's tables: the finished runs, their budgets, the per-method summary, Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .grid import RunSpec, StudyConfig, parse_method


def load_runs(root: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/metrics.json"))]
    return pd.DataFrame(rows)


def with_budgets(df: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """One row per (run, budget it belongs to): k=1 runs count for both budgets."""
    parts = []
    for budget in config.budgets:
        keep = []
        for _, row in df.iterrows():
            spec = RunSpec(
                row.task, row.method, row.rho, int(row.seed), row.budget, float(row.epochs), float(row.base_epochs)
            )
            keep.append(spec.in_budget(budget))
        part = df[np.array(keep, dtype=bool)].copy()
        part["budget"] = budget
        parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else df
    out["family"] = [parse_method(m).family for m in out["method"]]
    return out


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    columns = [
        "eval_accuracy",
        "m_sharpness",
        "hessian_top_eigenvalue",
        "hessian_trace",
        "train_sam_sharpness",
        "forward_backward_passes",
        "train_seconds",
    ]
    columns = [c for c in columns if c in df]
    grouped = df.groupby(["task", "budget", "method", "family", "ascent_steps", "rho"], sort=False)
    summary = grouped[columns].agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    summary["seeds"] = grouped.size()
    return summary.reset_index().sort_values(["task", "budget", "ascent_steps", "method"])


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append("" if np.isnan(value) else f"{value:.{digits}g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _passes_per_step(runs: pd.DataFrame) -> float:
    """Forward+backward passes per optimizer step, rounded to a tenth (k + 1 for SAM, 1 + k/n for LookSAM)."""
    if "optimizer_steps" not in runs:
        return float("nan")
    return round(float((runs["forward_backward_passes"] / runs["optimizer_steps"]).mean()), 1)


def pareto_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, budget, method): mean passes, mean accuracy with its 95% t interval over seeds,
    and whether the point is on the Pareto front of its task and budget (no other point there has at most its passes
    per step and a higher accuracy)."""
    from scipy import stats

    rows = []
    for (task, budget, method, family), runs in df.groupby(["task", "budget", "method", "family"], sort=False):
        accuracy = runs["eval_accuracy"].astype(float)
        n, mean = len(accuracy), float(accuracy.mean())
        half = float(stats.t.ppf(0.975, n - 1) * accuracy.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        rows.append(
            {
                "task": task, "budget": budget, "method": method, "family": family, "seeds": n,
                "passes": float(runs["forward_backward_passes"].mean()), "accuracy": mean,
                "passes_per_step": _passes_per_step(runs),
                "low": mean - half, "high": mean + half,
            }
        )  # fmt: skip
    points = pd.DataFrame(rows)
    if points.empty:
        return points.assign(on_front=[])
    # one front per task and budget (the figure's panel): no other point as cheap per step and more accurate
    panels = {key: part for key, part in points.groupby(["task", "budget"])}
    points["on_front"] = [
        not ((other["passes_per_step"] <= row.passes_per_step) & (other["accuracy"] > row.accuracy)).any()
        for row, other in ((row, panels[(row.task, row.budget)]) for row in points.itertuples())
    ]
    return points
