"""Lookbehind-SAM (ICML 2024) for a plain PyTorch or accelerate loop.

Per batch, with slow weights phi (the model's weights between steps) and fast weights theta_0 = phi:

    g_0 = g(phi'_0), phi'_0 = phi
    for i in 1..k:
        phi'_i  = phi'_{i-1} + rho g_{i-1} / ||g_{i-1}||      (full rho per step, no projection)
        g_i     = g(phi'_i)
        theta_i = base optimizer step from theta_{i-1} with g_i  (one optimizer state; momentum and
                                                                  weight decay act on theta)
    phi <- phi + alpha (theta_k - phi)

with alpha fixed in (0, 1] or, per parameter tensor, (cos(theta_1 - phi, theta_k - phi) + 1) / 2. The
published code recomputes g(phi'_i) for the next ascent (2k passes); here the gradient at phi'_i
serves both the descent of step i and the ascent of step i + 1 (k + 1 passes).

Why not in SAMTrainer: the Trainer owns optimizer.step(), clipping, the scheduler, loss scaling and
gradient accumulation, and calls each once per step; Lookbehind steps the optimizer k times inside
one batch and then moves the weights by an interpolation the optimizer never sees. Doing that inside
the Trainer would mean re-implementing its step, so it lives here, for the plain loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class LookbehindSAM:
    """k inner SAM steps on fast weights, then an interpolation of the slow weights towards them.

    Args:
        params: the parameters (those the base ``optimizer`` steps; ``requires_grad=False`` ignored).
        optimizer: the base optimizer over the same parameters (its state is shared by the inner steps).
        ascent_steps: k >= 1 inner steps.
        rho: the length of every ascent step.
        alpha: the slow weights' step in (0, 1], or None for the adaptive per-tensor alpha.

    ``step(closure)`` runs one batch: ``closure()`` computes the loss at the current weights (forward
    only; backward is done here). Call ``optimizer.zero_grad()`` yourself only if you use the grads;
    ``step`` leaves p.grad as the last inner step's gradient. ``last_alphas`` holds the alphas used.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        optimizer: torch.optim.Optimizer,
        ascent_steps: int = 2,
        rho: float = 0.05,
        alpha: float | None = 0.5,
    ) -> None:
        if int(ascent_steps) < 1:
            raise ValueError(f"ascent_steps={ascent_steps!r} is invalid: Lookbehind needs k >= 1.")
        if not rho > 0:
            raise ValueError(f"rho={rho!r} is invalid: it must be > 0.")
        if alpha is not None and not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha!r} is invalid: it must be in (0, 1], or None for the adaptive alpha.")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("LookbehindSAM got no trainable parameters.")
        self.optimizer = optimizer
        self.ascent_steps = int(ascent_steps)
        self.rho = float(rho)
        self.alpha = alpha
        self.last_alphas: list[Tensor] = []

    @torch.no_grad()
    def _gradients(self) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]

    def _gradient_at_params(self, closure: Callable[[], Tensor]) -> tuple[Tensor, list[Tensor]]:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        return loss.detach(), self._gradients()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One batch: k + 1 forward+backward passes and k base-optimizer steps; returns the loss at phi."""
        params = self.params
        with torch.no_grad():
            slow = [p.detach().clone() for p in params]  # phi
            fast = [p.detach().clone() for p in params]  # theta
            chain = [p.detach().clone() for p in params]  # phi'_i
        clean, grad = self._gradient_at_params(closure)  # g(phi'_0) = g(phi)
        first_move: list[Tensor] | None = None
        for _ in range(self.ascent_steps):
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad)))
                torch._foreach_add_(chain, torch._foreach_div(grad, norm.clamp_min(1e-300) / self.rho))
                torch._foreach_copy_(params, chain)
            _, grad = self._gradient_at_params(closure)  # g(phi'_i): this descent and the next ascent
            with torch.no_grad():
                torch._foreach_copy_(params, fast)  # the optimizer steps theta with g(phi'_i)
                for p, g in zip(params, grad, strict=True):
                    p.grad = g.clone()
            self.optimizer.step()
            with torch.no_grad():
                torch._foreach_copy_(fast, params)
                if first_move is None:
                    first_move = torch._foreach_sub(fast, slow)  # theta_1 - phi
        with torch.no_grad():
            move = torch._foreach_sub(fast, slow)  # theta_k - phi
            alphas = self._alphas(first_move, move)
            self.last_alphas = alphas
            torch._foreach_copy_(params, slow)
            torch._foreach_add_(params, [a.to(m.dtype) * m for a, m in zip(alphas, move, strict=True)])
        return clean

    def _alphas(self, first: list[Tensor], last: list[Tensor]) -> list[Tensor]:
        if self.alpha is not None:
            return [torch.tensor(float(self.alpha), dtype=torch.float64, device=m.device) for m in last]
        out = []
        for a, b in zip(first, last, strict=True):
            a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
            denominator = torch.linalg.vector_norm(a64) * torch.linalg.vector_norm(b64)
            # no movement in a tensor: nothing to interpolate, take the full step
            cos = torch.where(denominator > 0, (a64 @ b64) / denominator.clamp_min(1e-300), torch.ones(()).double())
            out.append((cos.clamp(-1.0, 1.0) + 1.0) / 2.0)
        return out
