"""The ascent rules: how long each ascent step is, and the projection of the "projected" rule.

| rule | step length | projection |
|---|---|---|
| normalized | rho / k | none needed: the path is rho long |
| projected | rho * step_mult | onto ||d|| <= rho (||d / T|| under ASAM) |
| accumulated | rho | none: ||d|| can reach k rho |
"""

from __future__ import annotations

import torch
from torch import Tensor

from .guarded import add_scaled_unless_
from .tensors import ShardLayout, global_norm

RULES = ("normalized", "projected", "accumulated")


def step_size(rule: str, rho: float, ascent_steps: int, step_mult: float) -> float:
    """The length a of every ascent step, in the rule's norm."""
    if rule == "normalized":
        return rho / ascent_steps
    if rule == "projected":
        return rho * step_mult
    return rho


def displacement(
    weights: list[Tensor], backup: list[Tensor], scale: list[Tensor] | None, out: list[Tensor] | None = None
) -> list[Tensor]:
    """d = p - w, divided by T under ASAM (the norm the ball is defined in); written into ``out``
    (free buffers shaped like the weights) when given, else newly allocated."""
    if out is None:
        d = torch._foreach_sub(weights, backup)
    else:
        d = out
        torch._foreach_copy_(d, weights)
        torch._foreach_sub_(d, backup)
    if scale is not None:
        torch._foreach_div_(d, scale)
    return d


def project_(
    weights: list[Tensor],
    backup: list[Tensor],
    scale: list[Tensor] | None,
    rho: float,
    layout: ShardLayout,
    scratch: list[Tensor] | None = None,
    weights_uniform: bool = False,
) -> Tensor:
    """Move w + d onto ||d|| <= rho without a host sync; returns the projected ||d|| (0-d tensor)."""
    d = displacement(weights, backup, scale, scratch)
    norm = global_norm(d, layout, layout.flags())
    # c = min(1, rho/||d||); the division is safe because a moved point has ||d|| > 0
    shrink = torch.clamp(rho / norm.clamp_min(1e-300), max=1.0)
    if scale is not None:
        torch._foreach_mul_(d, scale)  # back to weight units
    # w + c d = (w + d) + (c - 1) d in one guarded pass, skipped inside the ball (c = 1: nothing to move)
    add_scaled_unless_(weights, d, shrink - 1, shrink >= 1, weights_uniform)
    return norm * shrink
