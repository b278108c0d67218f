"""The two figures a reader compares methods with: a forest plot of the seed-paired differences against SAM
k=1 (one row per method, equal epochs and equal compute side by side, the ±1 point band drawn), and
accuracy against passes per step (one panel per task and budget, labels spread so none overlaps, the
Pareto front drawn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .verdicts import MARGIN

BUDGET_STYLE = {"epochs": ("o", "tab:blue", "equal epochs"), "compute": ("s", "tab:orange", "equal compute")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def forest_plot(verdicts: pd.DataFrame, path: Path) -> None:
    """Per task, each method's mean difference to SAM k=1 with its 95% interval, one row per method (and
    rho), the two budgets offset in the row; the ±1 point band shaded, 0 dashed."""
    plt = _plt()
    tasks = list(dict.fromkeys(verdicts["task"]))
    rows_of = {t: list(dict.fromkeys(zip(*_row_keys(verdicts[verdicts["task"] == t]), strict=True))) for t in tasks}
    height = max(len(r) for r in rows_of.values())
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 0.45 * height + 1.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        part = verdicts[verdicts["task"] == task]
        keys = rows_of[task]
        ax.axvspan(-100 * MARGIN, 100 * MARGIN, color="grey", alpha=0.15, label="±1 point")
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        for budget, (marker, color, label) in BUDGET_STYLE.items():
            rows = part[part["budget"] == budget]
            offset = -0.15 if budget == "epochs" else 0.15
            ys = [keys.index(k) + offset for k in zip(*_row_keys(rows), strict=True)]
            x = 100 * rows["difference"].to_numpy()
            low, high = 100 * rows["low"].to_numpy(), 100 * rows["high"].to_numpy()
            ax.errorbar(x, ys, xerr=[x - low, high - x], fmt=marker, color=color, capsize=2, markersize=4, label=label)
        ax.set_yticks(range(len(keys)), [name for name, _ in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("validation accuracy − SAM k=1 (points), 95% interval over seeds")
        ax.set_title(f"{task}: against SAM k=1", fontsize=9)
        ax.grid(axis="x", alpha=0.3)

    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # room for the legend under the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row_keys(rows: pd.DataFrame) -> tuple[list[str], list[float]]:
    """A row per method, and per rho where the grid has several (AdamW is paired at every rho)."""
    several = rows["rho"].nunique() > 1
    names = [f"{m} (rho {r:g})" if several else m for m, r in zip(rows["method"], rows["rho"], strict=True)]
    return names, list(rows["rho"])


def spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights as close to ``ys`` as possible with at least ``gap`` between neighbours (order kept):
    labels pushed together form a block, centred on its points; a label with room stays at its point."""
    order = np.argsort(ys)
    wanted = np.asarray(ys, dtype=float)[order]
    blocks: list[list[int]] = []  # runs of labels that touch, each centred on its points
    for i in range(len(wanted)):
        blocks.append([i])
        while len(blocks) > 1:
            low, high = blocks[-2], blocks[-1]
            top_of_low = _block_start(wanted, low, gap) + gap * (len(low) - 1)
            if _block_start(wanted, high, gap) >= top_of_low + gap:
                break
            blocks[-2:] = [low + high]  # they overlap: one block
    placed = np.empty_like(wanted)
    for block in blocks:
        start = _block_start(wanted, block, gap)
        placed[block] = start + gap * np.arange(len(block))
    out = np.empty_like(placed)
    out[order] = placed
    return out.tolist()


def _block_start(wanted: np.ndarray, block: list[int], gap: float) -> float:
    """The lowest label of a block of evenly spaced labels centred on its points."""
    return float(np.mean(wanted[block]) - gap * (len(block) - 1) / 2)


def compute_plot(points: pd.DataFrame, path: Path) -> None:
    """Accuracy (95% interval) against forward+backward passes per optimizer step, a panel per task and
    budget; the labels stand right of each passes column, spread apart, with a line to their point; the
    dashed step is the Pareto front of the panel (no other point as cheap per step and more accurate)."""
    plt = _plt()
    tasks = list(dict.fromkeys(points["task"]))
    budgets = [b for b in BUDGET_STYLE if b in set(points["budget"])]
    fig, axes = plt.subplots(len(tasks), len(budgets), figsize=(6.2 * len(budgets), 4.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, budget in enumerate(budgets):
            ax = axes[i][j]
            part = points[(points["task"] == task) & (points["budget"] == budget)].reset_index(drop=True)
            marker, color, label = BUDGET_STYLE[budget]
            span = max(float(part["high"].max() - part["low"].min()), 1e-3)
            for x, column in part.groupby("passes_per_step"):
                column = column.sort_values("accuracy")
                dodge = 0.07 * (np.arange(len(column)) - (len(column) - 1) / 2)  # intervals side by side
                ax.errorbar(
                    column["passes_per_step"] + dodge, column["accuracy"],
                    yerr=[column["accuracy"] - column["low"], column["high"] - column["accuracy"]],
                    fmt=marker, color=color, capsize=2, markersize=4,
                )  # fmt: skip
                heights = spread_labels(list(column["accuracy"]), gap=0.045 * span)
                text_x = x + 0.035 * len(column) + 0.12
                for (_, row), y, dx in zip(column.iterrows(), heights, dodge, strict=True):
                    ax.annotate(
                        row["method"], (x + dx, row["accuracy"]), xytext=(text_x, y), fontsize=6.5, va="center",
                        arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5},
                    )  # fmt: skip
            front = part[part["on_front"]].sort_values("passes_per_step")  # pareto.csv's front, as it is
            ax.step(front["passes_per_step"], front["accuracy"], where="post", color="grey", linestyle="--",
                    linewidth=1, label="Pareto front")  # fmt: skip
            ax.set_xlim(part["passes_per_step"].min() - 0.3, part["passes_per_step"].max() + 1.2)
            ax.set_xlabel("forward+backward passes per optimizer step")
            ax.set_ylabel("validation accuracy")
            ax.set_title(f"{task}, {label}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
