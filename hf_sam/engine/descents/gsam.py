"""GSAM's descent (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

With g the clean gradient at w and g_s the gradient at w + d_k, the descent gradient is

    g_s - alpha (g - (g . g_s / ||g_s||^2) g_s)

g_s minus alpha times the part of g orthogonal to g_s: descending along it lowers the perturbed loss
while raising the clean loss less than SAM would (it shrinks the surrogate gap). Dot product and norm
are global over all tensors and shards; everything stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..tensors import global_dot, global_norm
from ..variants import Variant, declare_builtin, finite_number, needs_one_gradient_for_all_ranks, option
from .base import CleanGradientDescent, DescentContext


class GSAMDescent(CleanGradientDescent):
    """p.grad <- held + (1 + alpha c) g_s - alpha g, with c = g . g_s / ||g_s||^2 (0 when g_s = 0)."""

    name = "gsam"

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    def rewrite(self, engine: DescentContext, grads: list[Tensor]) -> None:
        g = self.clean_gradient(engine)
        layout, flags = engine.layout, engine.layout.flags()
        dot = global_dot(g, grads, layout, flags)
        squared = global_norm(grads, layout, flags) ** 2
        c = torch.where(squared > 0, dot / squared.clamp_min(1e-300), torch.zeros_like(dot))
        torch._foreach_mul_(grads, (1.0 + self.alpha * c).to(device=grads[0].device, dtype=grads[0].dtype))
        torch._foreach_add_(grads, g, alpha=-self.alpha)


@dataclass
class GSAMOptions:
    gsam_alpha: float = option(
        0.4, "GSAM's alpha >= 0: how much of the clean gradient's part orthogonal to g_s is removed."
    )

    def check(self, fail) -> None:
        if not finite_number(self.gsam_alpha) or self.gsam_alpha < 0:
            fail("gsam_alpha", self.gsam_alpha, "it must be a finite number >= 0")


declare_builtin(
    Variant("descent", "gsam", "g_s minus alpha times the clean gradient's part orthogonal to g_s",
            lambda o, rho: GSAMDescent(o.gsam_alpha), GSAMOptions,
            refusals=needs_one_gradient_for_all_ranks("the clean gradient g and g_s"),
            paper="GSAM (Zhuang et al., 2022, arXiv 2203.08065)")
)  # fmt: skip
