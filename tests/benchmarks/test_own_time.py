"""benchmarks/own_time.py: SAM's own time is the step beyond its trainer floor, checked by hand on synthetic
rounds; its traffic floor is the counted bytes at the copy bandwidth of the same rounds; the byte count of a
copy is two passes over its buffer."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from own_time import copy_variant, counted_bytes, own_time_row, own_times  # noqa: E402
from step_variants import CYCLE  # noqa: E402

PLAIN, F0, F1, COPY = ("plain", 0, "-"), ("floor", 0, "-"), ("floor", 1, "-"), ("copy", 0, "-")


def _times(rounds: int = 40) -> dict:
    rng = np.random.default_rng(0)
    drift = 1 + 0.05 * rng.standard_normal(rounds)  # a machine that speeds up and slows down, alike for all
    return {
        PLAIN: list(0.100 * drift),
        F0: list(0.090 * drift),
        F1: list(0.180 * drift),
        COPY: list(0.002 * drift),
        ("sam", 1, "normalized"): list(0.196 * drift),  # 0.100 + 0.090 = 0.190 floor, 6 ms of its own
        ("looksam", 1, "n5"): list((CYCLE * 0.100 + 0.090 + 0.010) * drift),
        ("msam", 1, "-"): list(0.103 * drift),
    }


def test_own_time_is_the_step_beyond_its_trainer_floor():
    times = _times()
    drift = np.asarray(times[PLAIN]) / 0.100
    np.testing.assert_allclose(own_times(times, ("sam", 1, "normalized")), 0.006 * drift, rtol=1e-9)
    np.testing.assert_allclose(own_times(times, ("looksam", 1, "n5")), 0.010 * drift, rtol=1e-9)
    np.testing.assert_allclose(own_times(times, ("msam", 1, "-")), 0.003 * drift, rtol=1e-9)


def test_ratio_to_the_traffic_floor_cancels_the_drift():
    # 6 passes at a copy of 2 ms (2 passes) = 6 ms of traffic: the ratio is 1 in every round, drift or not
    row = own_time_row(_times(), ("sam", 1, "normalized"), passes=6.0, resamples=500)
    assert row["ratio"].estimate == pytest.approx(1.0) and row["ratio"].half_width < 1e-9
    assert row["floor_s"] == pytest.approx(0.006, rel=0.05)
    assert row["own"].low <= row["own"].estimate <= row["own"].high


def test_a_copy_moves_two_passes():
    model = torch.nn.Linear(100, 10)
    weights = sum(p.numel() * 4 for p in model.parameters())
    copy = copy_variant(model, "cpu")
    assert counted_bytes(copy) == 2 * (weights // 4) * 4
