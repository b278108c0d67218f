"""SAM's own time against its traffic floor, for bench_step.py.

SAM's own time is what a SAM step costs beyond the stock Trainer step and its k extra passes: per round,
SAM step - (stock step + floor_k - floor_0) (a LookSAM cycle: CYCLE stock steps + floor_k - floor_0; MSAM:
one stock step). Its traffic floor is the time SAM's own memory traffic takes at the machine's copy
bandwidth: the bytes SAM's step moves beyond its trainer floor's (counted from the dispatched operators by
benchmarks/traffic.py) over the bandwidth of a copy of a buffer the size of the trainable weights, a
variant ("copy") timed in the same rounds, so the machine's drift cancels in the ratio.
"""

from __future__ import annotations

import numpy as np
import torch
from intervals import Interval, median_interval
from step_variants import CYCLE

OWN_LIMIT = 1.5  # SAM's own time <= 1.5 x its traffic floor


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def copy_variant(model: torch.nn.Module, device: str):
    """One copy of a buffer of the trainable weights' bytes: reads and writes them once (2 passes)."""
    n = weight_bytes(model) // 4
    source = torch.randn(n, device=device)
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def trainer_floor_parts(variant) -> list[tuple[tuple, float]]:
    """The trainer floor of a variant as (variant, weight) terms: what its own time is measured beyond."""
    kind, k, _ = variant
    plain, floor_0 = ("plain", 0, "-"), ("floor", 0, "-")
    if kind == "msam":
        return [(plain, 1.0)]
    steps = CYCLE if kind == "looksam" else 1
    return [(plain, float(steps)), (("floor", k, "-"), 1.0), (floor_0, -1.0)]


def own_times(times: dict, variant) -> np.ndarray:
    """Per round, the variant's time beyond its trainer floor."""
    own = np.asarray(times[variant], dtype=float).copy()
    for part, weight in trainer_floor_parts(variant):
        own -= weight * np.asarray(times[part], dtype=float)
    return own


def counted_bytes(run) -> int:
    """Bytes read and written by every operator one call of ``run`` dispatches (forward and backward too)."""
    from traffic_counter import TrafficCounter

    counter = TrafficCounter()
    with counter:
        run()
    return counter.read + counter.written


def own_passes(runners: dict, variant, weights: int, counted: dict | None = None) -> float:
    """SAM's own traffic in passes over the weights: the variant's counted bytes beyond its trainer floor's.
    ``counted`` keeps each variant's count across calls, so the floors shared by the rows are counted once."""
    counted = {} if counted is None else counted

    def count(v) -> int:
        if v not in counted:
            counted[v] = counted_bytes(runners[v])
        return counted[v]

    total = count(variant)
    for part, weight in trainer_floor_parts(variant):
        total -= weight * count(part)
    return total / weights


def own_time_row(times: dict, variant, passes: float, resamples: int) -> dict:
    """SAM's own time with its interval, its traffic floor (from the copy variant's time in the same
    rounds) and their ratio with its interval: ``{"own": Interval, "floor_s": float, "ratio": Interval}``."""
    own = own_times(times, variant)
    copy = np.asarray(times[("copy", 0, "-")], dtype=float)
    floor = passes / 2 * copy  # a copy moves two passes
    return {
        "own": median_interval(own, resamples=resamples),
        "floor_s": float(np.median(floor)),
        "ratio": median_interval(own / floor, resamples=resamples),
    }


def own_verdict(ratio: Interval) -> str:
    return ratio.verdict(OWN_LIMIT)


ENGINE_PHASES = ("begin", "ascend", "begin_descent", "end_descent", "restore")


def phase_seconds(run, steps: int) -> list[float]:
    """SAM's own work timed directly: per step, the summed wall time of the engine's phases (the passes left
    out, so no difference of two noisy step times). For the "sam" rows, whose runner carries its trainer."""
    import time

    engine = run.trainer.sam_run.engine
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for name in ENGINE_PHASES:
        setattr(engine, name, timed(getattr(engine, name)))
    per_step = []
    try:
        for _ in range(steps):
            spent[0] = 0.0
            run()
            per_step.append(spent[0])
    finally:
        for name in ENGINE_PHASES:
            delattr(engine, name)  # the class's methods again
    return per_step
