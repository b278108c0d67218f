"""Confidence intervals for step-time ratios from paired, interleaved rounds, and the verdicts drawn
from them.

One round times every variant once, in a shuffled order, so a slow spell of the machine hits the
variants of a round alike. A ratio (say SAM over the floor) is taken within each round, and its
estimate is the median of the per-round ratios; the 95% interval is a percentile bootstrap over
rounds (whole rounds are resampled, which keeps the pairing). A target is judged from the interval
alone: "met" when all of it is within the limit, "missed" when all of it is beyond, and "not
resolved" when it straddles the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MET, MISSED, NOT_RESOLVED = "met", "missed", "not resolved"


@dataclass(frozen=True)
class Interval:
    """A median with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def verdict(self, limit: float) -> str:
        """Is the quantity <= limit? Decided from the interval only."""
        if self.high <= limit:
            return MET
        if self.low > limit:
            return MISSED
        return NOT_RESOLVED

    def as_list(self) -> list[float]:
        return [round(self.low, 4), round(self.high, 4)]


def median_interval(values: Sequence[float], level: float = 0.95, resamples: int = 4000, seed: int = 0) -> Interval:
    """The median of ``values`` and its percentile-bootstrap interval at ``level``."""
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        raise ValueError("an interval needs at least two rounds")
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, data.size, size=(resamples, data.size))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return Interval(float(np.median(data)), float(low), float(high))


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], **kwargs) -> Interval:
    """The median of the per-round ratios numerator/denominator, with its interval."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    return median_interval(num / den, **kwargs)


class Rounds:
    """Per-variant times of interleaved rounds; ``run_round(order)`` times each variant once."""

    def __init__(self, variants: Sequence, seed: int = 0) -> None:
        self.variants = list(variants)
        self.times: dict = {v: [] for v in self.variants}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.times[self.variants[0]])

    def run_round(self, time_one: Callable[[object], float]) -> None:
        order = self._rng.permutation(len(self.variants))
        for i in order:
            v = self.variants[int(i)]
            self.times[v].append(time_one(v))

    def sample_until(
        self,
        time_one: Callable[[object], float],
        widths: Callable[[Rounds], list[float]],
        target: float,
        min_rounds: int,
        max_rounds: int,
        time_cap_s: float,
        clock: Callable[[], float],
        check_every: int = 5,
    ) -> str:
        """Take rounds until every half-width that ``widths`` returns is <= ``target`` ("interval"),
        or the time cap ("time cap") or max_rounds ("round cap") is hit. Returns which."""
        start = clock()
        while True:
            self.run_round(time_one)
            n = len(self)
            if n >= min_rounds and (n - min_rounds) % check_every == 0 and max(widths(self)) <= target:
                return "interval"
            if n >= max_rounds:
                return "round cap"
            if clock() - start >= time_cap_s and n >= 2:
                return "time cap"
