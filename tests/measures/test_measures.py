"""Sharpness measures and landscapes against closed forms on a quadratic whose Hessian is known."""

import math

import pytest
import torch
from torch import nn

from hf_sam.measures import landscape, sharpness


class Quadratic(nn.Module):
    """L(W) = 0.5 vec(W - C)^T A vec(W - C) (+ 0 * batch, so batches are accepted)."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor, c: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(w.clone())
        self.register_buffer("a", a)
        self.register_buffer("c", torch.zeros_like(w) if c is None else c)

    def forward(self, x=None):
        v = (self.weight - self.c).reshape(-1)
        return {"loss": 0.5 * v @ self.a @ v}


def _spd(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


EIGS = [5.0, 2.0, 1.0, 0.5, 0.25, 0.1]
BATCHES = [{"x": None}] * 2


def _model(eigs=EIGS, seed=0, at_minimum=False):
    a, q = _spd(eigs, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.zeros(2, 3, dtype=torch.float64) if at_minimum else torch.randn(2, 3, generator=g, dtype=torch.float64)
    return Quadratic(a, w), a, q


def test_top_eigenvalue_matches_closed_form():
    model, _, _ = _model()
    before = model.weight.detach().clone()
    result = sharpness.hessian_top_eigenvalue(model, sharpness.hf_loss, BATCHES, max_iterations=200, tolerance=1e-8)
    assert result.converged
    assert result.eigenvalue == pytest.approx(5.0, rel=1e-4)
    assert torch.equal(model.weight, before)


def test_top_eigenvalue_is_the_largest_algebraic_one_when_a_negative_one_dominates():
    """Power iteration returns the eigenvalue of largest magnitude (-8 here); lambda_max is 2."""
    eigs = [-8.0, 2.0, 1.0, 0.5, -0.3, 0.1]
    model, _, _ = _model(eigs, seed=4)
    result = sharpness.hessian_top_eigenvalue(model, sharpness.hf_loss, BATCHES, max_iterations=50, tolerance=1e-8)
    assert result.converged and result.residual <= 1e-8 * 2.0
    assert result.eigenvalue == pytest.approx(2.0, rel=1e-8)


def test_top_eigenvalue_reports_non_convergence():
    model, _, _ = _model([5.0, 4.99, 4.98, 1.0, 0.5, 0.1], seed=2)
    result = sharpness.hessian_top_eigenvalue(model, sharpness.hf_loss, BATCHES, max_iterations=2, tolerance=1e-12)
    assert not result.converged and result.iterations == 2 and result.residual > 0


def test_trace_matches_closed_form():
    model, a, _ = _model()
    result = sharpness.hessian_trace(model, sharpness.hf_loss, BATCHES, samples=400, seed=3)
    assert abs(result.trace - float(torch.trace(a))) < 4 * result.stderr + 1e-9
    assert result.stderr < 0.5
    diagonal = Quadratic(torch.diag(torch.tensor(EIGS, dtype=torch.float64)), torch.ones(2, 3, dtype=torch.float64))
    exact = sharpness.hessian_trace(diagonal, sharpness.hf_loss, BATCHES, samples=3)
    assert exact.trace == pytest.approx(sum(EIGS), abs=1e-12)  # z^T D z = tr(D) for every Rademacher z


def test_worst_case_loss_matches_closed_form_at_a_minimum():
    # at the minimum the worst point of the ball is rho * top eigenvector: 0.5 * lambda_max * rho^2
    model, _, _ = _model(at_minimum=True)
    rho = 0.1
    result = sharpness.worst_case_loss(model, sharpness.hf_loss, BATCHES[:1], rho=rho, steps=60, restarts=3, seed=0)
    assert result.clean_loss == pytest.approx(0.0, abs=1e-15)
    assert result.worst_loss == pytest.approx(0.5 * 5.0 * rho**2, rel=1e-3)
    assert result.worst_loss <= 0.5 * 5.0 * rho**2 + 1e-12  # never outside the ball
    assert torch.equal(model.weight, torch.zeros(2, 3, dtype=torch.float64))


def test_worst_case_loss_linearized_away_from_a_minimum():
    # for tiny rho the worst loss is L(w) + rho ||g|| to first order
    model, a, _ = _model()
    v = model.weight.detach().reshape(-1)
    g = a @ v
    rho = 1e-4
    result = sharpness.worst_case_loss(model, sharpness.hf_loss, BATCHES[:1], rho=rho, steps=10, restarts=1)
    assert result.sharpness == pytest.approx(rho * float(g.norm()), rel=1e-3)


def test_filter_normalized_direction_and_landscapes():
    model, a, _ = _model()
    w = model.weight.detach().clone()
    d = landscape.filter_normalized_direction(model, seed=0)[0]
    torch.testing.assert_close(d.norm(dim=1), w.norm(dim=1))
    d2 = landscape.filter_normalized_direction(model, seed=1)[0]
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]

    def exact(x):
        v = x.reshape(-1)
        return float(0.5 * v @ a @ v)

    line = landscape.loss_line(model, sharpness.hf_loss, BATCHES, [d], alphas)
    for alpha, value in zip(alphas, line, strict=True):
        assert value == pytest.approx(exact(w + alpha * d), rel=1e-12)
    surface = landscape.loss_surface(model, sharpness.hf_loss, BATCHES, ([d], [d2]), alphas, alphas[:3])
    assert surface.shape == (5, 3)
    assert surface[4, 1] == pytest.approx(exact(w + 1.0 * d - 0.5 * d2), rel=1e-12)
    up = landscape.ascent_direction(model, sharpness.hf_loss, BATCHES)[0]
    grad = (a @ w.reshape(-1)).reshape(2, 3)
    torch.testing.assert_close(up, grad / grad.norm())
    assert torch.equal(model.weight, w), "the weights are restored exactly"


def test_measures_restore_weights_after_an_error():
    model, _, _ = _model()
    w = model.weight.detach().clone()
    calls = {"n": 0}

    def failing_loss(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return sharpness.hf_loss(m, batch)

    with pytest.raises(RuntimeError):
        sharpness.worst_case_loss(model, failing_loss, BATCHES, rho=0.1, steps=5)
    assert torch.equal(model.weight, w)
    assert model.training


def test_hessian_through_attention_models():
    """Fused attention has no double backward; the measures switch to the math kernel."""
    from transformers import BertConfig, BertForSequenceClassification, set_seed

    set_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    model = BertForSequenceClassification(config)
    batch = {"input_ids": torch.randint(0, 50, (4, 7)), "labels": torch.tensor([0, 1, 0, 1])}
    eig = sharpness.hessian_top_eigenvalue(model, sharpness.hf_loss, [batch], max_iterations=5)
    assert math.isfinite(eig.eigenvalue)
