"""Direction diagnostics of the ascent: cosines between successive ascent gradients and between the
first ascent gradient and the descent gradient (keeps two gradient copies: diagnostics, not speed)."""

from __future__ import annotations

import torch
from torch import Tensor

from .tensors import ShardLayout, global_dot, global_norm, local


def cosine(a: list[Tensor], b: list[Tensor], layout: ShardLayout, flags: list[bool]) -> Tensor:
    dot = global_dot(a, b, layout, flags)
    denominator = global_norm(a, layout, flags) * global_norm(b, layout, flags)
    return torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), torch.zeros_like(dot))


class DirectionTracker:
    """Collects the ascent gradients' directions of one step (local shards of every tensor)."""

    def __init__(self, local_params: list[Tensor], layout: ShardLayout) -> None:
        self.local_params = local_params
        self.layout = layout
        self.flags = layout.flags()
        self.successive: list[Tensor] = []
        self.first: list[Tensor] | None = None
        self.previous: list[Tensor] | None = None
        self.before_descent: list[Tensor | None] | None = None

    def ascent_gradient(self, idx: list[int], grads: list[Tensor], step: int) -> None:
        full = [torch.zeros_like(p) for p in self.local_params]
        for j, g in zip(idx, grads, strict=True):
            full[j] = g.detach().clone()
        if self.previous is not None:
            self.successive.append(cosine(self.previous, full, self.layout, self.flags))
        if step == 1:
            self.first = full
        self.previous = full

    def before_descent_backward(self, held: list[Tensor | None]) -> None:
        """The gradients accumulated before this batch: the descent direction is p.grad minus these."""
        if self.first is not None:
            self.before_descent = [None if g is None else local(g).clone() for g in held]

    def descent_cosine(self, grads: list[Tensor | None]) -> Tensor | None:
        """cos(first ascent gradient, descent gradient), from p.grad after the descent backward."""
        if self.first is None or self.before_descent is None:
            return None
        descent = []
        for p, g, pre in zip(self.local_params, grads, self.before_descent, strict=True):
            g = local(g) if g is not None else torch.zeros_like(p)
            descent.append(g - pre if pre is not None else g)
        return cosine(self.first, descent, self.layout, self.flags)
