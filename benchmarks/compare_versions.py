#!/usr/bin/env python
"""This checkout's SAMTrainer step against another version's (a regression check), with intervals.

The other version is any checkout of this repository (for example ``git worktree add /tmp/base
<commit>``); its ``hf_sam`` package is loaded under another name next to this one, both build the
step on the same model and batch, and paired shuffled rounds (benchmarks/intervals.py) give the
ratio this/baseline with a 95% interval, sampled until it is narrower than --target or the cap.

    git worktree add /tmp/base 9c08dfa
    OMP_NUM_THREADS=1 python benchmarks/compare_versions.py --baseline /tmp/base --model resnet --k 1
    OMP_NUM_THREADS=1 python benchmarks/compare_versions.py --baseline /tmp/base --model bert --sam sam_descent=gsam
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import cases, make_variant  # noqa: E402
from intervals import Rounds, ratio_interval  # noqa: E402
from step_timer import StepTimer  # noqa: E402


def load_baseline(checkout: str):
    """The baseline's hf_sam, imported as hf_sam_baseline (its imports are relative)."""
    folder = tempfile.mkdtemp(prefix="hf_sam_baseline_")
    shutil.copytree(os.path.join(checkout, "hf_sam"), os.path.join(folder, "hf_sam_baseline"))
    sys.path.insert(0, folder)
    return importlib.import_module("hf_sam_baseline")


def _step_with(package, model, batch, k: int, rule: str, sam_args: dict):
    """make_variant's SAM step, built with ``package``'s SAMTrainer (``sam_args``: more SAMTrainingArguments)."""
    import hf_sam

    saved = hf_sam.SAMTrainer, hf_sam.SAMTrainingArguments
    hf_sam.SAMTrainer, hf_sam.SAMTrainingArguments = package.SAMTrainer, package.SAMTrainingArguments
    try:
        return make_variant("sam", model, batch, k, rule, False, "cpu", **sam_args)
    finally:
        hf_sam.SAMTrainer, hf_sam.SAMTrainingArguments = saved


def _field(item: str, parser: argparse.ArgumentParser) -> tuple[str, object]:
    """``sam_descent=gsam`` -> ("sam_descent", "gsam"); numbers and booleans are converted."""
    key, sep, text = item.partition("=")
    if not sep or not key.startswith("sam_"):
        parser.error(f"--sam takes FIELD=VALUE with a sam_* field, got {item!r}")
    for convert in (int, float):
        try:
            return key, convert(text)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="A checkout of another version of this repository.")
    parser.add_argument("--model", default="resnet", help="A CPU preset model whose name starts with this.")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--rule", default="normalized")
    parser.add_argument("--target", type=float, default=0.005)
    parser.add_argument("--time_cap", type=float, default=240.0)
    parser.add_argument(
        "--sam", nargs="*", default=[], metavar="FIELD=VALUE", help="More SAMTrainingArguments, e.g. sam_descent=gsam."
    )
    args = parser.parse_args(argv)
    sam_args = dict(_field(item, parser) for item in args.sam)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import hf_sam

    baseline = load_baseline(args.baseline)
    case = next(c for c in cases("cpu", "cpu") if c.name.startswith(args.model))
    model, batch = case.build()
    model.train()
    runners = {
        "this": _step_with(hf_sam, model, batch, args.k, args.rule, sam_args),
        "baseline": _step_with(baseline, model, batch, args.k, args.rule, sam_args),
        "floor": make_variant("floor", model, batch, args.k, "-", False, "cpu"),
    }
    for _ in range(3):
        for run in runners.values():
            run()
    rounds = Rounds(list(runners))

    def widths(r: Rounds) -> list[float]:
        return [ratio_interval(r.times["this"], r.times["baseline"], resamples=1000).half_width]

    stopped = rounds.sample_until(
        StepTimer(runners, "cpu", 0.0), widths, args.target, 30, 100_000, args.time_cap, time.perf_counter
    )
    extra = "".join(f", {key}={value}" for key, value in sam_args.items())
    print(f"# {case.name}, k={args.k}, {args.rule}{extra}; {len(rounds)} rounds, stopped by the {stopped}")
    for a, b in (("this", "baseline"), ("this", "floor"), ("baseline", "floor")):
        iv = ratio_interval(rounds.times[a], rounds.times[b])
        print(f"{a:>8} / {b:<8} {iv.estimate:.4f} [{iv.low:.4f}, {iv.high:.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
