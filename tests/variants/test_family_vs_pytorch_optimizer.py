"""At k = 1, SAMTrainer's GSAM, WSAM, F-SAM and LookSAM against a second implementation:
pytorch_optimizer 4.1.0's ``GSAM``, ``WSAM``, ``FriendlySAM`` and ``LookSAM``, driven as their
docstrings say, step for step on the same batches in float64.

pytorch_optimizer takes its gradient norms in float32 (its ``get_global_gradient_norm``), so the two
agree to about 1e-7 relative, not to float64 rounding: the tolerance below is 1e-6 of the distance
travelled.
Its ASAM has no eta (T = |w|): the ASAM cases set ``sam_adaptive_eta=0``. Its LookSAM works per
tensor (our ``sam_reuse_granularity="tensor"``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import set_seed

from ..helpers import WeightRecorder, sam_trainer
from ..tiny import TinyNet, batch_of, make_data

pytest.importorskip("pytorch_optimizer")
from pytorch_optimizer import GSAM, WSAM, FriendlySAM, LookSAM  # noqa: E402
from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler  # noqa: E402

LR, RHO, STEPS, BATCH, MOMENTUM = 0.1, 0.2, 5, 4, 0.9


def loss_of(model: torch.nn.Module, rows) -> torch.Tensor:
    x, y = batch_of(rows)
    return model(x, labels=y)["loss"]


def closure_of(opt, model: torch.nn.Module, rows):
    """Their closure: zero the gradients, the loss of ``rows``, backward."""

    def closure():
        opt.zero_grad()
        loss = loss_of(model, rows)
        loss.backward()
        return loss

    return closure


def trainer_weights(tmp_path, model: TinyNet, data, **sam) -> list[dict]:
    """The weights after each of STEPS optimizer steps of SAMTrainer (SGD with momentum, constant lr)."""
    recorder = WeightRecorder()
    trainer = sam_trainer(
        tmp_path,
        model,
        data,
        [recorder],
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        optim_args=f"momentum={MOMENTUM}",
        sam_rho=RHO,
        **sam,
    )
    trainer.train()
    return recorder.before[1:] + [recorder.final]


def batches(data):
    return [data[i * BATCH : (i + 1) * BATCH] for i in range(STEPS)]


def assert_same_path(ours: list[dict], theirs: list[dict], start: dict) -> None:
    """Every step moves the reference; ours stays within 1e-6 of the distance travelled so far (the
    float32 norms' rounding accumulates over the steps, through the momentum)."""
    previous = start
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert max(float((b[n] - previous[n]).abs().max()) for n in b) > 1e-3, "the reference should move"
        travelled = max(float((b[n] - start[n]).abs().max()) for n in b)
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6 * travelled, msg=f"step {step} {name}")
        previous = b


