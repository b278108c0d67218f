"""The study report: tables (CSV/JSON/Markdown) and PNG figures from the finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import verdicts
from .grid import RunSpec, StudyConfig, parse_method

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
}
MEASURES = [
    ("m_sharpness", "worst-case loss increase in the rho-ball (m=64)"),
    ("hessian_top_eigenvalue", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace (Hutchinson)"),
    ("train_sam_sharpness", "L(w+d_k) - L(w) during training"),
]


def load_runs(root: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/metrics.json"))]
    return pd.DataFrame(rows)


def _with_budgets(df: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines_vs_k(ax, data: pd.DataFrame, value: str) -> None:
    """One line per ascent rule over k; k=0 (AdamW) and k=1 (SAM) are shared by the rules."""
    base = data[data["ascent_steps"] <= 1]
    for family in ("normalized", "projected", "accumulated", "mean", "asam", "xsam", "xsam-fixed", "lookbehind"):
        part = data[data["family"] == family]
        if family != "asam":
            part = pd.concat([base[base["family"].isin(["adamw", "normalized"])], part])
        if part.empty or part["family"].eq(family).sum() == 0:
            continue
        stats = part.groupby("ascent_steps")[value].agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats["ascent_steps"],
            stats["mean"],
            yerr=stats["std"].fillna(0),
            marker="o",
            capsize=3,
            label=family,
            color=FAMILY_COLORS[family],
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


def _figure_compute(df, path: Path) -> None:
    plt = _plt()
    tasks = sorted(df["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        part = df[df["task"] == task].drop_duplicates("run_id")
        for family, rows in part.groupby("family"):
            ax.scatter(
                rows["forward_backward_passes"],
                rows["eval_accuracy"],
                label=family,
                color=FAMILY_COLORS[family],
                alpha=0.8,
            )
        ax.set_xlabel("forward+backward passes")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{task}: accuracy vs compute")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig, axes = plt.subplots(len(tasks), n_cols, figsize=(4.2 * n_cols, 3.6 * len(tasks)), squeeze=False)
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
        for j, (method, axis, surface) in enumerate(
            sorted(surfaces.get(task, []), key=lambda s: parse_method(s[0]).ascent_steps)
        ):
            ax = axes[i][2 + j]
            contour = ax.contour(axis, axis, surface.T, levels=15, cmap="viridis")
            ax.clabel(contour, fontsize=6)
            ax.set_title(f"{task}: {method} (2-D)", fontsize=9)
        for j in range(2 + len(surfaces.get(task, [])), n_cols):
            axes[i][j].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bool(surfaces)


def _markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
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


def _convergence_note(df: pd.DataFrame) -> list[str]:
    """How many λ_max estimates did not converge (older runs carry no flag)."""
    if "hessian_top_eigenvalue_converged" not in df:
        return []
    flags = df["hessian_top_eigenvalue_converged"].dropna().astype(bool)
    missed = int((~flags).sum())
    return [f"λ_max did not converge (Lanczos residual above 1% of λ_max) in {missed} of {len(flags)} runs.", ""]


def _findings(summary: pd.DataFrame) -> list[str]:
    """Plain-language comparisons computed from the table."""
    out = []
    for (task, budget), part in summary.groupby(["task", "budget"], sort=False):

        def acc(method, frame=part):
            rows = frame[frame["method"] == method]
            return None if rows.empty else float(rows["eval_accuracy_mean"].iloc[0])

        best = part.loc[part["eval_accuracy_mean"].idxmax()]
        line = (
            f"- **{task}, equal {budget}**: best validation accuracy {best['eval_accuracy_mean']:.4f} "
            f"by `{best['method']}`"
        )
        single, plain = acc("sam"), acc("adamw")
        multi = part[(part["ascent_steps"] > 1) & (part["family"] == "normalized")]
        if single is not None and plain is not None:
            line += f"; SAM k=1 {single:.4f} vs AdamW {plain:.4f}"
        if single is not None and not multi.empty:
            top = multi.loc[multi["eval_accuracy_mean"].idxmax()]
            line += (
                f"; best multi-step (normalized) `{top['method']}` {top['eval_accuracy_mean']:.4f} "
                f"({top['eval_accuracy_mean'] - single:+.4f} vs k=1)"
            )
        out.append(line + ".")
    return out


def write_report(config: StudyConfig, root: Path) -> Path:
    """Write report.md, results.csv/json, summary.csv/json and the figures; returns report.md's path."""
    root = Path(root)
    report = root / "report.md"
    df = load_runs(root)
    if df.empty:
        report.write_text("# Ascent-steps study\n\nNo finished runs yet.\n")
        return report
    df.to_csv(root / "results.csv", index=False)
    (root / "results.json").write_text(df.to_json(orient="records", indent=1))
    data = _with_budgets(df, config)
    summary = summarize(data)
    verdict_frame = verdicts.verdict_table(data)
    verdict_frame.to_csv(root / "verdicts.csv", index=False)
    summary.to_csv(root / "summary.csv", index=False)
    (root / "summary.json").write_text(summary.to_json(orient="records", indent=1))
    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    _figure_accuracy(data, figures / "accuracy_vs_k.png")
    _figure_sharpness(data, figures / "sharpness_vs_k.png")
    _figure_ascent_losses(data, figures / "ascent_losses.png")
    _figure_compute(data, figures / "accuracy_vs_compute.png")
    _figure_landscapes(data, root, figures / "landscapes.png")

    table = summary[
        [
            "task",
            "budget",
            "method",
            "ascent_steps",
            "rho",
            "seeds",
            "eval_accuracy_mean",
            "eval_accuracy_std",
            "m_sharpness_mean",
            "hessian_top_eigenvalue_mean",
            "hessian_trace_mean",
            "forward_backward_passes_mean",
            "train_seconds_mean",
        ]
    ].rename(
        columns={
            "ascent_steps": "k",
            "eval_accuracy_mean": "accuracy",
            "eval_accuracy_std": "± std",
            "m_sharpness_mean": "m-sharpness",
            "hessian_top_eigenvalue_mean": "λ_max",
            "hessian_trace_mean": "tr(H)",
            "forward_backward_passes_mean": "fwd+bwd passes",
            "train_seconds_mean": "train s",
        }
    )
    diag_cols = [c for c in summary.columns if c.startswith("train_sam_sharpness")]
    lines = [
        "# Ascent-steps study",
        "",
        f"Preset `{config.preset}`: tasks {', '.join(config.tasks)}; methods {', '.join(config.methods)}; "
        f"rho {', '.join(f'{r:g}' for r in config.rhos)}; seeds {', '.join(map(str, config.seeds))}; "
        f"budgets {', '.join(config.budgets)}. {len(df)} runs.",
        "",
        "Every run trains with `SAMTrainer` (k = 0 is plain AdamW through the same code path). "
        "*Equal epochs* gives every method the same epochs; *equal compute* scales the epochs by 2/(k+1) so "
        "every method spends the forward+backward passes of SAM with k = 1. Sharpness is measured after "
        "training on a fixed validation subset: m-sharpness is the mean over batches of 64 of the worst loss "
        "increase in the rho-ball (5 projected ascent steps, 2 starts); λ_max, the largest algebraic Hessian "
        "eigenvalue, by Lanczos (20 Hessian-vector products at most, runs that did not converge are counted "
        "below); tr(H) by Hutchinson's estimator (8 Rademacher vectors).",
        "",
        *_convergence_note(df),
        "## Findings",
        "",
        *_findings(summary),
        "",
        "## Verdicts against SAM k=1",
        "",
        "Validation accuracy of every method minus SAM k=1's on the same task, budget and seed: the mean of "
        "the seed-paired differences with its 95% Student t interval. The verdict comes from the interval "
        "alone: *better* or *worse* when it excludes 0, *no difference shown* when it contains 0 (which is "
        "not a proof of equality: few seeds give wide intervals).",
        "",
        *verdicts.markdown(verdict_frame),
        "## Accuracy against the number of ascent steps",
        "",
        "Mean over seeds, error bars one standard deviation. k = 0 (AdamW) and k = 1 (SAM) are shared by the rules.",
        "",
        "![accuracy vs k](figures/accuracy_vs_k.png)",
        "",
        "## Sharpness against the number of ascent steps",
        "",
        "![sharpness vs k](figures/sharpness_vs_k.png)",
        "",
        "## Loss along the ascent",
        "",
        "How much each ascent step raises the training loss (the sam/ascent_loss_i logs, averaged over "
        "training): more steps find a higher loss in the same ball, which is what the ascent is for.",
        "",
        "![loss along the ascent](figures/ascent_losses.png)",
        "",
        "## Loss landscapes",
        "",
        "1-D: validation loss along one filter-normalized random direction (Li et al. 2018; the same seed for "
        "every model) and along the normalized gradient. 2-D: single-step SAM beside the multi-step method "
        "with the most steps, on the same two directions.",
        "",
        "![landscapes](figures/landscapes.png)",
        "",
        "## Accuracy against compute",
        "",
        "![accuracy vs compute](figures/accuracy_vs_compute.png)",
        "",
        "## Table",
        "",
        _markdown_table(table),
        "",
        f"Also as `summary.csv`/`summary.json` (with {', '.join(diag_cols) or 'the training diagnostics'}) "
        "and per run as `results.csv`/`results.json`; each run's config, logs and landscape arrays are in "
        "`runs/<run id>/`.",
        "",
    ]
    report.write_text("\n".join(lines))
    return report
