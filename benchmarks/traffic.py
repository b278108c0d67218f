#!/usr/bin/env python
"""SAM's own memory traffic: per SAM step and rule, the bytes SAM's work reads and writes, counted from
the operators the engine runs (not estimated), in units of one pass over the trainable weights, next to
the time the same phases take.

Every aten operator the engine's phases (begin, ascend, begin_descent, end_descent, restore) dispatch is
seen by a TorchDispatchMode: an operator reads its tensor arguments and writes its outputs, or, when it
works in place, the arguments it mutates. Forward and backward passes are not counted (they are the
passes' own); the counts are SAM's overhead on top of them. One "pass" below = the trainable weights'
bytes once (reading the weights, a gradient or the snapshot each count as one).

    OMP_NUM_THREADS=1 python benchmarks/traffic.py                       # resnet-small, every rule, k = 1 and 3
    OMP_NUM_THREADS=1 python benchmarks/traffic.py --model bert-tiny --ks 1 --rules normalized --ways copy

``--ways``: where the perturbed weights live (``sam_perturbed_weights``): "swap" (the default: a second
buffer the parameters point at, no snapshot, no restore copy) and "copy" (a snapshot, moves in place, a
restore copy: the way kept for FSDP2 shards, tied storage, DeepSpeed and CUDA graphs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_step import make_variant, training_case  # noqa: E402
from traffic_counter import TrafficCounter  # noqa: E402

PHASES = ("begin", "ascend", "begin_descent", "end_descent", "restore")


def _counted(store: dict, label: str, fn):
    def wrapper(*args, **kwargs):
        counter = TrafficCounter()
        start = time.perf_counter()
        with counter:
            out = fn(*args, **kwargs)
        store[label].append((counter.read, counter.written, counter.ops, time.perf_counter() - start))
        return out

    return wrapper


def measure(
    model, batch, k: int, rule: str, steps: int, way: str = "auto"
) -> dict[str, tuple[float, float, float, float]]:
    """Per phase, per step: (bytes read, bytes written, operators, seconds), medians over the steps."""
    run = make_variant("sam", model, batch, k, rule, bf16=False, device="cpu", sam_perturbed_weights=way)
    trainer = run.trainer
    for _ in range(2):  # the engine binds and reviews its norms' precision in the first steps
        run()
    engine = trainer.sam_run.engine
    store: dict[str, list] = defaultdict(list)
    for name in PHASES:
        setattr(engine, name, _counted(store, name, getattr(engine, name)))
    for _ in range(steps):
        run()
    out = {}
    for name, rows in store.items():
        per_step = len(rows) // steps  # ascend runs k times per step
        sums = [
            tuple(sum(r[i] for r in rows[s * per_step : (s + 1) * per_step]) for i in range(4)) for s in range(steps)
        ]
        out[name] = tuple(statistics.median(s[i] for s in sums) for i in range(4))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet-small", help="Start of a CPU-preset model name.")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--rules", nargs="+", default=["normalized", "projected", "accumulated"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ways", nargs="+", default=["swap", "copy"], choices=["swap", "copy"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    case, model, batch = training_case(parser, args.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(f"# {case.name}: {weights / 2**20:.1f} MiB of trainable weights = one pass; medians of {args.steps} steps")
    head = f"{'way':5} {'rule':12} {'k':>2} {'phase':14}"
    print(f"{head} {'reads':>7} {'writes':>7} {'total':>7} {'ops':>6} {'ms':>8}")
    for way in args.ways:
        for k in args.ks:
            for rule in args.rules:
                found = measure(model, batch, k, rule, args.steps, way)
                total = [0.0, 0.0, 0.0, 0.0]
                for name in PHASES:
                    read, written, ops, seconds = found.get(name, (0, 0, 0, 0.0))
                    total = [a + b for a, b in zip(total, (read, written, ops, seconds), strict=True)]
                    print(f"{way:5} {rule:12} {k:>2} {name:14} {read / weights:7.2f} {written / weights:7.2f} "
                          f"{(read + written) / weights:7.2f} {ops:6.0f} {seconds * 1000:8.2f}")  # fmt: skip
                read, written, ops, seconds = total
                print(f"{way:5} {rule:12} {k:>2} {'SAM, all':14} {read / weights:7.2f} {written / weights:7.2f} "
                      f"{(read + written) / weights:7.2f} {ops:6.0f} {seconds * 1000:8.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
