#!/usr/bin/env python
"""Which of hf_sam's functions a step's time goes to: cProfile over a few optimizer steps of one
``bench_step`` variant, hf_sam's functions sorted by cumulative time (the passes show up as the
trainer functions that run them).

    OMP_NUM_THREADS=1 python benchmarks/profile_calls.py --model bert --variant looksam --k 1
    OMP_NUM_THREADS=1 python benchmarks/profile_calls.py --model resnet --variant sam --k 3 --rule projected

``looksam`` and ``cyclefloor`` run a cycle of 5 optimizer steps per call (one SAM step, four one-pass steps).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_step import make_variant, training_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet", help="Start of a CPU-preset model name.")
    parser.add_argument("--variant", default="sam", choices=["sam", "looksam", "msam", "plain"])
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--rule", default="normalized")
    parser.add_argument("--calls", type=int, default=3, help="Profiled calls, after two warm-up calls.")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    case, model, batch = training_case(parser, args.model)
    k = 0 if args.variant == "plain" else args.k
    run = make_variant(args.variant, model, batch, k, args.rule, bf16=False, device="cpu")
    for _ in range(2):
        run()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        run()
    profile.disable()
    print(f"# {case.name}, {args.variant} k={k} {args.rule}, {args.calls} calls")
    pstats.Stats(profile).sort_stats("cumtime").print_stats("hf_sam", args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
