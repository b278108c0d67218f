"""The mean descent: the mean of the gradients at w + d_1 .. w + d_k.

The gradients at d_1 .. d_{k-1} are summed during the ascent; at the descent (1/k) times the sum is
added to the gradients already accumulated (other micro-batches) and the descent loss is scaled by
1/k, so that p.grad ends with held + (1/k) * (g_1 + ... + g_k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ascent_record import AscentRecord
from ..guarded import add_scaled_unless_
from ..tensors import grad_like, local
from ..variants import Variant, declare_builtin
from .base import DescentContext, LastDescent


class MeanDescentSum:
    """S = g_1 + ... + g_{k-1}, one buffer per tensor (local shards), filled on the device: a step
    flagged ``skip`` (a dropped ascent) adds nothing, so S stays finite."""

    def __init__(self, size: int) -> None:
        self.sums: list[Tensor | None] = [None] * size
        self._one: Tensor | None = None

    def add(self, idx: list[int], grads: list[Tensor], skip: Tensor) -> None:
        """S += g unless ``skip`` (a 0-d bool tensor); a tensor's first gradient starts from zero."""
        fresh = [(j, g) for j, g in zip(idx, grads, strict=True) if self.sums[j] is None]
        if fresh:  # zeros shaped like g, one foreach call (g * 0 alone would keep a nan)
            zeros = torch._foreach_mul([g for _, g in fresh], 0.0)
            torch._foreach_zero_(zeros)
            for (j, _), z in zip(fresh, zeros, strict=True):
                self.sums[j] = z
        if self._one is None:
            self._one = torch.ones((), dtype=torch.float64, device=skip.device)
        add_scaled_unless_([self.sums[j] for j in idx], grads, self._one, skip)

    def fold_into(
        self,
        held: list[Tensor | None],
        params: list[Tensor],
        factor: Tensor,
        skip: Tensor,
        divide_by: list[Tensor] | None = None,
    ) -> None:
        """held += factor * S (nothing if ``skip``), where held are the gradients set aside (None: S
        becomes the gradient, zero if ``skip``); ``divide_by``: ASAM's T, when S summed T g."""
        pairs = [(j, s) for j, s in enumerate(self.sums) if s is not None]
        if divide_by is not None and pairs:
            torch._foreach_div_([s for _, s in pairs], [divide_by[j] for j, _ in pairs])
        onto = [(local(held[j]), s) for j, s in pairs if held[j] is not None]
        alone = [(j, s) for j, s in pairs if held[j] is None]
        if onto:
            add_scaled_unless_([h for h, _ in onto], [s for _, s in onto], factor, skip)
        if alone:
            # S is finite (skipped adds wrote nothing); the factor is 0 for a dropped ascent
            kept = torch.where(skip, torch.zeros_like(factor), factor)
            torch._foreach_mul_([s for _, s in alone], kept)
            for j, s in alone:
                held[j] = grad_like(params[j], s)


class MeanDescent(LastDescent):
    """The mean of the gradients at w + d_1 .. w + d_k (a dropped ascent: the plain gradient at w)."""

    name = "mean"

    def __init__(self) -> None:
        self._sum: MeanDescentSum | None = None

    def begin(self, size: int) -> None:
        self._sum = MeanDescentSum(size)

    def ascent_gradient(self, step: int, idx: list[int], grads: list[Tensor], record: AscentRecord) -> None:
        if step >= 2:  # the gradient at d_{step-1}; T g under ASAM, divided by T at the fold
            self._sum.add(idx, grads, skip=record.dropped)

    def before_backward(self, engine: DescentContext) -> float | Tensor:
        factor: float | Tensor = 1.0
        if self._sum is not None and engine.steps_taken == engine.ascent_steps:
            dropped = engine.record.dropped
            one = torch.ones((), dtype=torch.float64, device=dropped.device)
            factor = torch.where(dropped, one, one / engine.ascent_steps)
            self._sum.fold_into(engine.held_grads, engine.params, factor, skip=dropped, divide_by=engine.asam_scale)
        self._sum = None
        engine.return_held_grads()
        return factor


declare_builtin(
    Variant("descent", "mean", "the mean of the gradients at w + d_1 .. w + d_k", lambda o, rho: MeanDescent())
)  # fmt: skip
