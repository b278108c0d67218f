"""One study run: train with SAMTrainer through the public task API, evaluate, then measure
sharpness and landscapes. A run's folder appears only when it is complete."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .grid import RunSpec, StudyConfig, parse_method

DONE_FILE = "metrics.json"


def run_dir(root: Path, run: RunSpec) -> Path:
    return root / "runs" / run.run_id


def is_done(root: Path, run: RunSpec) -> bool:
    return (run_dir(root, run) / DONE_FILE).exists()


def _training_args(config: StudyConfig, run: RunSpec, output_dir: Path, spec_training: dict[str, Any]):
    from ..trainer.args import SAMTrainingArguments

    method = parse_method(run.method)
    values: dict[str, Any] = {
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "logging_steps": 5,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": config.workers > 1,
        "dataloader_num_workers": 0,
        **spec_training,
        **config.training_overrides,
    }
    import torch

    if not torch.cuda.is_available():
        values.pop("bf16", None)
        values.pop("fp16", None)
        values["use_cpu"] = True
    values.update(
        output_dir=str(output_dir),
        do_train=True,
        do_eval=True,
        seed=run.seed,
        num_train_epochs=run.epochs,
        sam_ascent_steps=method.ascent_steps,
        sam_rho=run.rho,
        sam_ascent_rule=method.ascent_rule,
        sam_descent=method.descent,
        sam_adaptive=method.adaptive,
        sam_diagnostics=method.ascent_steps >= 1 and method.method == "sam" and method.every_n_steps == 1,
        sam_xsam_alpha=method.xsam_alpha,
        sam_method=method.method,
        sam_direction=method.direction,
        sam_every_n_steps=method.every_n_steps,
        sam_reuse_alpha=method.reuse_alpha,
        sam_start_step=method.start_fraction,
    )
    return SAMTrainingArguments(**values)


def execute(config: StudyConfig, run: RunSpec, root: Path, surface: bool = False) -> dict[str, Any]:
    """Train, evaluate and measure one run; write its folder atomically. Returns its metrics."""
    from ..tasks.arguments import DataArguments, ModelArguments
    from ..tasks.run import build_trainer, forward_backward_passes

    final = run_dir(root, run)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    spec = config.task(run.task)
    model_args = ModelArguments(**spec.model)
    data_args = DataArguments(**spec.data)
    training_args = _training_args(config, run, partial / "trainer", spec.training)
    (partial / "config.json").write_text(
        json.dumps(
            {
                "run": run.to_dict(),
                "task": asdict(spec),
                "training_args": training_args.to_dict(),
            },
            indent=1,
            default=str,
        )
    )

    trainer, task = build_trainer(spec.kind, model_args, data_args, training_args)
    if config.workers > 1:  # parallel runs: the grid's bar speaks, the Trainers stay quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    evaluation = trainer.evaluate(eval_dataset=task.eval_dataset)
    history = trainer.state.log_history
    metrics: dict[str, Any] = {
        **run.to_dict(),
        "kind": spec.kind,
        "ascent_steps": parse_method(run.method).ascent_steps,
        "eval_accuracy": evaluation.get("eval_accuracy"),
        "eval_loss": evaluation.get("eval_loss"),
        "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "train_seconds": train_seconds,
        "forward_backward_passes": forward_backward_passes(trainer),
        "optimizer_steps": trainer.state.global_step,
        "num_labels": getattr(getattr(trainer.model, "config", None), "num_labels", None),  # chance = 1/labels
        "eval_examples": len(task.eval_dataset),
        **_training_diagnostics(history),
    }
    measures, curves = measure(trainer, task, run, config, surface=surface)
    metrics.update(measures)
    np.savez_compressed(partial / "landscape.npz", **curves)
    (partial / "log_history.json").write_text(json.dumps(history, indent=1))
    shutil.rmtree(partial / "trainer", ignore_errors=True)  # checkpoints are not needed for the report
    (partial / DONE_FILE).write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)  # the finished folder appears in one step
    return metrics


def _training_diagnostics(history: list[dict]) -> dict[str, float]:
    """Means over training of the sam/* logs (loss along the ascent, norms, cosines, sharpness)."""
    sums: dict[str, list[float]] = {}
    for entry in history:
        for key, value in entry.items():
            if key.startswith("sam/") and isinstance(value, (int, float)):
                sums.setdefault(key, []).append(float(value))
    return {f"train_{key.replace('/', '_')}": float(np.mean(values)) for key, values in sums.items()}


def measure(trainer, task, run: RunSpec, config: StudyConfig, surface: bool) -> tuple[dict, dict]:
    """Sharpness measures and landscapes on a fixed subset of the validation split."""
    from ..measures import landscape, sharpness

    model = trainer.model
    device = trainer.args.device
    batches = sharpness.batches_from(
        task.eval_dataset, trainer.data_collator, batch_size=64, limit=config.measure_examples, device=device
    )
    loss_fn = sharpness.hf_loss
    worst = sharpness.worst_case_loss(model, loss_fn, batches, rho=run.rho, steps=5, restarts=2, seed=0)
    eig = sharpness.hessian_top_eigenvalue(
        model, loss_fn, batches[:2], max_iterations=config.hessian_iterations, tolerance=1e-2, seed=0
    )
    trace = sharpness.hessian_trace(model, loss_fn, batches[:2], samples=config.trace_samples, seed=0)
    alphas = np.linspace(-1.0, 1.0, config.landscape_points)
    random_dir = landscape.filter_normalized_direction(model, seed=0)
    curves = {
        "alphas": alphas,
        "random_line": landscape.loss_line(model, loss_fn, batches, random_dir, alphas),
    }
    ascent_alphas = np.linspace(0.0, 4 * run.rho, config.landscape_points)
    ascent_dir = landscape.ascent_direction(model, loss_fn, batches)
    curves["ascent_alphas"] = ascent_alphas
    curves["ascent_line"] = landscape.loss_line(model, loss_fn, batches, ascent_dir, ascent_alphas)
    if surface:
        grid = np.linspace(-1.0, 1.0, config.surface_points)
        second = landscape.filter_normalized_direction(model, seed=1)
        curves["surface_axis"] = grid
        curves["surface"] = landscape.loss_surface(model, loss_fn, batches, (random_dir, second), grid, grid)
    measures = {
        "m_sharpness": worst.sharpness,
        "worst_case_loss": worst.worst_loss,
        "clean_measure_loss": worst.clean_loss,
        "hessian_top_eigenvalue": eig.eigenvalue,
        "hessian_top_eigenvalue_converged": eig.converged,
        "hessian_trace": trace.trace,
        "hessian_trace_stderr": trace.stderr,
    }
    return measures, curves


def run_in_worker(args: tuple[dict, dict, str, bool]) -> dict[str, Any]:
    """Process-pool entry: one thread of torch per worker, then execute()."""
    config_dict, run_dict, root, surface = args
    import datasets
    import torch
    import transformers

    torch.set_num_threads(1)
    datasets.disable_progress_bars()  # parallel runs: only the grid's bar
    transformers.utils.logging.set_verbosity_error()
    config = StudyConfig(**config_dict)
    run = RunSpec(**{k: v for k, v in run_dict.items() if k != "run_id"})
    return execute(config, run, Path(root), surface=surface)
