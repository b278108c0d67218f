"""The "mean" descent: the mean of the gradients at w + d_1 .. w + d_k instead of the last one.

The gradients at d_1 .. d_{k-1} are summed here during the ascent; at the descent, (1/k) times the
sum is added to the gradients already accumulated (other micro-batches), and the descent loss is
scaled by 1/k, so that p.grad ends with held + (1/k) * (g_1 + ... + g_k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tensors import grad_like, local


class MeanDescentSum:
    """S = g_1 + ... + g_{k-1}, one buffer per tensor (local shards), filled with foreach kernels."""

    def __init__(self, size: int) -> None:
        self.sums: list[Tensor | None] = [None] * size

    def add(self, idx: list[int], grads: list[Tensor]) -> None:
        """S += g; a tensor's first gradient is copied in."""
        fresh = [(j, g) for j, g in zip(idx, grads, strict=True) if self.sums[j] is None]
        known = [(self.sums[j], g) for j, g in zip(idx, grads, strict=True) if self.sums[j] is not None]
        if known:
            torch._foreach_add_([s for s, _ in known], [g for _, g in known])
        if fresh:
            copies = torch._foreach_mul([g for _, g in fresh], 1.0)
            for (j, _), copy in zip(fresh, copies, strict=True):
                self.sums[j] = copy

    def fold_into(self, held: list[Tensor | None], params: list[Tensor], factor: float) -> None:
        """held += factor * S, where held are the gradients set aside (None: S becomes the gradient)."""
        pairs = [(j, s) for j, s in enumerate(self.sums) if s is not None]
        onto = [(local(held[j]), s) for j, s in pairs if held[j] is not None]
        alone = [(j, s) for j, s in pairs if held[j] is None]
        if onto:
            torch._foreach_add_([h for h, _ in onto], [s for _, s in onto], alpha=factor)
        if alone:
            torch._foreach_mul_([s for _, s in alone], factor)
            for j, s in alone:
                held[j] = grad_like(params[j], s)
