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


def perturbation(vec, shapes, x, y, k, rho, rule="normalized", step_mult=1.0, adaptive=False, eta=0.01):
    """d_k of the ascent, as in sam_gradient."""
    t = vec.abs() + eta if adaptive else torch.ones_like(vec)
    a = {"normalized": rho / k, "projected": rho * step_mult, "accumulated": rho}[rule]
    d = torch.zeros_like(vec)
    for _ in range(k):
        u = t * grad_at(vec + d, shapes, x, y)
        d = d + a * t * u / torch.linalg.norm(u)
        if rule == "projected" and torch.linalg.norm(d / t) > rho:
            d = d * (rho / torch.linalg.norm(d / t))
    return d


def slerp_direction(d, g, alpha):
    """XSAM's u(alpha) between v0 = d/||d|| and v1 = g/||g||, straight from the paper's formula."""
    v0, v1 = d / torch.linalg.norm(d), g / torch.linalg.norm(g)
    phi = torch.arccos(torch.clamp(v0 @ v1, -1.0, 1.0))
    if torch.sin(phi) < 1e-8:
        s = v0 + v1
        return s / torch.linalg.norm(s) if torch.linalg.norm(s) > 0 else v1
    return (torch.sin((1 - alpha) * phi) * v0 + torch.sin(alpha * phi) * v1) / torch.sin(phi)


def xsam_gradient(vec, shapes, x, y, k, rho, alpha, **ascent):
    """XSAM's descent gradient ||g_k|| u(alpha) at weights ``vec``, and phi in degrees."""
    d = perturbation(vec, shapes, x, y, k, rho, **ascent)
    g = grad_at(vec + d, shapes, x, y)
    v0, v1 = d / torch.linalg.norm(d), g / torch.linalg.norm(g)
    phi = torch.rad2deg(torch.arccos(torch.clamp(v0 @ v1, -1.0, 1.0)))
    return torch.linalg.norm(g) * slerp_direction(d, g, alpha), phi


def xsam_best_alpha(vec, shapes, x, y, k, rho, rho_max, alphas, **ascent):
    """The alpha of the grid with the largest loss at w + rho_max u(alpha)."""
    d = perturbation(vec, shapes, x, y, k, rho, **ascent)
    g = grad_at(vec + d, shapes, x, y)
    losses = [float(loss_at(vec + rho_max * slerp_direction(d, g, a), shapes, x, y)) for a in alphas]
    return alphas[max(range(len(alphas)), key=losses.__getitem__)], losses
