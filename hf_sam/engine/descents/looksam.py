"""LookSAM's memory (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
Minimization"): SAM's descent that also keeps, from every full SAM step, the part of g_s that is
orthogonal to the clean gradient g,

    g_v = g_s - ||g_s|| cos(g, g_s) g / ||g|| = g_s - (g . g_s / ||g||^2) g,

so that the one-pass steps in between can add alpha ||g|| / ||g_v|| g_v to their gradient
(:func:`add_reuse_`). ``granularity`` "global" takes norms and the cosine over the whole vector (the
paper's algorithm 1), "tensor" per parameter tensor (its layer-wise variant). With gradient
accumulation g and g_s are the sums over the step's micro-batches.

Declared as the ``sam_reuse`` variant "looksam": the descent of the SAM steps of ``sam_every_n_steps`` > 1 and what
their one-pass steps add (nothing with ``sam_reuse_alpha`` 0: plain SAM every n steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..guarded import add_scaled_unless_, copy_where_
from ..tensors import ShardLayout, global_dot, global_norm, local, per_tensor_dots
from ..variants import Refusal, Variant, declare_builtin, finite_number, needs_one_gradient_for_all_ranks, option
from .base import CleanGradientDescent, DescentContext, LastDescent

_TINY = 1e-300
GRANULARITIES = ("global", "tensor")


class LookSAMDescent(CleanGradientDescent):
    """SAM's descent (g_s unchanged) that sums g and g_s over the step for :meth:`finish_step`, and adds
    ``alpha`` ||g|| / ||g_v|| g_v to the gradient of the one-pass steps (:meth:`one_pass_step`)."""

    name = "last"

    def __init__(self, granularity: str = "global", alpha: float = 0.0) -> None:
        self.granularity = granularity
        self.alpha = alpha
        self._layout: ShardLayout | None = None  # the engine's, seen at the first descent
        self._sums: tuple[list[Tensor], list[Tensor]] | None = None  # (sum of g, sum of g_s)
        self.g_v: list[Tensor] | None = None  # from the last full step
        self._g_v_size: Tensor | None = None  # its norm (global) or per-tensor squared norms, taken once

    def g_v_size(self, layout: ShardLayout) -> Tensor | None:
        """||g_v|| ("global") or the per-tensor ||g_v_j||^2 ("tensor"), taken once per g_v for the one-pass
        steps (a pass over g_v fewer in each of them)."""
        if self._g_v_size is None and self.g_v is not None:
            self._g_v_size = g_v_size(self.g_v, self.granularity, layout)
        return self._g_v_size

    def rewrite(self, engine: DescentContext, grads: list[Tensor]) -> None:
        self._layout = engine.layout
        g = self.clean_gradient(engine)
        if self._sums is None:
            self._sums = (g, torch._foreach_mul(grads, 1.0))
        else:
            torch._foreach_add_(self._sums[0], g)
            torch._foreach_add_(self._sums[1], grads)

    @torch.no_grad()
    def finish_step(self, layout: ShardLayout) -> None:
        """After the last micro-batch of a full step: g_v from the step's g and g_s."""
        if self._sums is None:
            return
        g, g_s = self._sums
        self._sums = None
        flags = layout.flags()
        if self.granularity == "global":
            squared = global_norm(g, layout, flags) ** 2
            c = global_dot(g, g_s, layout, flags) / squared.clamp_min(_TINY)
            torch._foreach_mul_(g, c.to(device=g[0].device, dtype=g[0].dtype))
        else:
            squared = per_tensor_dots(g, g, layout, flags)
            c = per_tensor_dots(g, g_s, layout, flags) / squared.clamp_min(_TINY)
            torch._foreach_mul_(g, list(c.to(device=g[0].device, dtype=g[0].dtype).unbind()))
        torch._foreach_sub_(g_s, g)  # g_s - c g
        # a non-finite step (fp16 overflow) keeps the last g_v (zero before the first); g is spent: scratch
        bad = ~torch.isfinite(global_norm(g_s, layout, flags))
        copy_where_(g_s, self.g_v if self.g_v is not None else [torch.zeros_like(t) for t in g_s], bad, g)
        self._set_g_v(g_s)

    def after_optimizer_step(
        self, optimizer: torch.optim.Optimizer, weights: list[Tensor], skipped: bool = False
    ) -> None:
        if self._sums is not None:  # a SAM step ended: its g_v (a non-finite one keeps the last g_v)
            self.finish_step(self._layout)

    @torch.no_grad()
    def one_pass_step(self, params: list[Tensor], layout: ShardLayout) -> None:
        if self.alpha == 0 or self.g_v is None:
            return
        for p in params:
            if p.grad is None:  # a tensor the pass did not reach has g = 0
                p.grad = torch.zeros_like(p)
        grads = [local(p.grad) for p in params]
        add_reuse_(grads, self.g_v, self.alpha, self.granularity, layout, self.g_v_size(layout))

    def _set_g_v(self, g_v: list[Tensor] | None) -> None:
        self.g_v, self._g_v_size = g_v, None

    def state_dict(self) -> dict:
        return {"g_v": None if self.g_v is None else [t.detach().cpu() for t in self.g_v]}

    def load_state_dict(self, state: dict, weights: list[Tensor]) -> None:
        saved = state.get("g_v")
        g_v = None if saved is None else [s.to(w) for s, w in zip(saved, weights, strict=True)]
        self._set_g_v(g_v)


