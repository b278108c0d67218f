"""DDP with 2 CPU processes (gloo): the SAM update equals a single-process float64 reference built
from the per-rank batches, per-device perturbation (default) or one shared perturbation (sync)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..helpers import free_port
from ..reference_sam import NAMES, flatten, sam_gradient

ROOT = Path(__file__).resolve().parents[2]


def _launch(out: Path, jobs: dict[str, dict]) -> dict[str, list[dict]]:
    """Run ``jobs`` (name -> ddp_worker.run_job's arguments) one after the other in one launch of 2 processes;
    returns each job's results, one per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "tests" / "distributed" / "ddp_worker.py"), str(out), json.dumps(jobs),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(out / name / f"rank{r}.pt") for r in range(2)] for name in jobs}


CONFIGURATIONS = [(2, 1, False), (2, 2, False), (2, 1, True), (3, 2, True)]


@pytest.fixture(scope="module")
def ddp_jobs(tmp_path_factory):
    """Every run of this module in one launch (each launch costs ~10 s): the configurations, (2, 2, per-device)
    also resuming a 4-step run from its step-2 checkpoint, and XSAM."""
    jobs = {
        f"{k}-{grad_accum}-{sync}": {"k": k, "grad_accum": grad_accum, "sync": sync, "resume": (k, grad_accum, sync)
                                     == (2, 2, False)}
        for k, grad_accum, sync in CONFIGURATIONS
    }  # fmt: skip
    jobs["xsam"] = {"k": 2, "grad_accum": 1, "sync": True, "descent": "xsam"}
    return _launch(tmp_path_factory.mktemp("ddp"), jobs)


@pytest.fixture(scope="module")
def ddp_runs(ddp_jobs):
    return lambda k, grad_accum, sync: ddp_jobs[f"{k}-{grad_accum}-{sync}"]


@pytest.mark.parametrize("k,grad_accum,sync", CONFIGURATIONS)
def test_ddp_update_matches_float64_reference(ddp_runs, k, grad_accum, sync):
    ranks = ddp_runs(k, grad_accum, sync)
    before = ranks[0]["before"]
    assert all(torch.equal(before[n], r["before"][n]) for r in ranks for n in NAMES)
    shapes = {n: tuple(before[n].shape) for n in NAMES}
    w = flatten(before)
    total = torch.zeros_like(w)
    for m in range(grad_accum):
        micro = [(r["batches"][m]["x"], r["batches"][m]["labels"]) for r in ranks]
        assert not torch.equal(micro[0][0], micro[1][0]), "the ranks see different data"
        if sync:  # one perturbation from the all-reduced gradient = the gradient of the joint batch
            x = torch.cat([b[0] for b in micro])
            y = torch.cat([b[1] for b in micro])
            total += sam_gradient(w, shapes, x, y, k, 0.3) / grad_accum
        else:  # each rank its own perturbation; DDP averages the descent gradients
            for x, y in micro:
                total += sam_gradient(w, shapes, x, y, k, 0.3) / grad_accum / len(ranks)
    want = w - 0.1 * total
    for r in ranks:
        torch.testing.assert_close(flatten(r["after"]), want, rtol=0, atol=1e-12)
    assert all(torch.equal(ranks[0]["after"][n], ranks[1]["after"][n]) for n in NAMES)


def test_resume_under_ddp_is_bit_identical(ddp_runs):
    """SAM k=2, per-device perturbation, accumulation 2, dropout, shuffled data, AdamW: resumed from the step-2
    checkpoint, every rank ends bit for bit where the 4 steps straight end."""
    for rank in ddp_runs(2, 2, False):
        finals = rank["resume"]
        assert all(torch.equal(finals["straight"][n], finals["resumed"][n]) for n in NAMES)


def test_sync_and_per_device_differ(ddp_runs):
    a, b = ddp_runs(2, 1, False), ddp_runs(2, 1, True)
    assert (flatten(a[0]["after"]) - flatten(b[0]["after"])).abs().max() > 1e-6


def test_ddp_xsam_uses_the_all_reduced_gradient_and_the_shared_perturbation(ddp_jobs):
    """XSAM under DDP (synchronized ascent, required): every rank combines the same d_k (from the
    all-reduced ascent gradients) with the same all-reduced g_k, so the update is XSAM on the joint batch."""
    from ..reference_sam import xsam_gradient

    ranks = ddp_jobs["xsam"]
    before = ranks[0]["before"]
    shapes = {n: tuple(before[n].shape) for n in NAMES}
    x = torch.cat([r["batches"][0]["x"] for r in ranks])
    y = torch.cat([r["batches"][0]["labels"] for r in ranks])
    want = flatten(before) - 0.1 * xsam_gradient(flatten(before), shapes, x, y, 2, 0.3, 0.5)[0]
    for r in ranks:
        torch.testing.assert_close(flatten(r["after"]), want, rtol=0, atol=1e-12)
