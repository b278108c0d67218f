"""Lookbehind-SAM against a float64 reference written from the published rule, with SGD momentum and
weight decay; resume through the optimizer's state."""

import pytest
import torch
from transformers import set_seed

from hf_sam.engine.lookbehind import LookbehindSAM

from ..reference_sam import NAMES, flatten, grad_at, unflatten
from ..tiny import TinyNet, batch_of, make_data

LR, MOMENTUM, DECAY, RHO = 0.1, 0.9, 0.01, 0.2


def _reference(w, shapes, batches, k, alpha, max_norm=0.0, decayed=NAMES):
    """phi after len(batches) Lookbehind steps, SGD(momentum, weight decay) written out by hand;
    ``max_norm`` clips every inner step's gradient as torch's clip_grad_norm_ does; weight decay acts
    on the tensors named in ``decayed``."""
    phi, momentum = w.clone(), None
    mask = torch.cat(
        [torch.full((int(torch.tensor(shapes[n]).prod()),), float(n in decayed), dtype=torch.float64) for n in NAMES]
    )
    for x, y in batches:
        theta, chain = phi.clone(), phi.clone()
        g = grad_at(chain, shapes, x, y)
        thetas = []
        for _ in range(k):
            chain = chain + RHO * g / torch.linalg.norm(g)
            g = grad_at(chain, shapes, x, y)
            step = g * min(1.0, max_norm / (float(torch.linalg.norm(g)) + 1e-6)) if max_norm else g
            d_p = step + DECAY * mask * theta
            momentum = d_p.clone() if momentum is None else MOMENTUM * momentum + d_p
            theta = theta - LR * momentum
            thetas.append(theta)
        move, first = thetas[-1] - phi, thetas[0] - phi
        if alpha is None:  # per tensor: (cos(theta_1 - phi, theta_k - phi) + 1) / 2
            f, m = unflatten(first, shapes), unflatten(move, shapes)
            a = {
                n: (torch.dot(f[n].reshape(-1), m[n].reshape(-1)) / (f[n].norm() * m[n].norm()) + 1) / 2 for n in NAMES
            }
            move = torch.cat([(a[n] * m[n]).reshape(-1) for n in NAMES])
        else:
            move = alpha * move
        phi = phi + move
    return phi


def _run(model, batches, k, alpha, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    lookbehind = LookbehindSAM(model.parameters(), optimizer, ascent_steps=k, rho=RHO, alpha=alpha)
    for x, y in batches:
        lookbehind.step(lambda x=x, y=y: model(x, y)["loss"])
    return optimizer, lookbehind


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.5, 1.0, None])
def test_lookbehind_matches_float64_reference(k, alpha):
    set_seed(0)
    model = TinyNet()
    data = make_data(12)
    batches = [batch_of(data[i : i + 4]) for i in (0, 4, 8)]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = _reference(flatten(dict(model.named_parameters())), shapes, batches, k, alpha)
    _, lookbehind = _run(model, batches, k, alpha)
    torch.testing.assert_close(flatten(dict(model.named_parameters())), want, rtol=0, atol=1e-12)
    if alpha is None:
        assert all(0.0 <= float(a) <= 1.0 for a in lookbehind.last_alphas)
        assert k == 1 or any(float(a) < 1.0 - 1e-6 for a in lookbehind.last_alphas)


def test_lookbehind_resumes_exactly_from_a_checkpoint(tmp_path):
    data = make_data(16)
    batches = [batch_of(data[i : i + 4]) for i in range(0, 16, 4)]
    set_seed(0)
    straight = TinyNet()
    _run(straight, batches, 2, None)
    set_seed(0)
    first = TinyNet()
    optimizer, _ = _run(first, batches[:2], 2, None)
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt")
    resumed = TinyNet()
    resumed.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(resumed.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    optimizer.load_state_dict(state["optimizer"])
    _run(resumed, batches[2:], 2, None, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_lookbehind_refuses_bad_settings():
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs in ({"ascent_steps": 0}, {"rho": 0.0}, {"alpha": 1.5}, {"alpha": 0.0}):
        with pytest.raises(ValueError):
            LookbehindSAM(model.parameters(), optimizer, **kwargs)


@pytest.mark.parametrize("k,alpha,max_norm", [(1, 0.5, 0.0), (2, None, 0.0), (3, 0.5, 0.05)])
def test_lookbehind_through_the_trainer_matches_float64_reference(tmp_path, k, alpha, max_norm):
    """SAMTrainer with sam_method=lookbehind: the first k - 1 inner steps in training_step, the k-th by
    the Trainer, clipping on every inner step, the scheduler once per batch."""
    from ..helpers import WeightRecorder, sam_trainer

    set_seed(0)
    model = TinyNet()
    data = make_data(12)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    batches = [batch_of(data[i : i + 4]) for i in (0, 4, 8)]
    # the Trainer leaves biases out of weight decay
    decayed = ("fc1.weight", "fc2.weight")
    want = _reference(flatten(dict(model.named_parameters())), shapes, batches, k, alpha, max_norm, decayed)
    rec = WeightRecorder()
    trainer = sam_trainer(
        tmp_path, model, data, [rec], max_steps=3, learning_rate=LR, weight_decay=DECAY, max_grad_norm=max_norm,
        optim="sgd", optim_args=f"momentum={MOMENTUM}", sam_method="lookbehind", sam_ascent_steps=k, sam_rho=RHO,
        sam_lookbehind_alpha=alpha,
    )  # fmt: skip
    trainer.train()
    torch.testing.assert_close(flatten(rec.final), want, rtol=0, atol=1e-12)
    assert all("sam/lookbehind_alpha" in entry for entry in trainer.state.log_history if "loss" in entry)


def test_lookbehind_trainer_resumes_exactly_and_refuses_what_it_cannot_do(tmp_path):
    from ..helpers import sam_trainer

    common = dict(
        max_steps=4, save_strategy="steps", save_steps=2, optim="sgd", optim_args=f"momentum={MOMENTUM}",
        sam_method="lookbehind", sam_ascent_steps=2, sam_rho=RHO, sam_lookbehind_alpha=None,
    )  # fmt: skip
    set_seed(0)
    full = sam_trainer(tmp_path / "a", TinyNet(), make_data(16), **common)
    full.train()
    set_seed(0)
    resumed = sam_trainer(tmp_path / "a", TinyNet(), make_data(16), **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True))
    for bad, message in (
        ({"gradient_accumulation_steps": 2}, "gradient accumulation"),
        ({"sam_descent": "mean"}, "own ascent and descent"),
    ):
        with pytest.raises(ValueError, match=message):
            sam_trainer(tmp_path / "b", TinyNet(), make_data(4), **{**common, **bad})
