"""The study's figures (PNG): accuracy and sharpness against k, the loss along the ascent, accuracy
against compute, and the loss landscapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .comparison_figures import compute_plot
from .grid import parse_method
from .tables import pareto_points

FAMILY_COLORS = {
    "adamw": "black",
    "normalized": "tab:blue",
    "projected": "tab:orange",
    "accumulated": "tab:green",
    "mean": "tab:purple",
    "asam": "tab:red",
    "xsam": "tab:brown",
    "xsam-fixed": "tab:pink",
    "lookbehind": "tab:olive",
    "gsam": "tab:cyan",
    "wsam": "darkgoldenrod",
    "friendly": "magenta",
    "looksam": "navy",
    "every-n": "slategray",
    "msam": "lime",
    "late": "teal",
}
MEASURES = [
    ("m_sharpness", "worst-case loss increase in the rho-ball (m=64)"),
    ("hessian_top_eigenvalue", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace (Hutchinson)"),
    ("train_sam_sharpness", "L(w+d_k) - L(w) during training"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines_vs_k(ax, data: pd.DataFrame, value: str) -> None:
    """One line per family present over k (every member of the SAM family, not the rules alone); k = 0 (AdamW) is
    shared by all, and k = 1 (SAM) by the families without a k = 1 run of their own (the rules, mean, XSAM)."""
    adamw = data[data["family"] == "adamw"]
    sam = data[(data["family"] == "normalized") & (data["ascent_steps"] == 1)]
    for family in [f for f in FAMILY_COLORS if f != "adamw" and f in set(data["family"])]:
        own = data[data["family"] == family]
        shared = [adamw] if family == "asam" or (own["ascent_steps"] == 1).any() else [adamw, sam]
        part = pd.concat([*shared, own])
        stats = part.groupby("ascent_steps")[value].agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats["ascent_steps"],
            stats["mean"],
            yerr=stats["std"].fillna(0),
            marker="o",
            capsize=3,
            label=family,
            color=FAMILY_COLORS.get(family, "grey"),
        )
    ax.set_xlabel("ascent steps k")


def _figure_accuracy(df, path: Path) -> None:
    plt = _plt()
    tasks, budgets = sorted(df["task"].unique()), list(dict.fromkeys(df["budget"]))
    fig, axes = plt.subplots(len(budgets), len(tasks), figsize=(5 * len(tasks), 3.6 * len(budgets)), squeeze=False)
    for i, budget in enumerate(budgets):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            _lines_vs_k(ax, df[(df["task"] == task) & (df["budget"] == budget)], "eval_accuracy")
            ax.set_title(f"{task}: equal {budget}")
            ax.set_ylabel("validation accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure_sharpness(df, path: Path) -> None:
    plt = _plt()
    data = df[df["budget"] == df["budget"].iloc[0]]
    tasks = sorted(data["task"].unique())
    measures = [(m, label) for m, label in MEASURES if m in data]
    fig, axes = plt.subplots(len(measures), len(tasks), figsize=(5 * len(tasks), 3.2 * len(measures)), squeeze=False)
    for i, (measure, label) in enumerate(measures):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            _lines_vs_k(ax, data[data["task"] == task].dropna(subset=[measure]), measure)
            ax.set_title(f"{task}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure_ascent_losses(df, path: Path) -> None:
    """Mean training loss at w + d_i along the ascent, per method (from the sam/ascent_loss_i logs)."""
    plt = _plt()
    data = df[(df["budget"] == df["budget"].iloc[0]) & (df["ascent_steps"] >= 1)]
    tasks = sorted(data["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        for method, part in data[data["task"] == task].groupby("method", sort=False):
            k = int(part["ascent_steps"].iloc[0])
            columns = [f"train_sam_ascent_loss_{i}" for i in range(k + 1)]
            if not all(c in part for c in columns):
                continue
            values = part[columns].to_numpy(dtype=float)
            if np.isnan(values).all():  # a method without ascent diagnostics (Lookbehind)
                continue
            increase = values - values[:, :1]
            ax.plot(
                range(k + 1),
                np.nanmean(increase, axis=0),
                marker="o",
                label=method,
                color=FAMILY_COLORS[parse_method(method).family],
                alpha=0.4 + 0.12 * min(k, 5),
            )
        ax.set_title(f"{task}: loss along the ascent")
        ax.set_xlabel("ascent point i (w + d_i)")
        ax.set_ylabel("L(w + d_i) - L(w), mean over training")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _surface_panels(plt, fig, axes, task: str, entries: list) -> None:
    """The 2-D surfaces of one task's methods on the same contour levels, one colorbar for all of them: levels
    at quantiles of their pooled losses, so the basin's detail shows and two panels compare by eye."""
    if not entries:
        return
    entries = sorted(entries, key=lambda e: parse_method(e[0]).ascent_steps)
    pooled = np.concatenate([np.asarray(surface, dtype=float).ravel() for _, _, surface in entries])
    levels = np.unique(np.quantile(pooled[np.isfinite(pooled)], np.linspace(0, 1, 16)))
    from matplotlib.colors import BoundaryNorm

    norm = BoundaryNorm(levels, ncolors=256)
    filled = None
    for ax, (method, axis, surface) in zip(axes, entries, strict=False):
        filled = ax.contourf(axis, axis, surface.T, levels=levels, cmap="viridis", norm=norm)
        ax.contour(axis, axis, surface.T, levels=levels, colors="black", linewidths=0.3)
        ax.set_title(f"{task}: {method} (2-D)", fontsize=9)
    fig.colorbar(filled, ax=list(axes[: len(entries)]), label="validation loss (same levels)", format="%.3g")


