"""``hf-sam study`` / ``python -m hf_sam.study``: run the ascent-steps grid and write the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .grid import PRESETS, StudyConfig, parse_method

logger = logging.getLogger("hf_sam.study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-sam study",
        description="What does the number of SAM ascent steps do? Train a grid of methods with SAMTrainer, "
        "measure sharpness and landscapes, and write report.md with figures.",
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="quick",
        help="quick: embedded data, 7-11 min on 2 CPU cores (default); family: the SAM family on the same tasks; "
        "paper: CIFAR-10/100 + SST-2 "
        "from the hub, GPU scale.",
    )
    parser.add_argument("--config", help="A YAML/JSON file of study fields (tasks, methods, rhos, seeds, ...).")
    parser.add_argument("--output_dir", default="outputs/study", help="Where runs/, the report and figures go.")
    parser.add_argument("--tasks", nargs="+", help="Tasks, e.g. digits rotten_tomatoes mnist5k cifar10 sst2.")
    parser.add_argument(
        "--methods", nargs="+", help="adamw sam normalized-k3 projected-k5 accumulated-k2 mean-k3 asam-k1 ..."
    )
    parser.add_argument("--rhos", nargs="+", type=float, help="Radii rho.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Seeds (error bars).")
    parser.add_argument(
        "--budgets",
        nargs="+",
        choices=["epochs", "compute"],
        help="Equal epochs and/or equal compute (forward+backward passes of SAM k=1).",
    )
    parser.add_argument("--workers", type=int, help="Runs in parallel (processes; one torch thread each).")
    parser.add_argument("--epochs", type=float, help="Override every task's base number of epochs.")
    parser.add_argument("--report_only", action="store_true", help="Only (re)write the report from finished runs.")
    return parser


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    overrides = {
        "tasks": args.tasks,
        "methods": args.methods,
        "rhos": args.rhos,
        "seeds": args.seeds,
        "budgets": args.budgets,
        "workers": args.workers,
    }
    config = (
        StudyConfig.from_file(args.config, **overrides)
        if args.config
        else StudyConfig.from_preset(args.preset, **overrides)
    )
    if args.seeds is not None:
        config.task_seeds = {}  # the seeds asked for, on every task
    if args.rhos is not None:
        config.task_rhos = {}  # the radii asked for, on every task
    if args.epochs is not None:
        config.training_overrides = {**config.training_overrides, "num_train_epochs": args.epochs}
    return config


def surface_runs(config: StudyConfig, runs) -> set[str]:
    """2-D surfaces for single-step SAM and the multi-step method with the most steps, first seed."""
    multi = [m for m in config.methods if parse_method(m).ascent_steps > 1 and parse_method(m).family == "normalized"]
    chosen = {"sam"} | ({max(multi, key=lambda m: parse_method(m).ascent_steps)} if multi else set())
    return {
        r.run_id
        for r in runs
        if r.method in chosen
        and r.seed == config.task_seeds.get(r.task, config.seeds)[0]
        and r.budget == "epochs"
        and r.rho == config.task_rhos.get(r.task, config.rhos)[0]
    }


def run_study(config: StudyConfig, root: Path) -> list[dict]:
    """Run every unfinished run of the grid (resume), with one progress bar over the grid."""
    from tqdm.auto import tqdm

    from .runner import execute, is_done, run_in_worker

    root.mkdir(parents=True, exist_ok=True)
    (root / "study_config.json").write_text(json.dumps(asdict(config), indent=1))
    runs = config.runs()
    surfaces = surface_runs(config, runs)
    pending = [r for r in runs if not is_done(root, r)]
    # longest runs first, so parallel workers finish together
    pending.sort(key=lambda r: -(parse_method(r.method).ascent_steps + 1) * r.epochs)
    failures = []
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="study runs", unit="run", file=sys.stdout)
    if config.workers == 1:
        for run in pending:
            bar.set_postfix_str(run.run_id[:48])
            try:
                execute(config, run, root, surface=run.run_id in surfaces)
            except Exception as err:  # one broken run must not lose the others
                logger.exception("run %s failed", run.run_id)
                failures.append((run.run_id, repr(err)))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
            futures = {
                pool.submit(run_in_worker, (asdict(config), r.to_dict(), str(root), r.run_id in surfaces)): r
                for r in pending
            }
            for future in as_completed(futures):
                run = futures[future]
                try:
                    future.result()
                except Exception as err:
                    logger.error("run %s failed: %r", run.run_id, err)
                    failures.append((run.run_id, repr(err)))
                bar.set_postfix_str(run.run_id[:48])
                bar.update()
    bar.close()
    if failures:
        (root / "failures.json").write_text(json.dumps(failures, indent=1))
    return failures


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = Path(args.output_dir)
    start = time.perf_counter()
    failures = [] if args.report_only else run_study(config, root)
    from .report import write_report

    report = write_report(config, root)
    print(f"\nReport: {report} ({time.perf_counter() - start:.0f} s)")
    if failures:
        print(f"{len(failures)} run(s) failed; see {root / 'failures.json'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
