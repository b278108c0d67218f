"""A float64 multi-step SAM written independently of hf_sam, on one flat weight vector.

It shares no code with the package: the TinyNet forward is written out by hand here and the
ascent is a per-vector loop straight from the algorithm's definition.
"""

from __future__ import annotations

import torch

NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def flatten(state: dict) -> torch.Tensor:
    return torch.cat([state[n].detach().double().reshape(-1) for n in NAMES])


def unflatten(vec: torch.Tensor, shapes: dict) -> dict:
    out, i = {}, 0
    for n in NAMES:
        size = int(torch.tensor(shapes[n]).prod())
        out[n] = vec[i : i + size].reshape(shapes[n])
        i += size
    return out


def loss_at(vec: torch.Tensor, shapes: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = unflatten(vec, shapes)
    h = torch.tanh(x @ w["fc1.weight"].T + w["fc1.bias"])
    logits = h @ w["fc2.weight"].T + w["fc2.bias"]
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean()


def grad_at(vec, shapes, x, y):
    v = vec.detach().clone().requires_grad_(True)
    loss = loss_at(v, shapes, x, y)
    (g,) = torch.autograd.grad(loss, v)
    return g


def sam_gradient(
    vec, shapes, x, y, k, rho, rule="normalized", step_mult=1.0, adaptive=False, eta=0.01, descent="last", norms=False
):
    """The SAM descent gradient for one batch at weights ``vec``; with ``norms`` also the first ascent
    gradient's norm ||T g_1|| and the perturbation's ||d_k / T||."""
    if k == 0:
        return grad_at(vec, shapes, x, y)
    t = vec.abs() + eta if adaptive else torch.ones_like(vec)
    a = {"normalized": rho / k, "projected": rho * step_mult, "accumulated": rho}[rule]
    d = torch.zeros_like(vec)
    seen = []  # gradients at w + d_1 .. w + d_{k-1}
    first_norm = None
    for i in range(k):
        g = grad_at(vec + d, shapes, x, y)
        if i >= 1:
            seen.append(g)
        u = t * g
        first_norm = torch.linalg.norm(u) if first_norm is None else first_norm
        d = d + a * t * u / torch.linalg.norm(u)
        if rule == "projected":
            size = torch.linalg.norm(d / t)
            if size > rho:
                d = d * (rho / size)
    last = grad_at(vec + d, shapes, x, y)
    result = (sum(seen) + last) / k if descent == "mean" else last
    return (result, first_norm, torch.linalg.norm(d / t)) if norms else result
