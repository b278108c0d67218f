"""The study report: report.md (text), with the tables and figures written beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import landscape_verdicts, verdicts
from .comparison_figures import forest_plot
from .figures import write_figures
from .grid import StudyConfig
from .tables import load_runs, markdown_table, pareto_points, summarize, with_budgets


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


def _front_lines(data: pd.DataFrame) -> list[str]:
    """The Pareto front of every task and budget (the figure's panels, ``pareto.csv``'s on_front), cheapest first."""
    points = pareto_points(data)
    if points.empty:
        return []
    lines = []
    for (task, budget), part in points[points["on_front"]].groupby(["task", "budget"], sort=False):
        front = part.sort_values("passes_per_step")
        steps = ", ".join(
            f"`{r.method}` ({r.passes_per_step:g} passes per step, {r.accuracy:.4f})" for r in front.itertuples()
        )
        lines.append(f"- **{task}**, {budget}: {steps}.")
    return [*lines, ""]


def with_landscape(accuracy: pd.DataFrame, landscape: pd.DataFrame) -> pd.DataFrame:
    """The accuracy verdicts with each measure's ratio, interval and landscape verdict as columns of their own."""
    if accuracy.empty or landscape.empty:
        return accuracy
    keys = ["task", "budget", "method", "rho"]
    wide = landscape.pivot(index=keys, columns="measure", values=["ratio", "low", "high", "verdict"])
    wide.columns = [f"{measure}_{value}" for value, measure in wide.columns]
    return accuracy.merge(wide.reset_index(), on=keys, how="left")


def _task_lines(config: StudyConfig) -> list[str]:
    """What each task trains: the model and where its weights come from, full fine-tuning or LoRA, the training
    examples, the label noise (the regime), the recipe and the seeds."""
    rows = []
    notes = []
    for name in config.tasks:
        spec = config.task(name)
        model = spec.model.get("model_name_or_path")
        source = f"`{model}` (pretrained)" if model else f"{spec.model.get('model_type', '?')} from a config"
        if spec.model.get("use_peft"):
            tuning = f"LoRA r={spec.model.get('lora_r', 16)}"
        else:
            tuning = "full fine-tuning" if model else "from scratch"
        examples = spec.data.get("max_train_samples") or "all"
        noise = spec.data.get("label_noise", 0.0)
        training = {**spec.training, **config.training_overrides}
        seeds = config.task_seeds.get(name, config.seeds)
        rhos = ", ".join(f"{r:g}" for r in config.task_rhos.get(name, config.rhos))
        rows.append(
            f"| {name} | `{spec.data.get('dataset_name')}` | {source} | {tuning} | {examples} | "
            f"{100 * noise:g}% | {training.get('num_train_epochs')} | {training.get('learning_rate')} | {rhos} | "
            f"{len(seeds)} |"
        )
        if model == "embedded:resnet-mnist5k":
            notes.append(_pretrained_resnet_note())
    return [
        "| task | data | model | tuning | training examples | label noise | epochs | learning rate | rho | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *[note for note in dict.fromkeys(notes)],
    ]