def _figure_landscapes(df, root: Path, path: Path) -> bool:
    plt = _plt()
    data = df[df["budget"] == df["budget"].iloc[0]].drop_duplicates("run_id")
    tasks = sorted(data["task"].unique())
    surfaces = {}
    for _, row in data.iterrows():
        curves = np.load(root / "runs" / row["run_id"] / "landscape.npz")
        if "surface" in curves:
            surfaces.setdefault(row["task"], []).append((row["method"], curves["surface_axis"], curves["surface"]))
    n_cols = 2 + max((len(v) for v in surfaces.values()), default=0)
    # constrained layout leaves room for the surfaces' colorbars (tight_layout would draw them over a panel)
    fig, axes = plt.subplots(
        len(tasks), n_cols, figsize=(4.2 * n_cols, 3.6 * len(tasks)), squeeze=False, layout="constrained"
    )
    for i, task in enumerate(tasks):
        part = data[(data["task"] == task) & (data["seed"] == data["seed"].min())]
        for _, row in part.iterrows():
            curves = np.load(root / "runs" / row["run_id"] / "landscape.npz")
            color = FAMILY_COLORS[parse_method(row["method"]).family]
            alpha = 0.35 + 0.13 * min(int(row["ascent_steps"]), 5)
            axes[i][0].plot(curves["alphas"], curves["random_line"], color=color, alpha=alpha, label=row["method"])
            axes[i][1].plot(
                curves["ascent_alphas"], curves["ascent_line"], color=color, alpha=alpha, label=row["method"]
            )
        axes[i][0].set_title(f"{task}: filter-normalized random direction", fontsize=9)
        axes[i][0].set_xlabel("alpha")
        axes[i][0].set_ylabel("validation loss")
        axes[i][1].set_title(f"{task}: along the ascent direction g/||g||", fontsize=9)
        axes[i][1].set_xlabel("distance")
        axes[i][0].legend(fontsize=6)
        _surface_panels(plt, fig, axes[i][2:], task, surfaces.get(task, []))
        for j in range(2 + len(surfaces.get(task, [])), n_cols):
            axes[i][j].axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bool(surfaces)


def write_figures(data: pd.DataFrame, root: Path, figures: Path) -> None:
    """Every figure of the report into the folder ``figures`` (``root``: the study folder, for the runs' landscapes)."""
    figures.mkdir(exist_ok=True)
    _figure_accuracy(data, figures / "accuracy_vs_k.png")
    _figure_sharpness(data, figures / "sharpness_vs_k.png")
    _figure_ascent_losses(data, figures / "ascent_losses.png")
    compute_plot(pareto_points(data), figures / "accuracy_vs_compute.png")
    _figure_landscapes(data, root, figures / "landscapes.png")
