"""XSAM's descent (arXiv 2603.10048): descend along a spherical interpolation between the ascent
displacement and the gradient at the perturbed point.

With d the final perturbation and g the gradient at w + d: v0 = d/||d||, v1 = g/||g||,
phi = arccos(<v0, v1>) over all parameters at once, and

    u(alpha) = sin((1 - alpha) phi)/sin(phi) v0 + sin(alpha phi)/sin(phi) v1

(when sin(phi) < 1e-8: (v0 + v1)/||v0 + v1||, or v1 when that is zero). The descent gradient is
||g|| u(alpha): alpha = 1 is SAM's, alpha = 0 descends along d, alpha > 1 extrapolates. Everything
here stays on the device (no host sync); norms and dots go over all shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tensors import ShardLayout, global_dot, global_norm, local
from ..variants import Refusal, Variant, declare_builtin, needs_one_gradient_for_all_ranks, option
from .base import DescentContext, RewritingDescent

ALPHA_GRID_STEP = 0.1


def alpha_grid(alpha_max: float) -> list[float]:
    """0, 0.1, ..., alpha_max (the candidates of the dynamic choice)."""
    return [round(i * ALPHA_GRID_STEP, 10) for i in range(int(round(alpha_max / ALPHA_GRID_STEP)) + 1)]


class SphericalPair:
    """v0 = d/||d|| and v1 = g/||g|| of one step: the coefficients of u(alpha) = c0 d + c1 g."""

    def __init__(self, d: list[Tensor], g: list[Tensor], layout: ShardLayout, flags: list[bool]) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=d[0].device if d else "cpu")
        self.d_norm = global_norm(d, layout, flags).to(zero.device)
        self.g_norm = global_norm(g, layout, flags).to(zero.device)
        dot = global_dot(d, g, layout, flags).to(zero.device)
        # a zero displacement (a skipped or zero ascent) has no direction: take v0 = v1 (phi = 0, u = v1)
        moved = self.d_norm > 0
        cos = torch.where(moved, dot / (self.d_norm * self.g_norm).clamp_min(1e-300), torch.ones_like(dot))
        self.cos = cos.clamp(-1.0, 1.0)
        self.phi = torch.arccos(self.cos)
        self.moved = moved

    @property
    def angle_degrees(self) -> Tensor:
        return self.phi * (180.0 / math.pi)

    def coefficients(self, alpha: float) -> tuple[Tensor, Tensor]:
        """(a, b) with u(alpha) = a d + b g, in float64 0-d tensors."""
        phi, sin_phi = self.phi, torch.sin(self.phi)
        small = sin_phi < 1e-8
        safe = torch.where(small, torch.ones_like(sin_phi), sin_phi)
        w0 = torch.sin((1.0 - alpha) * phi) / safe
        w1 = torch.sin(alpha * phi) / safe
        # degenerate angle: (v0 + v1)/||v0 + v1|| = (v0 + v1)/sqrt(2 + 2 cos), or v1 when that is zero
        sum_norm = torch.sqrt((2.0 + 2.0 * self.cos).clamp_min(0.0))
        opposite = sum_norm < 1e-12
        w0 = torch.where(small, torch.where(opposite, torch.zeros_like(w0), 1.0 / sum_norm.clamp_min(1e-300)), w0)
        w1 = torch.where(small, torch.where(opposite, torch.ones_like(w1), 1.0 / sum_norm.clamp_min(1e-300)), w1)
        w0 = torch.where(self.moved, w0, torch.zeros_like(w0))
        w1 = torch.where(self.moved, w1, torch.ones_like(w1))
        a = w0 / self.d_norm.clamp_min(1e-300)
        b = w1 / self.g_norm.clamp_min(1e-300)
        return a, b

    def descent_coefficients(self, alpha: float) -> tuple[Tensor, Tensor]:
        """(a, b) with ||g|| u(alpha) = a d + b g; alpha = 1 gives exactly (0, 1)."""
        if alpha == 1.0:  # sin(phi)/sin(phi) and sin(0): (0, 1) exactly, so the descent is SAM's bit for bit
            one = torch.ones((), dtype=torch.float64, device=self.phi.device)
            return torch.zeros_like(one), one
        a, b = self.coefficients(alpha)
        return a * self.g_norm, b * self.g_norm


def descend_along_slerp(
    weights: list[Tensor], backup: list[Tensor], grads: list[Tensor], layout: ShardLayout, alpha: float
) -> Tensor:
    """grads <- ||g|| u(alpha) in place, with d = weights - backup; returns phi in degrees."""
    d = torch._foreach_sub(weights, backup)
    pair = SphericalPair(d, grads, layout, layout.flags())
    a, b = pair.descent_coefficients(alpha)
    torch._foreach_mul_(grads, b.to(grads[0].dtype))
    torch._foreach_add_(grads, torch._foreach_mul(d, a.to(d[0].dtype)))
    return pair.angle_degrees


def best_alpha(
    weights: list[Tensor],
    backup: list[Tensor],
    grads: list[Tensor],
    layout: ShardLayout,
    rho_max: float,
    alphas: list[float],
    loss_at: Callable[[], Tensor | float],
) -> float:
    """The alpha whose point w + rho_max u(alpha) has the largest ``loss_at()``; the weights end at
    w + d again (d = weights - backup on entry)."""
    d = torch._foreach_sub(weights, backup)
    pair = SphericalPair(d, grads, layout, layout.flags())
    losses = []
    for alpha in alphas:
        a, b = pair.coefficients(alpha)
        torch._foreach_copy_(weights, backup)
        torch._foreach_add_(weights, torch._foreach_mul(d, (a * rho_max).to(d[0].dtype)))
        torch._foreach_add_(weights, torch._foreach_mul(grads, (b * rho_max).to(grads[0].dtype)))
        losses.append(torch.as_tensor(loss_at(), dtype=torch.float64).reshape(()).cpu())
    torch._foreach_copy_(weights, backup)
    torch._foreach_add_(weights, d)
    return float(alphas[int(torch.stack(losses).argmax())])  # one host read per choice


class XSAMDescent(RewritingDescent):
    """XSAM's descent: p.grad <- held + ||g_k|| u(alpha), from g_k alone in p.grad and d_k = p - w."""

    name = "xsam"

    def __init__(self, alpha: float, rho_max: float) -> None:
        self.alpha = float(alpha)  # fixed, or set between steps by the dynamic choice
        self.rho_max = float(rho_max)
        self.angle: Tensor | None = None  # phi of the last descent, in degrees

    def rewrite(self, engine: DescentContext, grads: list[Tensor]) -> None:
        self.angle = descend_along_slerp(engine.weights, engine.backup, grads, engine.layout, self.alpha)

    def choose_alpha(self, engine: DescentContext, loss_at: Callable[[], Tensor | float], alphas: list[float]) -> float:
        """The dynamic alpha: after the descent backward (g_k in p.grad, weights at w + d_k), the alpha
        whose point w + rho_max u(alpha) has the largest ``loss_at()``."""
        pairs = zip(engine.params, engine.weights, strict=True)
        grads = [torch.zeros_like(w) if p.grad is None else local(p.grad) for p, w in pairs]
        self.alpha = best_alpha(engine.weights, engine.backup, grads, engine.layout, self.rho_max, alphas, loss_at)
        return self.alpha


