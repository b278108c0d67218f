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

SAMTrainer runs the same rule with ``sam_method="lookbehind"`` (:mod:`hf_sam.trainer.lookbehind`):
it takes the first k - 1 optimizer steps itself and leaves the k-th to the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .variants import Refusal, Variant, declare_builtin, option


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

    def _gradient_at_params(self, closure: Callable[[], Tensor]) -> tuple[Tensor, list[Tensor]]:
        for p in self.params:  # (the clean pass: what the caller left)
            p.grad = None
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        return loss.detach(), take_gradients(self.params)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One batch: k + 1 forward+backward passes and k base-optimizer steps; returns the loss at phi."""

        def inner_step(i: int) -> bool:
            self.optimizer.step()
            return True

        gradient = lambda: self._gradient_at_params(closure)  # noqa: E731
        run = inner_steps(self.params, self.ascent_steps, self.rho, gradient, inner_step)
        self.last_alphas = look_behind_(self.params, run.slow, run.fast, run.first_move, self.alpha)
        return run.clean


@dataclass
class InnerSteps:
    """What :func:`inner_steps` leaves for the look-behind: the clean loss at phi, phi, theta after the last inner
    step taken, and theta_1 - phi (None when no step was taken but the caller's)."""

    clean: Tensor
    slow: list[Tensor]
    fast: list[Tensor]
    first_move: list[Tensor] | None


def take_gradients(params: list[Tensor]) -> list[Tensor]:
    """Each parameter's gradient (zeros where none), p.grad cleared."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
    for p in params:
        p.grad = None
    return grads


def inner_steps(
    params: list[Tensor],
    ascent_steps: int,
    rho: float,
    gradient: Callable[[], tuple[Tensor, list[Tensor]]],
    step: Callable[[int], bool],
) -> InnerSteps:
    """The k inner steps of one Lookbehind batch (the module's loop), the one loop of both callers.

    ``gradient()`` runs one forward+backward pass at the current parameters and returns (its loss, the gradients),
    p.grad cleared. ``step(i)`` takes inner step i with p.grad = g(phi'_i) at theta_{i-1}, and returns whether it
    did: False leaves that step, and the rest, to the caller (the Trainer takes the k-th itself)."""
    with torch.no_grad():
        slow = [p.detach().clone() for p in params]  # phi
        fast = [p.detach().clone() for p in params]  # theta
        chain = [p.detach().clone() for p in params]  # phi'_i
    clean, grad = gradient()  # g(phi'_0) = g(phi)
    first_move: list[Tensor] | None = None
    for i in range(1, ascent_steps + 1):
        ascend_(chain, grad, rho)
        with torch.no_grad():
            torch._foreach_copy_(params, chain)
        _, grad = gradient()  # g(phi'_i): this descent and the next ascent
        with torch.no_grad():
            torch._foreach_copy_(params, fast)  # the optimizer steps theta with g(phi'_i)
        for p, g in zip(params, grad, strict=True):
            p.grad = g.clone()
        if not step(i):
            break
        if i < ascent_steps:  # spent: the next pass's gradient starts from zero (the last stays in p.grad)
            for p in params:
                p.grad = None
        with torch.no_grad():
            torch._foreach_copy_(fast, params)
            if first_move is None:
                first_move = torch._foreach_sub(fast, slow)  # theta_1 - phi
    return InnerSteps(clean, slow, fast, first_move)


@torch.no_grad()
def ascend_(chain: list[Tensor], grad: list[Tensor], rho: float) -> None:
    """chain <- chain + rho g/||g|| (the norm over all tensors)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad)))
    torch._foreach_add_(chain, torch._foreach_div(grad, norm.clamp_min(1e-300) / rho))


@torch.no_grad()
def look_behind_(
    params: list[Tensor], slow: list[Tensor], fast: list[Tensor], first_move: list[Tensor] | None, alpha: float | None
) -> list[Tensor]:
    """params <- phi + alpha (theta_k - phi); returns the alphas (one per tensor)."""
    move = torch._foreach_sub(fast, slow)  # theta_k - phi
    alphas = interpolation_alphas(move if first_move is None else first_move, move, alpha)
    torch._foreach_copy_(params, slow)
    torch._foreach_add_(params, [a.to(m.dtype) * m for a, m in zip(alphas, move, strict=True)])
    return alphas


def interpolation_alphas(first: list[Tensor], last: list[Tensor], alpha: float | None) -> list[Tensor]:
    """alpha for every tensor, or (cos(theta_1 - phi, theta_k - phi) + 1)/2 per tensor when None."""
    if alpha is not None:
        return [torch.tensor(float(alpha), dtype=torch.float64, device=m.device) for m in last]
    out = []
    for a, b in zip(first, last, strict=True):
        a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
        denominator = torch.linalg.vector_norm(a64) * torch.linalg.vector_norm(b64)
        # no movement in a tensor: nothing to interpolate, take the full step
        one = torch.ones((), dtype=torch.float64, device=a.device)
        cos = torch.where(denominator > 0, (a64 @ b64) / denominator.clamp_min(1e-300), one)
        out.append((cos.clamp(-1.0, 1.0) + 1.0) / 2.0)
    return out


@dataclass
class LookbehindOptions:
    lookbehind_alpha: float | None = option(
        0.5,
        "Lookbehind's alpha in (0, 1]: the slow weights' step; unset (None, in Python or a config file) for the "
        "adaptive per-tensor alpha.",
    )

    def check(self, fail) -> None:
        alpha = self.lookbehind_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            fail("lookbehind_alpha", alpha, "it must be in (0, 1], or None for the adaptive alpha")


declare_builtin(
    Variant("method", "lookbehind", "k ascent steps of rho with an optimizer step after each, then the slow weights "
            "move by alpha towards the fast ones", options=LookbehindOptions,
            refusals=(
                Refusal("DeepSpeed", "its exact rule under ZeRO's partitioned gradients is not proven"),
                Refusal("several processes", "its inner steps under DDP are untested: it runs in one process for now"),
                Refusal("gradient accumulation", "its inner optimizer steps would each see one micro-batch; use "
                        "gradient_accumulation_steps=1 with a larger batch"),
                Refusal("fp16", "every inner optimizer step would need its own scaler step; use bf16 or fp32"),
            ),
            paper="Lookbehind-SAM (Mordido et al., 2024, arXiv 2307.16704)")
)  # fmt: skip
