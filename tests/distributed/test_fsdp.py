"""FSDP2 at the engine level: 2 gloo processes, a model wrapped with fully_shard on a CPU mesh. One
MultiStepAscent step equals a float64 single-process reference of synchronized SAM on both ranks'
batches, for every rule x k x ASAM x descent; the logged norms are the global ones; the snapshot is
per shard; restore is bit-exact."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..reference_sam import NAMES, flatten, sam_gradient
from .test_distributed import _free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "distributed" / "fsdp_worker.py"), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_fsdp_engine_step_matches_synchronized_float64_reference(fsdp_ranks):
    weights = fsdp_ranks[0]["weights"]
    shapes = {n: tuple(weights[n].shape) for n in NAMES}
    w = flatten(weights)
    # the all-ranks gradient of equal per-rank batches = the gradient of the joint batch's mean loss
    x = torch.cat([r["x"] for r in fsdp_ranks])
    y = torch.cat([r["y"] for r in fsdp_ranks])
    assert not torch.equal(fsdp_ranks[0]["x"], fsdp_ranks[1]["x"])
    checked = 0
    for r0, r1 in zip(fsdp_ranks[0]["results"], fsdp_ranks[1]["results"], strict=True):
        rule, k, adaptive, descent = r0["config"]
        want, first_norm, d_norm = sam_gradient(
            w, shapes, x, y, k, 0.3, rule=rule, adaptive=adaptive, descent=descent, norms=True
        )
        for result in (r0, r1):
            got = torch.cat([g.reshape(-1) for g in result["grad"]])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=str(r0["config"]))
            assert result["first_norm"] == pytest.approx(float(first_norm), rel=1e-12)
            assert result["perturbation_norm"] == pytest.approx(float(d_norm), rel=1e-10)
            assert result["grad_is_sharded"] and result["restored"]
        checked += 1
    assert checked == 36


def test_fsdp_non_finite_ascent_is_dropped_on_every_rank(fsdp_ranks):
    weights = fsdp_ranks[0]["weights"]
    shapes = {n: tuple(weights[n].shape) for n in NAMES}
    x = torch.cat([r["x"] for r in fsdp_ranks])
    y = torch.cat([r["y"] for r in fsdp_ranks])
    plain = sam_gradient(flatten(weights), shapes, x, y, 0, 0.3)  # k=0: the gradient at w
    for rank in fsdp_ranks:
        assert rank["skipped"]["skipped"] and rank["skipped"]["finite_weights"]
        got = torch.cat([g.reshape(-1) for g in rank["skipped"]["grad"]])
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-12)


def test_fsdp_snapshot_is_per_shard(fsdp_ranks):
    total = sum(v.numel() for v in fsdp_ranks[0]["weights"].values())
    per_rank = [r["results"][0]["backup_elements"] for r in fsdp_ranks]
    assert sum(per_rank) == total and max(per_rank) < total
    # shards are views into FSDP's own buffers: the engine snapshots and copies back instead of swapping
    assert all(result["perturbed_weights"] == "copy" for r in fsdp_ranks for result in r["results"])


def test_dtensor_parameters_through_the_trainer_match_the_unsharded_run(tmp_path):
    """One process: accelerate is not in FSDP mode (it enables FSDP on accelerators only), but the
    model's parameters are fully_shard DTensors, so SAMTrainer's step, the Trainer's clipping and the
    optimizer all run on shards. Three steps equal the same run on the plain model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tests" / "distributed" / "fsdp_trainer_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(tmp_path / "trainer.pt")
    for name, result in results.items():
        assert result["dtensor"] == "DTensor"
        for n in NAMES:
            torch.testing.assert_close(result["sharded"][n], result["plain"][n], rtol=0, atol=1e-12, msg=name + n)
        assert len(result["sharded_logs"]) == 3
        for plain, sharded in zip(result["plain_logs"], result["sharded_logs"], strict=True):
            assert plain.keys() == sharded.keys()
            for key in plain:
                assert sharded[key] == pytest.approx(plain[key], rel=1e-9, abs=1e-12), (name, key)


# the worker's FAMILY configs in the reference's keys
FAMILY = {
    "gsam-k2-asam": {"k": 2, "descent": "gsam", "adaptive": True},
    "wsam-decoupled": {"descent": "wsam"},
    "friendly-k2": {"k": 2, "direction": "friendly"},
    "looksam-tensor": {"every_n": 2, "reuse_alpha": 0.7, "granularity": "tensor"},
    "msam": {"method": "msam"},
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_fsdp_family_matches_the_joint_batch(fsdp_ranks, name):
    """Three optimizer steps of each family method on FSDP2 shards equal the float64 reference of one
    process on both ranks' batches (norms, dots and per-tensor reductions over all shards)."""
    from ..reference_family import simulate
    from ..tiny import batch_of, make_data

    results = [r["family"][name] for r in fsdp_ranks]
    start = results[0]["start"]
    rows = make_data(12 * 3, seed=11)
    steps = [[batch_of(rows[t * 12 : t * 12 + 12])] for t in range(3)]
    shapes = {n: tuple(start[n].shape) for n in NAMES}
    want = simulate(
        flatten(start), shapes, steps, {"rho": 0.3, **FAMILY[name]}, {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    )
    for r in results:
        torch.testing.assert_close(flatten(r["end"]), want[-1], rtol=0, atol=1e-12)
    assert (want[-1] - flatten(start)).abs().max() > 1e-3
