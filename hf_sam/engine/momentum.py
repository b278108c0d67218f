"""Momentum-SAM's perturbation (MSAM, Becker et al. 2024, arXiv 2401.12033), in pure torch.

MSAM takes SAM's perturbation from the optimizer's momentum v instead of an ascent pass: the one
forward+backward pass of a step runs at w~ = w - rho v / ||v|| (ASAM: w - rho T^2 v / ||T v||, with
T = |w| + eta), and its gradient is the step's gradient. The weights go back to w, bit for bit,
before the optimizer steps (pointed back at their untouched storage, or copied back: see
:mod:`hf_sam.engine.moved_weights`). Without momentum (the first step) or with v = 0 nothing moves; the
decision stays on the device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .guarded import add_scaled_unless_, uniform
from .moved_weights import MovedWeights, choose_mode
from .tensors import ShardLayout, global_norm, local
from .variants import Refusal, Variant, declare_builtin


class MomentumPerturbation:
    """Moves the weights to w - rho v/||v|| for one pass and back (see the module)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        rho: float,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        perturbed_weights: str = "auto",
    ) -> None:
        given = list(params)
        self.params = [p for p in given if p.requires_grad]
        if not self.params:
            raise ValueError("MomentumPerturbation got no trainable parameters.")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.adaptive_eta = float(adaptive_eta)
        self._layout = ShardLayout(self.params)
        self._weights = self._layout.locals(self.params)
        self._uniform = uniform(self._weights)
        self._moved = MovedWeights(self.params, self._weights, choose_mode(perturbed_weights, given, self._layout))
        self.perturbation_norm: Tensor | None = None  # ||d|| (rho, or 0 when nothing moved), in the rule's norm

    def set_rho(self, rho: float) -> None:
        self.rho = float(rho)

    @torch.no_grad()
    def begin(self, momenta: list[Tensor | None]) -> None:
        """Keep w and move to w - rho v/||v|| (``momenta``: one per parameter; None = no momentum yet)."""
        if self._layout.sharded:
            self._weights = self._layout.locals(self.params)
        device = self._weights[0].device
        if any(v is None for v in momenta):  # the first step: no momentum, no perturbation
            self.perturbation_norm = torch.zeros((), dtype=torch.float64, device=device)
            return
        self._moved.begin(self._weights)
        v = [local(m).to(w.dtype) for m, w in zip(momenta, self._weights, strict=True)]
        if self.adaptive:
            scale = torch._foreach_abs(self._moved.backup)
            torch._foreach_add_(scale, self.adaptive_eta)
            v = torch._foreach_mul(v, scale)  # T v
        norm = global_norm(v, self._layout, self._layout.flags()).to(device)
        if self.adaptive:
            torch._foreach_mul_(v, scale)  # T^2 v
        skip = ~(torch.isfinite(norm) & (norm > 0))  # v = 0 or non-finite: stay at w
        self._moved.move_out()
        add_scaled_unless_(self._weights, v, torch.div(-self.rho, norm), skip, self._uniform)
        self.perturbation_norm = torch.where(skip, torch.zeros_like(norm), torch.full_like(norm, self.rho))

    @torch.no_grad()
    def restore(self) -> None:
        """The weights back at w (bit-exact); safe to call after an error or when nothing moved."""
        self._moved.restore()


declare_builtin(
    Variant("method", "msam", "one pass at w - rho v / ||v||, v the optimizer's momentum (k = 1)",
            refusals=(Refusal("DeepSpeed", "its exact rule under ZeRO's partitioned gradients is not proven"),),
            paper="Momentum-SAM (Becker et al., 2024, arXiv 2401.12033)")
)  # fmt: skip
