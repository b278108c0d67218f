"""The benchmark's statistics (benchmarks/intervals.py): interval coverage against a known
distribution, the verdicts, and the stopping rule on a simulated machine."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from intervals import MET, MISSED, NOT_RESOLVED, Interval, Rounds, median_interval, ratio_interval  # noqa: E402


def test_median_interval_covers_the_true_median_at_about_the_nominal_rate():
    # lognormal per-round ratios with a known median of 1.02 (exp of the normal's mean)
    rng = np.random.default_rng(1)
    true_median = 1.02
    hits = 0
    trials = 300
    for t in range(trials):
        sample = true_median * np.exp(rng.normal(0.0, 0.05, size=60))
        iv = median_interval(sample, resamples=1000, seed=t)
        hits += iv.low <= true_median <= iv.high
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def test_interval_narrows_like_one_over_root_n():
    rng = np.random.default_rng(2)
    narrow = median_interval(np.exp(rng.normal(0, 0.05, 400)), resamples=1000).half_width
    wide = median_interval(np.exp(rng.normal(0, 0.05, 25)), resamples=1000).half_width
    assert 2.5 < wide / narrow < 6.5  # sqrt(400/25) = 4


def test_ratio_interval_is_paired():
    # a drift shared by both variants cancels within a round: the ratio is exactly 1.1 every round
    drift = np.linspace(1.0, 3.0, 30)
    iv = ratio_interval(1.1 * drift, drift)
    assert iv.estimate == pytest.approx(1.1) and iv.half_width == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "low,high,want", [(0.98, 1.02, MET), (1.031, 1.05, MISSED), (1.02, 1.04, NOT_RESOLVED), (1.0, 1.03, MET)]
)
def test_verdicts_come_from_the_interval_only(low, high, want):
    assert Interval((low + high) / 2, low, high).verdict(1.03) == want


def _machine(speeds, noise, seed=0):
    """A fake timer: each variant's time is its speed times a shared slow spell times its own noise."""
    rng = np.random.default_rng(seed)
    clock = [0.0]

    def time_one(variant):
        value = speeds[variant] * (1 + 0.5 * (rng.random() < 0.1)) * np.exp(rng.normal(0, noise))
        clock[0] += value
        return value

    return time_one, lambda: clock[0]


def _widths(rounds):
    return [ratio_interval(rounds.times["sam"], rounds.times["floor"], resamples=500).half_width]


def test_sampling_stops_once_the_interval_is_narrow():
    time_one, clock = _machine({"floor": 1.0, "sam": 1.02}, noise=0.03)
    rounds = Rounds(["floor", "sam"])
    stopped = rounds.sample_until(time_one, _widths, 0.01, 10, 10_000, time_cap_s=1e9, clock=clock)
    assert stopped == "interval"
    assert _widths(rounds)[0] <= 0.01
    assert 10 < len(rounds) < 500
    iv = ratio_interval(rounds.times["sam"], rounds.times["floor"])
    assert iv.low <= 1.02 * 1.0 <= iv.high or abs(iv.estimate - 1.02) < 0.02


def test_sampling_says_when_the_time_cap_stopped_it():
    time_one, clock = _machine({"floor": 1.0, "sam": 1.02}, noise=0.5)
    rounds = Rounds(["floor", "sam"])
    stopped = rounds.sample_until(time_one, _widths, 0.001, 10, 10_000, time_cap_s=50.0, clock=clock)
    assert stopped == "time cap" and _widths(rounds)[0] > 0.001


def test_every_round_times_every_variant_once_in_a_shuffled_order():
    seen = []
    rounds = Rounds(["a", "b", "c", "d"], seed=3)
    for _ in range(20):
        rounds.run_round(lambda v: seen.append(v) or 1.0)
    chunks = [tuple(seen[i : i + 4]) for i in range(0, 80, 4)]
    assert all(sorted(c) == ["a", "b", "c", "d"] for c in chunks)
    assert len(set(chunks)) > 5, "the order is shuffled"
