#!/usr/bin/env python
"""Where a SAMTrainer step's time goes: each phase of the step, next to a plain pass.

Wraps the engine's phases (begin, ascend, begin_descent, restore) and the trainer's extra
forward+backward passes (all but the clean one) with timers, runs interleaved with the floor (k+1
plain passes), and prints the median milliseconds per phase per step; "clean pass + Trainer" is
what the step spends outside them (the Trainer's own step with the clean pass, model.train(),
input preparation, context managers). With --torch_profiler it also prints
torch.profiler's operator table for a few steps.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model resnet-small --k 1
    python benchmarks/profile_step.py --preset gpu --model bert-base --k 3 --torch_profiler
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_step import _sync, cases, make_variant  # noqa: E402
from gpu_env import DRY_RUN, verdict  # noqa: E402


def _timed(store: dict, label: str, fn, device: str):
    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        store[label].append(time.perf_counter() - start)
        return out

    return wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--model", default="resnet-small", help="Start of a model name of the preset.")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--rule", default="normalized")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--torch_profiler", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda" if args.preset == "gpu" and not DRY_RUN else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --preset gpu needs a CUDA device (HF_SAM_GPU_DRY_RUN=1 runs it on the CPU)", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(1)
    chosen = [c for c in cases(args.preset, device) if c.name.startswith(args.model)]
    if not chosen:
        parser.error(f"no {args.preset} model starts with {args.model!r}")
    model, batch = chosen[0].build()
    model.train()
    bf16 = args.preset == "gpu"
    floor = make_variant("floor", model, batch, args.k, "-", bf16, device)
    sam = make_variant("sam", model, batch, args.k, args.rule, bf16, device)
    trainer = sam.trainer
    engine = trainer._sam_bind(model)  # the step binds to the same model, so this engine is the one used
    phases: dict[str, list[float]] = defaultdict(list)
    for name in ("begin", "ascend", "begin_descent", "restore"):
        setattr(engine, name, _timed(phases, name, getattr(engine, name), device))
    # the clean pass runs inside the Trainer's own step ("other"); the extra passes are _sam_pass
    trainer._sam_pass = _timed(phases, "extra passes", trainer._sam_pass, device)
    trainer.training_step = _timed(phases, "training_step", trainer.training_step, device)
    totals: dict[str, list[float]] = defaultdict(list)
    for i in range(args.steps + 3):
        for name, run in (("floor", floor), ("sam", sam)):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            if i >= 3:  # warm-up
                totals[name].append(time.perf_counter() - start)
    warm = {name: values[3 * len(values) // (args.steps + 3) :] for name, values in phases.items()}

    def per_step(name: str) -> float:
        values = warm[name]
        calls = len(values) / args.steps
        return statistics.median(values) * 1000 * calls

    print(f"# {chosen[0].name}, k={args.k}, {args.rule}, {device}, median of {args.steps} steps (ms per step)")
    for name in ("floor", "sam"):
        print(f"{'total ' + name:24} {statistics.median(totals[name]) * 1000:9.2f}")
    inside = 0.0
    for name in ("extra passes", "begin", "ascend", "begin_descent", "restore"):
        value = per_step(name)
        inside += value
        print(f"  {name:22} {value:9.2f}  ({len(warm[name]) // args.steps} per step)")
    print(f"  {'clean pass + Trainer':22} {per_step('training_step') - inside:9.2f}")
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                sam()
        sort = "cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    if args.preset == "gpu":  # the GPU session's line
        total = statistics.median(totals["sam"]) / statistics.median(totals["floor"])
        return verdict("profile", True, f"{chosen[0].name} k={args.k}: SAM step {total:.3f} x its floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
