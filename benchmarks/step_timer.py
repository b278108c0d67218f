"""Timing one variant's step for bench_step.py: a sample is enough repetitions of the step to last at least
``min_sample_s`` (so launch jitter and timer resolution vanish in it), timed with CUDA events on a GPU and
the wall clock on the CPU; a warm-up runs rounds until the step times settle."""

from __future__ import annotations

import math
import os
import statistics
import time

import torch


def cpu_name() -> str:
    """The CPU model and core count, as /proc/cpuinfo tells them (the machine a table was measured on)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"cpu {names[0] if names else 'unknown'} x{len(names) or os.cpu_count()}"


class StepTimer:
    """Times ``runners[variant]()`` in samples of ``repeats[variant]`` steps; returns seconds per step."""

    def __init__(self, runners: dict, device: str, min_sample_s: float) -> None:
        self.runners = runners
        self.device = device
        self.min_sample_s = min_sample_s
        self.repeats = dict.fromkeys(runners, 1)

    def _sample(self, variant, repeats: int) -> float:
        run = self.runners[variant]
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / repeats
        begin = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - begin) / repeats

    def __call__(self, variant) -> float:
        return self._sample(variant, self.repeats[variant])

    def warm_up(self, min_rounds: int, max_seconds: float, tolerance: float = 0.02) -> int:
        """Run every variant until each one's step time settles (two successive rounds' medians of the last
        three steps within ``tolerance``), at least ``min_rounds`` rounds, at most ``max_seconds``; then
        size each variant's sample to ``min_sample_s``. Returns the rounds run."""
        seen: dict = {v: [] for v in self.runners}
        medians: dict = {v: [] for v in self.runners}
        start, rounds = time.perf_counter(), 0
        while True:
            for v in self.runners:
                seen[v].append(self._sample(v, 1))
                medians[v].append(statistics.median(seen[v][-3:]))
            rounds += 1
            settled = all(len(m) >= 2 and abs(m[-1] - m[-2]) <= tolerance * m[-2] for m in medians.values())
            if rounds >= min_rounds and (settled or time.perf_counter() - start >= max_seconds):
                break
        for v in self.runners:
            self.repeats[v] = max(1, math.ceil(self.min_sample_s / max(medians[v][-1], 1e-9)))
        return rounds
