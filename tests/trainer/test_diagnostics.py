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
