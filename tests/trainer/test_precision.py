"""Mixed precision: bf16 autocast on the CPU, and fp16 loss scaling with a GradScaler.

accelerate gives no GradScaler on the CPU, so the fp16 tests put a CPU GradScaler where
accelerate keeps its own (``accelerator.scaler``) before training: the Trainer then scales
every backward, unscales once before the optimizer step and skips steps with inf/NaN
gradients, exactly as on a GPU.
"""

import pytest
import torch
from transformers import set_seed

from ..helpers import LogRecorder, WeightRecorder, sam_trainer
from ..reference_family import simulate
from ..reference_sam import flatten, grad_at, sam_gradient
from ..tiny import TinyNet, batch_of, make_data

INIT_SCALE = 2.0**12


def _fp16_trainer(tmp_path, model, data, callbacks, **kw):
    trainer = sam_trainer(tmp_path, model, data, callbacks, fp16=True, **kw)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    trainer.accelerator.native_amp = True
    return trainer


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("rule", ["normalized", "projected"])
def test_fp16_loss_scaling_gives_the_unscaled_update(tmp_path, rule):
    # A float64 model is left alone by autocast, so only the loss scaling is under test.
    set_seed(0)
    model = TinyNet()
    data = make_data(8)
    rec = WeightRecorder()
    trainer = _fp16_trainer(
        tmp_path, model, data, [rec], max_steps=2, sam_ascent_steps=2, sam_rho=0.3, sam_ascent_rule=rule
    )
    trainer.train()
    after = rec.before[1:] + [rec.final]
    for step in range(2):
        x, y = batch_of(data[4 * step : 4 * step + 4])
        w = flatten(rec.before[step])
        want = w - 0.1 * sam_gradient(w, _shapes(model), x, y, 2, 0.3, rule=rule)
        torch.testing.assert_close(flatten(after[step]), want, rtol=0, atol=1e-12)
    assert trainer.accelerator.scaler.get_scale() == INIT_SCALE


def test_fp16_overflow_in_the_ascent_drops_the_perturbation_only(tmp_path):
    set_seed(0)
    model = TinyNet()
    data = make_data(4)
    model.poison = {2: float("inf")}  # the second ascent pass overflows: inf gradients
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = _fp16_trainer(tmp_path, model, data, [rec, logs], sam_ascent_steps=3, sam_rho=0.3)
    trainer.train()
    x, y = batch_of(data)
    w = flatten(rec.before[0])
    torch.testing.assert_close(flatten(rec.final), w - 0.1 * grad_at(w, _shapes(model), x, y), rtol=0, atol=1e-12)
    assert trainer.accelerator.scaler.get_scale() == INIT_SCALE, "the scaler never saw the ascent overflow"
    assert trainer.sam_skipped_ascents == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_overflow_in_the_descent_skips_the_optimizer_step(tmp_path):
    set_seed(0)
    model = TinyNet()
    data = make_data(4)
    model.poison = {3: float("inf")}  # k=2: the descent pass overflows
    rec = WeightRecorder()
    trainer = _fp16_trainer(tmp_path, model, data, [rec], sam_ascent_steps=2, sam_rho=0.3)
    trainer.train()
    assert torch.equal(flatten(rec.final), flatten(rec.before[0])), "the scaler skips the step"
    assert trainer.accelerator.scaler.get_scale() == INIT_SCALE / 2
    assert trainer.sam_skipped_ascents == 0


@pytest.mark.parametrize(
    "sam,cfg",
    [
        (
            {"sam_direction": "friendly", "sam_friendly_sigma": 0.8, "sam_friendly_lambda": 0.5, "sam_ascent_steps": 2},
            {"direction": "friendly", "sigma": 0.8, "lam": 0.5, "k": 2},
        ),
        ({"sam_descent": "wsam", "sam_wsam_gamma": 0.6}, {"descent": "wsam", "wsam_gamma": 0.6}),
    ],
    ids=["friendly", "wsam-decoupled"],
)
def test_fp16_state_kept_across_steps_is_unscaled(tmp_path, sam, cfg):
    """F-SAM's momentum and decoupled WSAM's term outlive the backward that made them, while the loss scale
    doubles at every step here: kept in scaled units they would be off by 2x (the momentum) or by the whole
    scale (WSAM's update after the optimizer step). Three AdamW steps equal the float64 reference."""
    set_seed(0)
    model = TinyNet()
    data = make_data(12)
    rec = WeightRecorder()
    trainer = sam_trainer(
        tmp_path, model, data, [rec], fp16=True, max_steps=3, optim="adamw_torch", learning_rate=0.01,
        sam_rho=0.3, **sam,
    )  # fmt: skip
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1)
    trainer.accelerator.native_amp = True
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == INIT_SCALE * 8, "the scale changed at every step"
    steps = [[batch_of(data[4 * t : 4 * t + 4])] for t in range(3)]
    adamw = {"name": "adamw", "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}
    want = simulate(flatten(rec.before[0]), _shapes(model), steps, {"rho": 0.3, **cfg}, adamw)
    got = [flatten(w) for w in rec.before[1:] + [rec.final]]
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"step {t}")


def test_fp16_skipped_step_drops_decoupled_wsam_update_too(tmp_path):
    """The descent overflows: the scaler skips the optimizer step, and WSAM's own update after it must not
    move the weights either."""
    set_seed(0)
    model = TinyNet()
    model.poison = {2: float("inf")}  # k=1: the descent pass
    rec = WeightRecorder()
    trainer = _fp16_trainer(tmp_path, model, make_data(4), [rec], sam_descent="wsam", sam_rho=0.3)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == INIT_SCALE / 2
    assert torch.equal(flatten(rec.final), flatten(rec.before[0]))


def test_bf16_autocast_trains_and_restores(tmp_path):
    set_seed(0)
    model = TinyNet(dtype=torch.float32, hidden=16)
    data = make_data(8, dtype=torch.float32)
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = sam_trainer(
        tmp_path,
        model,
        data,
        [rec, logs],
        bf16=True,
        max_steps=1,
        sam_ascent_steps=2,
        sam_rho=0.3,
        per_device_train_batch_size=8,
    )
    # the forward really runs in bf16
    x, y = batch_of(data)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    w = flatten(rec.before[0])
    got = flatten(rec.final) - w
    want = -0.1 * sam_gradient(w, _shapes(model), x.double(), y, 2, 0.3)
    cosine = torch.dot(got, want) / (got.norm() * want.norm())
    assert cosine > 0.99, f"bf16 update should point where the float64 one does (cos={cosine:.4f})"
    assert not torch.allclose(got, want, rtol=0, atol=1e-7), "bf16 autocast should be visible in the update"
    entry = [entry for entry in logs.logs if "loss" in entry][-1]
    assert all(torch.isfinite(torch.tensor(entry[key])) for key in ("sam/loss_clean", "sam/loss_perturbed"))
