"""The stateful SAM-family methods under DDP (2 gloo processes) with a synchronized ascent: several
optimizer steps equal the float64 reference of one process on the joint batch (F-SAM's momentum and
LookSAM's g_v are kept from the all-ranks gradients, so the ranks stay bit-identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..helpers import free_port
from ..reference_family import simulate
from ..reference_sam import NAMES, flatten

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _launch(tmp_path, cases: dict) -> dict[str, list[dict]]:
    """Every case in one launch of 2 processes (a launch is most of a case's time)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "tests" / "distributed" / "family_ddp_worker.py"), str(tmp_path),
        json.dumps({"steps": STEPS, "cases": cases}),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(tmp_path / f"rank{r}_{name}.pt") for r in range(2)] for name in cases}


CASES = {
    "friendly-k2": ({"sam_ascent_steps": 2, "sam_direction": "friendly", "sam_sync_ascent": True},
                    {"k": 2, "direction": "friendly"}),
    "looksam-global": ({"sam_every_n_steps": 2, "sam_reuse_alpha": 0.7, "sam_sync_ascent": True},
                       {"every_n": 2, "reuse_alpha": 0.7}),
    "wsam-decoupled": ({"sam_descent": "wsam", "sam_wsam_gamma": 0.6, "sam_sync_ascent": True},
                       {"descent": "wsam", "wsam_gamma": 0.6}),
    "msam": ({"sam_method": "msam"}, {"method": "msam"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def family_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("family_ddp"), {name: sam for name, (sam, _) in CASES.items()})


@pytest.mark.parametrize("case", list(CASES))
def test_family_under_ddp_matches_the_joint_batch(family_ranks, case):
    _, cfg = CASES[case]
    ranks = family_ranks[case]
    # two ranks that trained on different halves of every step's batch
    assert len(ranks) == 2 and not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])
    for name in NAMES:  # one perturbation and one state for all ranks: bit-identical weights
        assert torch.equal(ranks[0]["after"][name], ranks[1]["after"][name])
    start = ranks[0]["before"][0]
    shapes = {n: tuple(start[n].shape) for n in NAMES}
    joint = []
    for t in range(STEPS):
        x = torch.cat([r["batches"][t]["x"] for r in ranks])
        y = torch.cat([r["batches"][t]["labels"] for r in ranks])
        joint.append([(x, y)])
    want = simulate(flatten(start), shapes, joint, {"rho": 0.3, **cfg}, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    got = [flatten(w) for w in ranks[0]["before"][1:]] + [flatten(ranks[0]["after"])]
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"step {t}")
