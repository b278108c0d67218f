"""The benchmark scripts run end to end on one tiny configuration, so they do not rot between
the rare sessions that have a GPU to run them on."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_bench_step_rows_and_ratios(tmp_path):
    out = tmp_path / "rows.json"
    args = ["--models", "resnet", "--ks", "1", "--rules", "projected", "--rounds", "4", "--warmup", "1", "--no_family"]
    subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", *args, "--json", str(out)], cwd=ROOT, env=ENV, check=True
    )
    rows = json.loads(out.read_text())
    by = {(r["variant"], r["k"]): r for r in rows}
    # the peer (pytorch_optimizer) is in the bench extra, not the test extra: its rows only where installed
    peer = importlib.util.find_spec("pytorch_optimizer") is not None
    assert {("plain", 0), ("floor", 0), ("floor", 1), ("sam", 1)} <= set(by)
    assert (("peer", 1) in by) == peer
    keys = {"model", "variant", "k", "rule", "ms_median", "ratio_to_floor", "ratio_to_floor_ci95", "peak_mib"}
    assert all(keys <= set(r) and r["rounds"] == 4 and r["stopped"] == "round cap" for r in rows)
    sam = by["sam", 1]
    assert sam["rule"] == "projected"
    for name in ("ratio_to_floor", "ratio_to_trainer_floor", *(["ratio_to_peer"] if peer else [])):
        low, high = sam[name + "_ci95"]
        assert low <= sam[name] <= high
    assert by["floor", 1]["ratio_to_floor"] == 1.0 and by["floor", 1]["ratio_to_floor_ci95"] == [1.0, 1.0]
    # resnet-small is judged by its own time against its traffic floor, not by 1.03 x trainer
    own_keys = {"own <= 1.5 x traffic", "phases <= 1.5 x traffic"}
    assert set(sam["verdicts"]) == {*own_keys, *(["x peer <= 1.0"] if peer else [])}
    low, high = sam["own_ms_ci95"]
    assert low <= sam["own_ms"] <= high and sam["own_passes"] > 0 and sam["traffic_floor_ms"] > 0
    low, high = sam["phases_ms_ci95"]
    assert 0 < low <= sam["phases_ms"] <= high < sam["ms_median"]  # the engine's phases: part of the step
    assert peer or sam["ratio_to_peer"] is None
    assert set(sam["verdicts"].values()) <= {"met", "missed", "not resolved"}
    # the model alone is 1.2M fp32 weights (4.8 MiB): every variant's peak holds at least that
    assert all(r["peak_mib"] > 4.7 for r in rows)


def test_bench_step_family_rows(tmp_path):
    """LookSAM per cycle of 5 steps against its own (5 + k)-pass floor, MSAM against the one-pass floor."""
    out = tmp_path / "rows.json"
    args = ["--models", "resnet", "--ks", "1", "--rules", "normalized", "--rounds", "3", "--warmup", "1", "--no_memory"]
    subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", *args, "--json", str(out)], cwd=ROOT, env=ENV, check=True
    )
    by = {(r["variant"], r["k"]): r for r in json.loads(out.read_text())}
    assert {("looksam", 1), ("looksam", 3), ("cyclefloor", 1), ("cyclefloor", 3), ("msam", 1), ("floor", 3)} <= set(by)
    for key in (("looksam", 1), ("looksam", 3), ("msam", 1)):
        row = by[key]
        low, high = row["ratio_to_floor_ci95"]
        assert low <= row["ratio_to_floor"] <= high and row["ratio_to_trainer_floor"] is not None
        assert set(row["verdicts"]) <= {"own <= 1.5 x traffic"}
    assert by["cyclefloor", 3]["ratio_to_floor"] == 1.0 and by["cyclefloor", 3]["rule"] == "n5"


def test_profile_step_splits_a_step():
    result = subprocess.run(
        [sys.executable, "benchmarks/profile_step.py", "--model", "resnet", "--k", "2", "--steps", "2"],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    # k=2: the clean pass runs in the Trainer's own step, the second ascent pass and the descent are extra
    assert "(2 per step)" in lines["extra"]
    assert "(2 per step)" in lines["ascend"]
    assert {"begin", "restore", "clean"} <= set(lines)


def test_compare_versions_against_this_checkout():
    # the same code on both sides: the ratio is printed with its interval, and the run stops at once; both
    # sides get the extra SAMTrainingArguments (here GSAM's descent)
    command = ["benchmarks/compare_versions.py", "--baseline", str(ROOT), "--target", "1.0"]
    command += ["--sam", "sam_descent=gsam"]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    line = next(line for line in result.stdout.splitlines() if "this / baseline" in line)
    estimate, low, high = (float(x.strip("[],")) for x in line.split()[-3:])
    assert low <= estimate <= high and 0.8 < estimate < 1.25
    assert "30 rounds, stopped by the interval" in result.stdout and "sam_descent=gsam" in result.stdout
