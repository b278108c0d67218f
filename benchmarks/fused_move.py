#!/usr/bin/env python
"""The first ascent move into the spare buffer, three ways, on weights shaped like a small model's:

* ``copy + guarded``: what the engine does on an accelerator (hf_sam.engine.moved_weights): copy w into the
  buffer, then the fused SGD kernel adds s·g unless the device flag says skip (5 passes over the weights);
* ``out of place + guarded copy``: what it does on the CPU: one foreach ``w + s·g`` into new tensors (3
  passes), then w copied over them by a kernel that skips on the device flag (nothing unless dropped);
* ``compiled where``: ``buffer = where(skip, w, w + s·g)`` compiled by ``torch.compile`` (3 passes, one
  kernel; the compile time is printed);
* ``out-of-place add``: ``torch.addcmul(w, g, s, out=buffer)`` per tensor (3 passes), unsafe alone: with
  a non-finite g and s = 0 it writes nan, so a dropped ascent would not leave the point at w.

Medians of 50 calls after 3 warm-ups, one thread; the weights stay in cache between calls, so this
compares kernels, not DRAM traffic (``benchmarks/traffic.py`` counts that).

    OMP_NUM_THREADS=1 python benchmarks/fused_move.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hf_sam.engine.guarded import copy_where_


def _median_ms(fn, *args, calls: int = 50) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def copy_then_guarded(buffers, weights, grads, scale, skip) -> None:
    torch._foreach_copy_(buffers, weights)
    torch._fused_sgd_(
        buffers, grads, [], weight_decay=0.0, momentum=0.0, lr=scale, dampening=0.0, nesterov=False,
        maximize=True, is_first_step=False, found_inf=skip.float(),
    )  # fmt: skip


def out_of_place_then_guarded_copy(buffers, weights, grads, scale, skip) -> list:
    moved = torch._foreach_addcmul(weights, grads, [scale] * len(weights))
    copy_where_(moved, weights, skip, grads)
    return moved


def where_move(buffers, weights, grads, scale, skip) -> None:
    for b, w, g in zip(buffers, weights, grads, strict=True):
        b.copy_(torch.where(skip, w, w + scale * g))


def out_of_place(buffers, weights, grads, scale, skip) -> None:
    for b, w, g in zip(buffers, weights, grads, strict=True):
        torch.addcmul(w, g, scale, out=b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no_compile", action="store_true", help="Skip the compiled variant (it compiles ~20 s).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = [(256, 256)] * 20 + [(1024,)] * 20 + [(512, 128)] * 17
    weights = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    buffers = [torch.empty_like(w) for w in weights]
    scale, skip = torch.tensor(0.01), torch.tensor(False)
    print(f"# {len(shapes)} tensors, {sum(w.numel() for w in weights) / 1e6:.2f}M fp32 weights; ms per call")
    print(f"copy + guarded      {_median_ms(copy_then_guarded, buffers, weights, grads, scale.double(), skip):7.3f}")
    both = _median_ms(out_of_place_then_guarded_copy, buffers, weights, grads, scale, skip)
    print(f"out of place + copy {both:7.3f}")
    print(f"out-of-place add    {_median_ms(out_of_place, buffers, weights, grads, scale, skip):7.3f}  (unsafe)")
    if not args.no_compile:
        start = time.perf_counter()
        compiled = torch.compile(where_move, fullgraph=True, dynamic=False)
        compiled(buffers, weights, grads, scale, skip)
        seconds = time.perf_counter() - start
        print(f"compiled where      {_median_ms(compiled, buffers, weights, grads, scale, skip):7.3f}  "
              f"(compiled in {seconds:.1f} s)")  # fmt: skip
    # the safety the engine needs: a skipped move with an inf gradient leaves the buffer at w
    grads[0][0, 0] = float("inf")
    copy_then_guarded(buffers, weights, grads, torch.tensor(0.0, dtype=torch.float64), torch.tensor(True))
    safe = all(torch.equal(b, w) for b, w in zip(buffers, weights, strict=True))
    moved = out_of_place_then_guarded_copy(buffers, weights, grads, torch.tensor(0.0), torch.tensor(True))
    safe = safe and all(torch.equal(b, w) for b, w in zip(moved, weights, strict=True))
    out_of_place(buffers, weights, grads, torch.tensor(0.0), torch.tensor(True))
    unsafe = bool(torch.isnan(buffers[0]).any())
    print(f"# a skipped move with an inf gradient: both safe ways leave w: {safe}; out-of-place writes nan: {unsafe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