@torch.no_grad()
def g_v_size(g_v: list[Tensor], granularity: str, layout: ShardLayout) -> Tensor:
    """||g_v|| over all tensors ("global") or the per-tensor squared norms ("tensor"), floored above 0."""
    flags = layout.flags()
    if granularity == "global":
        return global_norm(g_v, layout, flags).clamp_min(_TINY)
    return per_tensor_dots(g_v, g_v, layout, flags).clamp_min(_TINY)


def add_reuse_(
    grads: list[Tensor],
    g_v: list[Tensor],
    alpha: float,
    granularity: str,
    layout: ShardLayout,
    size: Tensor | None = None,
) -> None:
    """grads += alpha ||grads|| / ||g_v|| g_v, globally or per tensor (a zero g_v adds nothing).
    ``size``: :func:`g_v_size` of ``g_v`` when it is known already (LookSAMDescent keeps it)."""
    flags = layout.flags()
    if size is None:
        size = g_v_size(g_v, granularity, layout)
    if granularity == "global":
        ratio = global_norm(grads, layout, flags) / size
        # one guarded pass (never skipped), with the factor on the device: no temporary alpha r g_v
        add_scaled_unless_(grads, g_v, alpha * ratio, torch.zeros((), dtype=torch.bool, device=ratio.device))
        return
    ratio = (per_tensor_dots(grads, grads, layout, flags) / size).sqrt()
    scales = list((alpha * ratio).to(device=grads[0].device, dtype=grads[0].dtype).unbind())
    torch._foreach_add_(grads, torch._foreach_mul(g_v, scales))


@dataclass
class LookSAMOptions:
    reuse_alpha: float = option(
        0.0,
        "LookSAM (with sam_every_n_steps > 1): add alpha ||g|| / ||g_v|| g_v to the one-pass steps' gradient, g_v "
        "the part of the last SAM step's g_s orthogonal to its g (0 = plain SAM every n steps).",
    )
    reuse_granularity: str = option(
        "global",
        "LookSAM's norms and cosine over the whole gradient ('global', the paper's algorithm 1) or per parameter "
        "tensor ('tensor').",
    )

    def check(self, fail) -> None:
        if not finite_number(self.reuse_alpha) or self.reuse_alpha < 0:
            fail("reuse_alpha", self.reuse_alpha, "it must be a finite number >= 0")
        if self.reuse_granularity not in GRANULARITIES:
            fail("reuse_granularity", self.reuse_granularity, f"allowed values are {', '.join(GRANULARITIES)}")


def _reusing(options: LookSAMOptions) -> bool:
    return options.reuse_alpha > 0


def _looksam(options: LookSAMOptions, rho: float) -> LastDescent:
    if options.reuse_alpha == 0:  # plain SAM every n steps: nothing to remember
        return LastDescent()
    return LookSAMDescent(options.reuse_granularity, options.reuse_alpha)


declare_builtin(
    Variant("reuse", "looksam", "with sam_reuse_alpha > 0, adds alpha ||g|| / ||g_v|| g_v to the one-pass steps' "
            "gradient, g_v from the last SAM step (LookSAM); with 0, nothing (plain SAM every n steps)",
            _looksam, LookSAMOptions, needs_ascent=False,
            refusals=(*needs_one_gradient_for_all_ranks("the clean gradient g and g_s", _reusing),
                      Refusal("DeepSpeed", "LookSAM's one-pass steps add the reused term to the accumulated gradient, "
                              "which ZeRO keeps in its own partitions; --sam_every_n_steps without reuse runs",
                              _reusing)),
            paper="LookSAM (Liu et al., 2022, arXiv 2203.02714)")
)  # fmt: skip
