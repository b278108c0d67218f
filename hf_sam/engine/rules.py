"""The ascent rules: how long each ascent step is, and the projection of the "projected" rule.

| rule | step length | projection |
|---|---|---|
| normalized | rho / k | none needed: the path is rho long |
| projected | rho * step_mult | onto ||d|| <= rho (||d / T|| under ASAM) |
| accumulated | rho | none: ||d|| can reach k rho |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .guarded import add_scaled_unless_
from .tensors import ShardLayout, global_norm
from .variants import Variant, declare_builtin, finite_number, option


class AscentRule:
    """An ascent rule: the length of every ascent step (``step_size``) and whether the path is projected back
    onto the rho-ball after a step that may have left it (``projects``). SAM's normalized rule: rho / k."""

    name = "normalized"
    projects = False

    def step_size(self, rho: float, ascent_steps: int) -> float:
        """The length a of every ascent step, in the rule's norm."""
        return rho / ascent_steps


class AccumulatedRule(AscentRule):
    """Steps of rho, no projection: ||d|| can reach k rho."""

    name = "accumulated"

    def step_size(self, rho: float, ascent_steps: int) -> float:
        return rho


@dataclass
class ProjectedOptions:
    step_mult: float = option(1.0, "Step size of the 'projected' rule in units of rho (> 0).")

    def check(self, fail) -> None:
        if not finite_number(self.step_mult) or not self.step_mult > 0:
            fail("step_mult", self.step_mult, "it must be a finite number > 0")


class ProjectedRule(AscentRule):
    """Steps of step_mult rho, each followed by the projection onto ||d|| <= rho."""

    name = "projected"
    projects = True

    def __init__(self, step_mult: float = 1.0) -> None:
        self.step_mult = float(step_mult)

    def step_size(self, rho: float, ascent_steps: int) -> float:
        return rho * self.step_mult


declare_builtin(
    Variant("ascent_rule", "normalized", "k steps of rho/k: the path is rho long", lambda o, rho: AscentRule(),
            needs_ascent=False, )
)  # fmt: skip
declare_builtin(
    Variant("ascent_rule", "projected", "steps of step_mult rho, each projected onto the rho-ball",
            lambda o, rho: ProjectedRule(o.step_mult), ProjectedOptions, needs_ascent=False,
            paper="projected ascent (Andriushchenko & Flammarion, 2022, arXiv 2206.06232)")
)  # fmt: skip
declare_builtin(
    Variant("ascent_rule", "accumulated", "steps of rho, no projection (||d|| up to k rho)",
            lambda o, rho: AccumulatedRule(), needs_ascent=False)
)  # fmt: skip


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
