"""XSAM's descent against a float64 reference written from the paper's formulas (tests/reference_sam.py)."""

import pytest
import torch
from transformers import set_seed

from hf_sam import MultiStepAscent, SAMConfig

from ..helpers import WeightRecorder, sam_trainer
from ..reference_sam import flatten, sam_gradient, xsam_best_alpha, xsam_gradient
from ..tiny import TinyNet, batch_of, make_data


def _engine_step(rule, k, alpha, descent="xsam", **extra):
    set_seed(0)
    model = TinyNet()
    x, y = batch_of(make_data(6))
    kwargs = dict(ascent_steps=k, rho=0.3, ascent_rule=rule, descent=descent, **extra)
    if descent == "xsam":
        kwargs["xsam_alpha"] = alpha
    engine = MultiStepAscent(model.parameters(), **SAMConfig(**kwargs).engine_kwargs())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.step(lambda: model(x, y)["loss"])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return model, engine, before, shapes, x, y, grad


@pytest.mark.parametrize("rule", ["normalized", "projected", "accumulated"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.7])
def test_xsam_descent_matches_float64_reference(rule, k, alpha):
    model, engine, before, shapes, x, y, got = _engine_step(rule, k, alpha)
    want, phi = xsam_gradient(flatten(before), shapes, x, y, k, 0.3, alpha, rule=rule)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert float(engine.xsam_angle) == pytest.approx(float(phi), abs=1e-9)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("rule", ["normalized", "projected"])
@pytest.mark.parametrize("k", [1, 3])
def test_xsam_alpha_one_is_sam_bit_for_bit(rule, k):
    xsam = _engine_step(rule, k, 1.0)[-1]
    last = _engine_step(rule, k, None, descent="last")[-1]
    assert torch.equal(xsam, last)


def test_xsam_alpha_zero_descends_along_the_ascent():
    model, engine, before, shapes, x, y, got = _engine_step("normalized", 2, 0.0)
    g_norm = torch.linalg.norm(sam_gradient(flatten(before), shapes, x, y, 2, 0.3))
    # along d_k with the length of g_k: the cosine with d_k is 1
    want, _ = xsam_gradient(flatten(before), shapes, x, y, 2, 0.3, 0.0)
    assert float(torch.linalg.norm(got)) == pytest.approx(float(g_norm), rel=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_dynamic_alpha_is_the_reference_argmax():
    set_seed(0)
    model = TinyNet()
    x, y = batch_of(make_data(6))
    engine = MultiStepAscent(
        model.parameters(), **SAMConfig(ascent_steps=2, rho=0.5, descent="xsam", xsam_rho_max=1.5).engine_kwargs()
    )
    w = flatten(dict(model.named_parameters()))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    alphas = [round(0.1 * i, 1) for i in range(21)]
    engine.begin()
    for _ in range(2):
        model(x, y)["loss"].backward()
        engine.ascend()
    engine.begin_descent()
    model(x, y)["loss"].backward()
    chosen = engine.choose_xsam_alpha(lambda: model(x, y)["loss"], alphas)
    engine.end_descent()
    engine.restore()
    want, losses = xsam_best_alpha(w, shapes, x, y, 2, 0.5, 1.5, alphas)
    assert chosen == want
    assert max(losses) - sorted(losses)[-2] > 1e-9  # a unique answer, not a tie
    # the descent then used the chosen alpha
    expected, _ = xsam_gradient(w, shapes, x, y, 2, 0.5, chosen)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.7])
def test_xsam_through_the_trainer_with_accumulation(tmp_path, alpha):
    """Each micro-batch forms its own ||g_k|| u(alpha); the Trainer sums them (the loss is divided by 2)."""
    set_seed(0)
    model = TinyNet()
    data = make_data(8)
    w = flatten(dict(model.named_parameters()))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    rec = WeightRecorder()
    sam_trainer(
        tmp_path, model, data, [rec], gradient_accumulation_steps=2, per_device_train_batch_size=4,
        sam_ascent_steps=2, sam_rho=0.3, sam_descent="xsam", sam_xsam_alpha=alpha,
    ).train()  # fmt: skip
    total = sum(xsam_gradient(w, shapes, *batch_of(data[m * 4 : m * 4 + 4]), 2, 0.3, alpha)[0] for m in range(2))
    torch.testing.assert_close(flatten(rec.final), w - 0.1 * total / 2, rtol=0, atol=1e-12)


def test_dynamic_alpha_through_the_trainer_is_logged_and_resumes(tmp_path):
    """The Trainer chooses alpha at the first step of every epoch (3 steps per epoch here), logs it
    with the angle, and a run resumed mid-epoch keeps the alpha chosen before the checkpoint."""
    from hf_sam.engine.descents.xsam import alpha_grid

    data = make_data(12)
    common = dict(
        max_steps=6, sam_ascent_steps=2, sam_rho=0.5, sam_descent="xsam", sam_xsam_rho_max=1.5,
        save_strategy="steps", save_steps=4, train_sampling_strategy="random",
    )  # fmt: skip
    set_seed(0)
    full = sam_trainer(tmp_path / "full", TinyNet(), data, **common)
    chosen = []
    original = full._sam_loss_at

    def probing(*args):
        chosen.append(full.state.global_step)
        return original(*args)

    full._sam_loss_at = probing
    full.train()
    assert sorted(set(chosen)) == [0, 3] and len(chosen) == 2 * len(alpha_grid(2.0))  # epochs 0 and 1
    logs = [entry for entry in full.state.log_history if "sam/xsam_alpha" in entry]
    assert len(logs) == 6 and all(0.0 <= entry["sam/xsam_alpha"] <= 2.0 for entry in logs)
    assert all(0.0 < entry["sam/xsam_angle"] < 180.0 for entry in logs)
    assert len({entry["sam/xsam_alpha"] for entry in logs[:3]}) == 1  # kept for the epoch
    set_seed(0)
    resumed = sam_trainer(tmp_path / "full", TinyNet(), data, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.sam_xsam_alpha == full.sam_xsam_alpha
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
