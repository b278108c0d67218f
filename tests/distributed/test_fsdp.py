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

from ..helpers import free_port
from ..reference_sam import NAMES, flatten, sam_gradient

ROOT = Path(__file__).resolve().parents[2]


def _launch(out: Path, ranks: int, *mode: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_port", str(free_port()), str(ROOT / "tests" / "distributed" / "fsdp_worker.py"), str(out), *mode,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(ranks)]


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp"), 2)


@pytest.fixture(scope="module")
def fsdp_four_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp4"), 4, "accumulation")


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


# the worker's MIXED configs as SAMConfig fields
MIXED = {"k1": {"ascent_steps": 1}, "k2-asam": {"ascent_steps": 2, "adaptive": True}}


def _one_process_autocast(start: dict, config: dict, bf16: bool) -> torch.Tensor:
    """What DDP with --bf16 computes: fp32 weights, the forward under bf16 autocast, the joint batch."""
    import torch.nn.functional as F

    from hf_sam import MultiStepAscent, SAMConfig

    from ..tiny import TinyNet, batch_of, make_data

    model = TinyNet(dtype=torch.float32)
    model.load_state_dict({n: w.float() for n, w in start.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sam = config.get("ascent_steps", 1) > 0
    engine = MultiStepAscent(model.parameters(), **SAMConfig(rho=0.3, **config).engine_kwargs()) if sam else None
    rows = make_data(12 * 3, seed=13, dtype=torch.float32)
    for t in range(3):
        x, y = batch_of(rows[t * 12 : t * 12 + 12])

        def loss(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return F.cross_entropy(model(x)["logits"], y)

        engine.step(loss) if sam else loss().backward()
        optimizer.step()
        optimizer.zero_grad()
    return flatten({n: p.detach().double() for n, p in model.named_parameters()})


@pytest.mark.parametrize("name", list(MIXED))
def test_fsdp_bf16_mixed_precision_policy_equals_one_process_bf16(fsdp_ranks, name):
    """FSDP2's MixedPrecisionPolicy (bf16 parameters for compute, fp32 shards and reduction) with SAM equals
    one process under --bf16 autocast on the joint batches within bf16 rounding (measured, torch 2.13: 1.0e-4
    to 1.7e-4 of the weights' norm from one-process bf16 and from fp32; no SAM lands 4e-3 to 1.6e-2 away)."""
    results = [r["mixed"][name] for r in fsdp_ranks]
    for r in results:  # fp32 shards, bf16 compute
        assert r["shard_dtypes"] == ["torch.float32"] and r["compute_dtypes"] == ["torch.bfloat16"]
        torch.testing.assert_close(flatten(r["end"]), flatten(results[0]["end"]), rtol=0, atol=0)
    start = {n: w.double() for n, w in results[0]["start"].items()}
    got = flatten({n: w.double() for n, w in results[0]["end"].items()})
    bf16 = _one_process_autocast(start, MIXED[name], bf16=True)
    fp32 = _one_process_autocast(start, MIXED[name], bf16=False)
    no_sam = _one_process_autocast(start, {"ascent_steps": 0}, bf16=True)

    def distance(a, b):
        return float((a - b).norm() / b.norm())

    tolerance = 5e-4
    assert distance(got, bf16) < tolerance, distance(got, bf16)
    assert distance(got, fp32) < tolerance, distance(got, fp32)
    assert distance(no_sam, bf16) > 4 * tolerance, distance(no_sam, bf16)


# the worker's ACCUMULATION configs: the reference's keys and the micro-batches per step
ACCUMULATION = {
    "k1-m2": ({"k": 1}, 2),
    "k2-projected-asam-m3": ({"k": 2, "rule": "projected", "adaptive": True}, 3),
    "k2-mean-m2": ({"k": 2, "descent": "mean"}, 2),
}


@pytest.mark.parametrize("name", list(ACCUMULATION))
@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp_gradient_accumulation_matches_the_synchronized_float64_reference(request, ranks, name):
    """Under the Trainer's no_sync, every micro-batch still gets its own perturbation from its all-ranks
    gradient, and the descents add up to the step's update: two SGD steps equal the float64 reference of
    the joint micro-batches (mean over the micro-batches of synchronized SAM), on 2 and on 4 ranks."""
    from ..tiny import make_data

    launched = request.getfixturevalue("fsdp_ranks" if ranks == 2 else "fsdp_four_ranks")
    cfg, micro = ACCUMULATION[name]
    results = [r["accumulation"][name] for r in launched]
    start = results[0]["start"]
    shapes = {n: tuple(start[n].shape) for n in NAMES}
    per_micro = 3 * ranks
    rows = make_data(per_micro * micro * 2, seed=17)
    w = flatten(start)
    for t in range(2):
        g = 0
        for m in range(micro):
            joint = rows[(t * micro + m) * per_micro : (t * micro + m + 1) * per_micro]
            x = torch.stack([r["x"] for r in joint])
            y = torch.stack([r["labels"] for r in joint])
            g = g + sam_gradient(w, shapes, x, y, rho=0.3, **cfg) / micro
        w = w - 0.1 * g
    for r in results:
        torch.testing.assert_close(flatten(r["end"]), w, rtol=0, atol=1e-12)
        # SAM's snapshot is this rank's shard, never a full copy of the weights
        assert r["sam_elements"] == r["shard_elements"] < r["model_elements"]
        # and no operator in the engine's calls creates a tensor bigger than this rank's largest shard (a full-size
        # copy of the largest parameter would be); the snapshot of that shard is seen (the tracker is not blind)
        assert r["largest_allocation"] == r["largest_shard"] < r["largest_param"], r
    assert sum(r["sam_elements"] for r in results) == results[0]["model_elements"]
    # the comparison is not vacuous: the two steps move the weights
    assert (w - flatten(start)).abs().max() > 1e-3
