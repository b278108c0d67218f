"""A float64 multi-step SAM on any module, written from the algorithm with torch.func (no hf_sam).

The loss is a function of a dict {name: tensor} of the trainable parameters; frozen ones are held
fixed. Only the rule "normalized" (k steps of rho/k along g/||g||) and the descent "last".
"""

from __future__ import annotations

import torch
from torch.func import functional_call


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().double() for n, p in model.named_parameters() if p.requires_grad}


def loss_of(model, forward):
    """loss(params) = forward(lambda **kw: model with ``params`` swapped in)."""
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        state = {**frozen, **buffers, **params}
        return forward(lambda *args, **kwargs: functional_call(model, state, args, kwargs))

    return loss


def gradient(loss, point: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in point.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(leaves.items(), grads, strict=True)}


def sam_gradient(loss, w: dict[str, torch.Tensor], k: int, rho: float) -> dict[str, torch.Tensor]:
    """The descent gradient of k-step normalized SAM at ``w`` (k = 0: the plain gradient)."""
    d = {n: torch.zeros_like(v) for n, v in w.items()}
    for _ in range(k):
        g = gradient(loss, {n: w[n] + d[n] for n in w})
        norm = torch.sqrt(sum((x * x).sum() for x in g.values()))
        d = {n: d[n] + (rho / k) * g[n] / norm for n in w}
    return gradient(loss, {n: w[n] + d[n] for n in w})


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Summed cross-entropy over the positions whose label is not -100 (shifted for a causal LM)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum()