def _pretrained_resnet_note() -> str:
    from ..tasks.pretrained_vision import checkpoint_dir

    record_file = checkpoint_dir() / "pretraining.json"
    if not record_file.exists():
        return "`embedded:resnet-mnist5k`: pretrained on first use and cached (no record on this machine yet).\n"
    record = json.loads(record_file.read_text())
    return (
        f"`embedded:resnet-mnist5k`: a {record.get('model_type')} pretrained here on `{record.get('source')}` "
        f"({record.get('num_train_epochs')} epochs, {record.get('optimizer_steps')} AdamW steps, seed "
        f"{record.get('seed')}), validation accuracy {record.get('validation_accuracy')} there; built once by the "
        "task and cached (`hf_sam/tasks/pretrained_vision.py`).\n"
    )


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
    data = with_budgets(df, config)
    summary = summarize(data)
    failed = verdicts.failed_runs(data)
    verdict_frame = verdicts.verdict_table(data, failed=failed)
    landscape = landscape_verdicts.landscape_table(data)
    with_landscape(verdict_frame, landscape).to_csv(root / "verdicts.csv", index=False)
    summary.to_csv(root / "summary.csv", index=False)
    (root / "summary.json").write_text(summary.to_json(orient="records", indent=1))
    write_figures(data, root, root / "figures")
    if not verdict_frame.empty:
        forest_plot(verdict_frame, root / "figures" / "differences.png")
    pareto_points(data).to_csv(root / "pareto.csv", index=False)

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
        f"rho {', '.join(f'{r:g}' for r in config.rhos)}; seeds {', '.join(map(str, config.seeds))} (unless the task "
        f"says otherwise below: its own rho and seeds); budgets {', '.join(config.budgets)}. {len(df)} runs.",
        "",
        *_task_lines(config),
        "Every run trains with `SAMTrainer` (k = 0 is plain AdamW through the same code path). "
        "*Equal epochs* gives every method the same epochs; *equal compute* scales the epochs by 2/(passes per "
        "step) so every method spends the forward+backward passes of SAM with k = 1 (k + 1 passes per step for "
        "SAM, 1 + k/n for SAM every n steps and LookSAM, 1 for MSAM and AdamW). Sharpness is measured after "
        f"training on a fixed validation subset of {config.measure_examples} examples: m-sharpness is the mean over "
        "batches of 64 of the worst loss increase in the rho-ball (5 projected ascent steps, 2 starts); λ_max, the "
        f"largest algebraic Hessian eigenvalue, by Lanczos ({config.hessian_iterations} Hessian-vector "
        "products at most, runs that did not converge are counted below); tr(H) by Hutchinson's estimator "
        f"({config.trace_samples} Rademacher vectors).",
        "",
        *_convergence_note(df),
        "## Findings",
        "",
        *_findings(summary),
        "",
        "## Verdicts against SAM k=1",
        "",
        "Validation accuracy of every method minus SAM k=1's on the same task, budget and seed: the mean of "
        "the seed-paired differences with its 95% Student t interval and its half-width (±). The verdict comes "
        "from the interval alone: *better* or *worse* when it excludes 0, *equivalent within ±1 point* when all "
        "of it lies within ±0.01, *no difference shown* otherwise (not a proof of equality: the interval is "
        "wider than the margin). Failed runs (below) are counted in; where leaving them out changes a verdict, "
        "the last column says to what.",
        "",
        *verdicts.markdown(verdict_frame),
        "![differences against SAM k=1](figures/differences.png)",
        "",
        "## Landscape verdicts against SAM k=1",
        "",
        "Is a method's minimum flatter or sharper than SAM k=1's (the paper's \"distinct loss landscapes\")? For "
        "each sharpness measure, the seed-paired ratio method / SAM k=1 on the same task, budget and seed, as a "
        "geometric mean with its 95% Student t interval on the log ratios. The verdict comes from the interval "
        "alone: *flatter* when all of it lies below 1, *sharper* when all of it lies above 1, *the same within "
        "±10%* when all of it lies inside [1/1.1, 1.1], *no difference shown* otherwise. A measure that is not "
        "positive in every pair gets no ratio (AdamW makes no SAM pass, so it has no training sharpness).",
        "",
        *landscape_verdicts.landscape_markdown(landscape),
        *landscape_verdicts.agreement(landscape, verdict_frame),
        "## Failed runs",
        "",
        f"Runs that ended within {100 * verdicts.CHANCE_SLACK:g} points of chance (1 / number of labels) or with "
        "a non-finite training loss, with the cause where the logs tell it.",
        "",
        *verdicts.failed_markdown(failed),
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
        "training): whether more steps find a higher loss in the same ball, which is what the ascent is for (on the "
        "tasks measured here it is often no higher than one step's).",
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
        "Can a cheaper method match multi-step SAM? Mean validation accuracy with its 95% interval over seeds "
        "against the forward+backward passes per optimizer step (k + 1 for SAM, 1 + k/n for LookSAM, 1 for MSAM "
        "and AdamW), a panel per task and budget; the dashed line is the panel's Pareto front (no other point "
        "is as cheap per step and more accurate). The verdicts at equal passes are the *compute* rows above; "
        "`pareto.csv` holds the points.",
        "",
        "![accuracy vs compute](figures/accuracy_vs_compute.png)",
        "",
        *_front_lines(data),
        "## Table",
        "",
        markdown_table(table),
        "",
        f"Also as `summary.csv`/`summary.json` (with {', '.join(diag_cols) or 'the training diagnostics'}) "
        "and per run as `results.csv`/`results.json`; each run's config, logs and landscape arrays are in "
        "`runs/<run id>/`.",
        "",
    ]
    report.write_text("\n".join(lines))
    return report