@dataclass
class XSAMOptions:
    xsam_alpha: float | None = option(
        None,
        "XSAM: a fixed alpha >= 0 (1 is SAM's descent), or unset to choose it at the first step of every epoch "
        "among 0, 0.1, .., sam_xsam_alpha_max by the largest training loss at w + sam_xsam_rho_max u(alpha) (21 "
        "forward passes per epoch; saved with checkpoints).",
    )
    xsam_alpha_max: float = option(2.0, "XSAM: the largest alpha of the dynamic choice (0, 0.1, .., this).")
    xsam_rho_max: float | None = option(None, "XSAM: the radius of the dynamic choice's points (unset: 2 sam_rho).")

    def check(self, fail) -> None:
        for name in ("xsam_alpha", "xsam_rho_max", "xsam_alpha_max"):
            value = getattr(self, name)
            if (value is not None or name == "xsam_alpha_max") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
            ):
                fail(name, value, "it must be a number" + ("" if name == "xsam_alpha_max" else " or None"))
        if self.xsam_alpha is not None and not 0 <= self.xsam_alpha < float("inf"):
            fail("xsam_alpha", self.xsam_alpha, "it must be >= 0 and finite (or None for the dynamic choice)")
        if not 0 < self.xsam_alpha_max < float("inf"):
            fail("xsam_alpha_max", self.xsam_alpha_max, "it must be > 0 and finite")
        if self.xsam_rho_max is not None and not 0 < self.xsam_rho_max < float("inf"):
            fail("xsam_rho_max", self.xsam_rho_max, "it must be > 0 and finite")


def _build_xsam(options: XSAMOptions, rho: float) -> XSAMDescent:
    alpha = 1.0 if options.xsam_alpha is None else float(options.xsam_alpha)  # a dynamic one is chosen at step 1
    return XSAMDescent(alpha, 2 * rho if options.xsam_rho_max is None else options.xsam_rho_max)


declare_builtin(
    Variant("descent", "xsam", "||g_k|| times the spherical interpolation u(alpha) between d_k and g_k",
            _build_xsam, XSAMOptions,
            refusals=(
                *needs_one_gradient_for_all_ranks("d_k and g_k"),
                Refusal("DeepSpeed", "with the dynamic alpha (sam_xsam_alpha unset) choosing alpha evaluates the loss "
                        "at weights outside the SAM passes, which ZeRO does not gather for it. Set a fixed "
                        "--sam_xsam_alpha (for example 0.5)", lambda o: o.xsam_alpha is None),
            ),
            paper="XSAM (arXiv 2603.10048)")
)  # fmt: skip