def snapshot(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _eta(adaptive: bool) -> dict:
    """Its ASAM's eta (0); without ASAM the knob is refused."""
    return {"sam_adaptive_eta": 0.0} if adaptive else {}


def setup():
    set_seed(0)
    model = TinyNet()
    return model, copy.deepcopy(model), make_data(n=STEPS * BATCH)


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_matches(tmp_path, adaptive):
    ours, theirs, data = setup()
    start = snapshot(theirs)
    got = trainer_weights(tmp_path, ours, data, sam_descent="gsam", sam_gsam_alpha=0.3, sam_adaptive=adaptive,
                          **_eta(adaptive))  # fmt: skip
    base = torch.optim.SGD(theirs.parameters(), lr=LR, momentum=MOMENTUM)
    constant = torch.optim.lr_scheduler.LambdaLR(base, lambda t: 1.0)
    rho = ProportionScheduler(constant, max_lr=LR, min_lr=0.0, max_value=RHO, min_value=RHO)
    opt = GSAM(theirs.parameters(), base, theirs, rho, alpha=0.3, adaptive=adaptive)
    want = []
    for rows in batches(data):
        x, y = batch_of(rows)
        opt.set_closure(lambda out, target: torch.nn.functional.cross_entropy(out["logits"], target), x, y)
        opt.step()
        want.append(snapshot(theirs))
    assert_same_path(got, want, start)


def test_gsam_rho_schedule_matches_proportion_scheduler(tmp_path):
    """sam_rho_schedule="lr" under a linear decay: GSAM's ProportionScheduler with the schedule's bounds."""
    ours, theirs, data = setup()
    start = snapshot(theirs)
    got = trainer_weights(tmp_path, ours, data, sam_descent="gsam", sam_rho_schedule="lr", sam_rho_min=0.05,
                          lr_scheduler_type="linear")  # fmt: skip
    base = torch.optim.SGD(theirs.parameters(), lr=LR, momentum=MOMENTUM)
    linear = torch.optim.lr_scheduler.LambdaLR(base, lambda t: max(0.0, (STEPS - t) / STEPS))
    rho = ProportionScheduler(linear, max_lr=LR, min_lr=0.0, max_value=RHO, min_value=0.05)
    opt = GSAM(theirs.parameters(), base, theirs, rho, alpha=0.4)
    want = []
    for rows in batches(data):
        x, y = batch_of(rows)
        opt.set_closure(lambda out, target: torch.nn.functional.cross_entropy(out["logits"], target), x, y)
        opt.step()
        linear.step()
        opt.update_rho_t()
        want.append(snapshot(theirs))
    assert_same_path(got, want, start)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches(tmp_path, decouple):
    ours, theirs, data = setup()
    start = snapshot(theirs)
    got = trainer_weights(tmp_path, ours, data, sam_descent="wsam", sam_wsam_gamma=0.8, sam_wsam_decouple=decouple)
    opt = WSAM(theirs, theirs.parameters(), torch.optim.SGD, rho=RHO, gamma=0.8, decouple=decouple, lr=LR,
               momentum=MOMENTUM)  # fmt: skip
    want = []
    for rows in batches(data):
        closure = closure_of(opt, theirs, rows)

        opt.step(closure)
        want.append(snapshot(theirs))
    assert_same_path(got, want, start)


def test_friendly_sam_matches(tmp_path):
    ours, theirs, data = setup()
    start = snapshot(theirs)
    got = trainer_weights(tmp_path, ours, data, sam_direction="friendly", sam_friendly_sigma=0.7,
                          sam_friendly_lambda=0.6)  # fmt: skip
    opt = FriendlySAM(theirs.parameters(), torch.optim.SGD, rho=RHO, sigma=0.7, lmbda=0.6, lr=LR, momentum=MOMENTUM)
    want = []
    for rows in batches(data):
        closure = closure_of(opt, theirs, rows)

        closure()
        opt.step(closure)
        want.append(snapshot(theirs))
    assert_same_path(got, want, start)


@pytest.mark.parametrize("adaptive", [False, True])
def test_looksam_matches(tmp_path, adaptive):
    ours, theirs, data = setup()
    start = snapshot(theirs)
    got = trainer_weights(tmp_path, ours, data, sam_every_n_steps=2, sam_reuse_alpha=0.6,
                          sam_reuse_granularity="tensor", sam_adaptive=adaptive, **_eta(adaptive))  # fmt: skip
    opt = LookSAM(theirs.parameters(), torch.optim.SGD, rho=RHO, k=2, alpha=0.6, adaptive=adaptive, lr=LR,
                  momentum=MOMENTUM)  # fmt: skip
    want = []
    for rows in batches(data):
        closure = closure_of(opt, theirs, rows)

        closure()
        if opt.get_step() % opt.k == 0:  # a full SAM step: the perturbed pass (their step() would always make it)
            opt.first_step(zero_grad=True)
            closure()
        opt.second_step(zero_grad=True)
        want.append(snapshot(theirs))
    assert_same_path(got, want, start)
