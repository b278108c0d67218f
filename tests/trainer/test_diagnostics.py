"""sam_diagnostics: losses along the ascent and direction cosines, against a float64 hand computation."""

import pytest
import torch
from transformers import set_seed

from ..helpers import LogRecorder, WeightRecorder, sam_trainer
from ..reference_sam import flatten, grad_at, loss_at
from ..tiny import TinyNet, batch_of, make_data


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("descent", ["last", "mean"])
def test_ascent_losses_norms_and_cosines(tmp_path, descent):
    set_seed(0)
    model = TinyNet()
    data = make_data(4)
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = sam_trainer(
        tmp_path, model, data, [rec, logs], sam_ascent_steps=2, sam_rho=0.4, sam_diagnostics=True, sam_descent=descent
    )
    trainer.train()
    entry = [e for e in logs.logs if "loss" in e][-1]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    x, y = batch_of(data)
    w = flatten(rec.before[0])
    g1 = grad_at(w, shapes, x, y)
    d1 = 0.2 * g1 / g1.norm()
    g2 = grad_at(w + d1, shapes, x, y)
    d2 = d1 + 0.2 * g2 / g2.norm()
    g3 = grad_at(w + d2, shapes, x, y)
    descent_grad = g3 if descent == "last" else (g2 + g3) / 2
    for i, d in enumerate([0 * d1, d1, d2]):
        assert entry[f"sam/ascent_loss_{i}"] == pytest.approx(float(loss_at(w + d, shapes, x, y)), abs=1e-10)
    assert entry["sam/ascent_grad_norm_1"] == pytest.approx(float(g1.norm()), rel=1e-9)
    assert entry["sam/ascent_grad_norm_2"] == pytest.approx(float(g2.norm()), rel=1e-9)
    assert entry["sam/cos_successive"] == pytest.approx(_cos(g1, g2), abs=1e-9)
    assert entry["sam/cos_first_descent"] == pytest.approx(_cos(g1, descent_grad), abs=1e-9)
    assert entry["sam/cos_first_descent"] < 0.999  # the perturbation really turned the gradient


def test_diagnostics_off_by_default(tmp_path):
    set_seed(0)
    logs = LogRecorder()
    sam_trainer(tmp_path, TinyNet(), make_data(4), [logs], sam_ascent_steps=2).train()
    entry = [e for e in logs.logs if "loss" in e][-1]
    assert not any(key.startswith(("sam/ascent_", "sam/cos_")) for key in entry)


def _bf16_clean_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The clean pass's gradient as the trainer's bf16 autocast computes it (the same ops, by hand)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x)["logits"].float(), y)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("rho", [0.002, 0.3])
def test_perturbation_fidelity_equals_a_hand_computation(tmp_path, rho):
    """Under --bf16 the perturbed pass's Linear layers compute with bf16(w + e): the logged fidelity is the
    cosine of bf16(w + e) - bf16(w) with e = rho g / ||g||, computed here from the weights and the gradient."""
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    data = make_data(4, dtype=torch.float32)
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = sam_trainer(tmp_path, model, data, [rec, logs], sam_rho=rho, sam_diagnostics=True, bf16=True)
    x, y = batch_of(data)
    grads = _bf16_clean_gradient(model, x, y)
    trainer.train()
    entry = [e for e in logs.logs if "loss" in e][-1]
    w = [rec.before[0][n] for n, _ in model.named_parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    moved = [(wi.double() + rho * g.double() / norm).float() for wi, g in zip(w, grads, strict=True)]
    intended = torch.cat([(m.double() - wi.double()).reshape(-1) for m, wi in zip(moved, w, strict=True)])
    realized = torch.cat(
        [(m.bfloat16().double() - wi.bfloat16().double()).reshape(-1) for m, wi in zip(moved, w, strict=True)]
    )
    want = _cos(realized, intended)
    assert entry["sam/perturbation_fidelity"] == pytest.approx(want, abs=1e-6)
    assert entry["sam/perturbation_fidelity_norm_ratio"] == pytest.approx(
        float(realized.norm() / intended.norm()), rel=1e-6
    )
    if rho < 0.01:  # a perturbation at the bf16 rounding step of the weights is visibly mangled
        assert want < 0.95


def test_no_fidelity_in_fp32_or_between_logging_steps(tmp_path):
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    logs = LogRecorder()
    trainer = sam_trainer(
        tmp_path, model, make_data(12, dtype=torch.float32), [logs], sam_diagnostics=True, max_steps=3
    )
    trainer.train()
    assert not any("sam/perturbation_fidelity" in e for e in logs.logs)
    logs = LogRecorder()
    model = TinyNet(dtype=torch.float32)
    measured = []
    trainer = sam_trainer(
        tmp_path, model, make_data(12, dtype=torch.float32), [logs], sam_diagnostics=True, max_steps=3,
        bf16=True, logging_steps=2,
    )  # fmt: skip
    original = trainer._sam_fidelity.probe
    trainer._sam_fidelity.probe = lambda *a: measured.append(original(*a) is not None) or original(*a)
    trainer.train()
    assert measured == [False, True, False]  # only step 2 is logged
    assert [("sam/perturbation_fidelity" in e) for e in logs.logs if "loss" in e] == [True]
