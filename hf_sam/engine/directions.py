"""Ascent directions: the vector each ascent step normalizes, as small objects the engine calls.

- :class:`GradientDirection` (SAM): the ascent gradient itself.
- :class:`FriendlyDirection` (F-SAM, Li et al., CVPR 2024): the ascent gradient minus sigma times a
  momentum m of the clean gradients, which stands for the full-batch gradient; removing it leaves
  the batch-specific part that F-SAM ascends along. At the first step m = g and the direction is g;
  afterwards every ascent gradient of a step has sigma m subtracted (m as it was before the step),
  and m <- lambda m + (1 - lambda) g once per step, from the clean gradient g.

The engine calls ``begin`` (a new step), ``adjust`` (each ascent step's gradients, before ASAM's
scaling and the norm) and ``end`` (after the last ascent step, with the step's drop flag).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .guarded import replace_where_
from .variants import Variant, declare_builtin, finite_number, needs_one_gradient_for_all_ranks, option


class GradientDirection:
    """SAM's ascent direction: the gradient as it is."""

    name = "gradient"

    def begin(self, weights: list[Tensor]) -> None:
        """A new training step over ``weights`` (the trainable tensors, local shards under FSDP2)."""

    def adjust(self, step: int, idx: list[int], grads: list[Tensor], scale: Tensor | None = None) -> None:
        """Turn the gradients of ascent step ``step`` (tensors ``idx``) into the direction, in place; ``scale``:
        the factor the gradients carry (fp16 loss scaling), None for 1."""

    def end(self, dropped: Tensor) -> None:
        """After the last ascent step; ``dropped``: the 0-d bool set when the ascent was dropped."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (a resumed run)."""


class FriendlyDirection(GradientDirection):
    """F-SAM's direction g_i - sigma m, with m the momentum of the clean gradients (see the module)."""

    name = "friendly"

    def __init__(self, sigma: float, lam: float) -> None:
        self.sigma = float(sigma)
        self.lam = float(lam)
        self.momentum: list[Tensor] | None = None  # m, one tensor per trainable tensor
        self._next: list[Tensor] | None = None  # m after this step, formed at step 1 (reused buffers)
        self._weights: list[Tensor] = []
        self._saved: list[Tensor] | None = None  # a loaded m, placed at the next begin()

    def begin(self, weights: list[Tensor]) -> None:
        self._weights = weights
        if self._saved is not None:
            if [tuple(s.shape) for s in self._saved] != [tuple(w.shape) for w in weights]:
                raise ValueError(
                    "F-SAM's saved momentum does not fit these parameters: resume with the same model and, under "
                    "ZeRO or FSDP2 (where it is each process's own part), the same number of processes."
                )
            self.momentum = [s.to(device=w.device, dtype=w.dtype) for s, w in zip(self._saved, weights, strict=True)]
            self._saved = None

    def adjust(self, step: int, idx: list[int], grads: list[Tensor], scale: Tensor | None = None) -> None:
        if scale is not None:  # m is kept unscaled; a GradScaler's scale is a power of 2, so this is exact
            torch._foreach_div_(grads, scale)
        if step == 1:
            self._form_next(idx, grads)
        if self.momentum is not None and self.sigma != 0.0:
            torch._foreach_add_(grads, [self.momentum[j] for j in idx], alpha=-self.sigma)
        if scale is not None:
            torch._foreach_mul_(grads, scale)

    def _form_next(self, idx: list[int], grads: list[Tensor]) -> None:
        """m_next = lambda m + (1 - lambda) g (g = 0 for a tensor without a gradient), or g at the first step."""
        if self._next is None:
            self._next = [torch.zeros_like(w) for w in self._weights]
        if self.momentum is None:
            torch._foreach_zero_(self._next)
            torch._foreach_copy_([self._next[j] for j in idx], grads)
            return
        torch._foreach_mul_(self._next, 0.0)
        torch._foreach_add_(self._next, self.momentum, alpha=self.lam)
        torch._foreach_add_([self._next[j] for j in idx], grads, alpha=1.0 - self.lam)

    def end(self, dropped: Tensor) -> None:
        if self._next is None:
            return
        if self.momentum is None:
            # a dropped first step leaves m = 0 rather than a non-finite g
            zeros = [torch.zeros_like(t) for t in self._next]
            replace_where_(self._next, zeros, dropped)
            self.momentum, self._next = self._next, None
            return
        replace_where_(self._next, self.momentum, dropped)  # a dropped step keeps m
        self.momentum, self._next = self._next, self.momentum

    def state_dict(self) -> dict:
        return {"momentum": None if self.momentum is None else [m.detach().cpu() for m in self.momentum]}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self._next = None, None
        self._saved = state.get("momentum")


@dataclass
class FriendlyOptions:
    friendly_sigma: float = option(1.0, "F-SAM's sigma (>= 0): how much of the clean gradients' momentum is removed.")
    friendly_lambda: float = option(0.9, "F-SAM's lambda in [0, 1): the momentum's decay.")

    def check(self, fail) -> None:
        if not finite_number(self.friendly_sigma) or self.friendly_sigma < 0:
            fail("friendly_sigma", self.friendly_sigma, "it must be a finite number >= 0")
        if not finite_number(self.friendly_lambda) or not 0 <= self.friendly_lambda < 1:
            fail("friendly_lambda", self.friendly_lambda, "it must be in [0, 1)")


declare_builtin(
    Variant("direction", "gradient", "the ascent gradient itself (SAM)", lambda o, rho: GradientDirection(),
            needs_ascent=False)
)  # fmt: skip
declare_builtin(
    Variant("direction", "friendly", "each ascent gradient minus sigma times a momentum of the clean gradients",
            lambda o, rho: FriendlyDirection(o.friendly_sigma, o.friendly_lambda), FriendlyOptions,
            refusals=needs_one_gradient_for_all_ranks("the clean gradients' momentum m and g_s"),
            paper="F-SAM (Li et al., 2024, arXiv 2403.12350)")
)  # fmt: skip
