"""With sam_every_n_steps > 1 (SAM every n steps, LookSAM) a logging window holds optimizer steps without
SAM's passes: sam/loss_clean, sam/loss_perturbed, sam/sharpness and sam/ascent_loss_i are averaged over
the SAM steps they come from. Checked against the per-step logs of the same run (learning rate 0, so the
weights and hence every step's losses are the same whatever the logging window)."""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from ..helpers import LogRecorder, sam_trainer
from ..tiny import TinyNet, make_data

STEPS, N = 12, 3
AVERAGED = ("sam/loss_clean", "sam/loss_perturbed", "sam/sharpness", "sam/ascent_loss_0", "sam/ascent_loss_1")


def _logs(tmp_path, logging_steps: int, **sam) -> list[dict]:
    set_seed(0)
    logs = LogRecorder()
    trainer = sam_trainer(
        tmp_path / str(logging_steps), TinyNet(), make_data(4 * STEPS), [logs], max_steps=STEPS,
        learning_rate=0.0, logging_steps=logging_steps, sam_ascent_steps=2, sam_rho=0.3, sam_every_n_steps=N,
        sam_diagnostics=True, **sam,
    )  # fmt: skip
    trainer.train()
    return [entry for entry in logs.logs if "loss" in entry]


@pytest.mark.parametrize("sam", [{}, {"sam_reuse_alpha": 0.7}], ids=["every-n", "looksam"])
@pytest.mark.parametrize("window", [N, 2 * N, 4])
def test_window_averages_are_over_the_sam_steps(tmp_path, sam, window):
    per_step = _logs(tmp_path, 1, **sam)
    windowed = _logs(tmp_path, window, **sam)
    assert len(per_step) == STEPS and len(windowed) == STEPS // window
    sam_steps = [entry for entry in per_step if "sam/loss_clean" in entry]
    assert len(sam_steps) == STEPS // N  # the full SAM steps: 1, 1 + N, ...
    for w, entry in enumerate(windowed):
        inside = [e for e in per_step[w * window : (w + 1) * window] if "sam/loss_clean" in e]
        assert inside, "every window here holds a SAM step"
        for key in AVERAGED:
            want = sum(e[key] for e in inside) / len(inside)
            assert entry[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key
        # the norms were right before too: per SAM micro-batch
        assert entry["sam/grad_norm"] == pytest.approx(sum(e["sam/grad_norm"] for e in inside) / len(inside))
    assert torch.isfinite(torch.tensor([e["sam/sharpness"] for e in windowed])).all()
