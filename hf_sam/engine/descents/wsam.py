"""WSAM's descent (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted Sharpness
as a Regularization Term").

With g the clean gradient at w, g_s the gradient at w + d_k and a = gamma / (1 - gamma), WSAM
minimizes L + a (L(w + d) - L): the sharpness is a regularizer with its own weight.

- coupled: the optimizer descends with g + a (g_s - g);
- decoupled (the default): the optimizer steps with g alone, and right after its step the weights
  move by -lr a (g_s - g), lr the learning rate the optimizer just used for that parameter's group,
  so that an adaptive optimizer does not precondition the sharpness term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..variants import Refusal, Variant, declare_builtin, finite_number, needs_one_gradient_for_all_ranks, option
from .base import CleanGradientDescent, DescentContext


class WSAMDescent(CleanGradientDescent):
    """Coupled: p.grad <- held + g + a (g_s - g). Decoupled: p.grad <- held + g, and (g_s - g) summed
    over the micro-batches of the step until :meth:`after_optimizer_step` applies it."""

    name = "wsam"

    def __init__(self, gamma: float, decouple: bool = True) -> None:
        self.gamma = float(gamma)
        self.weight = self.gamma / (1.0 - self.gamma)  # a
        self.decouple = bool(decouple)
        self._sharpness: list[Tensor] | None = None  # decoupled: sum of (g_s - g) since the last optimizer step
        self._params: list[Tensor] = []

    def rewrite(self, engine: DescentContext, grads: list[Tensor]) -> None:
        g = self.clean_gradient(engine)
        if not self.decouple:  # g + a (g_s - g) = a g_s + (1 - a) g
            torch._foreach_mul_(grads, self.weight)
            torch._foreach_add_(grads, g, alpha=1.0 - self.weight)
            return
        torch._foreach_sub_(grads, g)  # g_s - g
        scale = engine.grad_scale
        if scale is not None:  # held unscaled: the loss scale may change before the optimizer step
            torch._foreach_div_(grads, scale)
        if self._sharpness is None:
            self._sharpness = torch._foreach_mul(grads, 1.0)
        else:
            torch._foreach_add_(self._sharpness, grads)
        # p.grad <- g, but non-finite where g_s - g is: a GradScaler then skips the step (and this term with it)
        torch._foreach_mul_(grads, 0.0)
        torch._foreach_add_(grads, g)
        self._params = engine.params

    @torch.no_grad()
    def after_optimizer_step(
        self, optimizer: torch.optim.Optimizer, weights: list[Tensor], skipped: bool = False
    ) -> None:
        """Decoupled: w -= lr a (g_s - g) for every parameter, with its group's learning rate; nothing when the
        optimizer's step was ``skipped`` (a GradScaler found inf/NaN gradients)."""
        if self._sharpness is None or skipped:
            self._sharpness = None
            return
        where = {id(p): j for j, p in enumerate(self._params)}
        for group in optimizer.param_groups:
            pairs = [(weights[where[id(p)]], self._sharpness[where[id(p)]]) for p in group["params"] if id(p) in where]
            if pairs:
                lr = float(group["lr"])
                torch._foreach_add_([w for w, _ in pairs], [s for _, s in pairs], alpha=-lr * self.weight)
        self._sharpness = None


@dataclass
class WSAMOptions:
    wsam_gamma: float = option(0.9, "WSAM's gamma in [0, 1): the sharpness term's weight is gamma / (1 - gamma).")
    wsam_decouple: bool = option(
        True,
        "WSAM: the optimizer steps with the clean gradient g and the weights then move by -lr a (g_s - g) (true), "
        "or the optimizer descends with g + a (g_s - g) (false).",
    )

    def check(self, fail) -> None:
        if not finite_number(self.wsam_gamma) or not 0 <= self.wsam_gamma < 1:
            fail("wsam_gamma", self.wsam_gamma, "it must be in [0, 1)")
        if not isinstance(self.wsam_decouple, bool):
            fail("wsam_decouple", self.wsam_decouple, "it must be True or False")


declare_builtin(
    Variant("descent", "wsam", "g + a (g_s - g), a = gamma / (1 - gamma); decoupled: a (g_s - g) after the step",
            lambda o, rho: WSAMDescent(o.wsam_gamma, o.wsam_decouple), WSAMOptions,
            refusals=(
                *needs_one_gradient_for_all_ranks("the clean gradient g and g_s"),
                Refusal("DeepSpeed", "with sam_wsam_decouple=true its update after the optimizer step would move the "
                        "module's parameters, while ZeRO steps its own fp32 partitions and writes them back over the "
                        "parameters. Use --sam_wsam_decouple false (the coupled WSAM)", lambda o: o.wsam_decouple),
            ),
            paper="WSAM (Yue et al., 2023, arXiv 2305.15817)")
)  # fmt: skip
