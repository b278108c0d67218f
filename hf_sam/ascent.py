"""The multi-step SAM perturbation engine: pure torch on a list of parameters.

Nothing here knows about the Trainer, so the engine is usable from a plain PyTorch or
accelerate loop. One training step with k ascent steps is driven as::

    engine.begin()                    # snapshot w, set aside accumulated grads
    for i in range(k):
        loss_fn().backward()          # gradient at w + d_{i-1} lands in p.grad
        if not engine.ascend():       # move to w + d_i, clear p.grad
            break                     # non-finite gradient: back at w, stop ascending
    scale = engine.begin_descent()    # grads back in place (plus the "mean" sum)
    (loss_fn() * scale).backward()    # descent gradient is *added* to p.grad
    engine.restore()                  # weights copied back from the snapshot

or all at once with :meth:`MultiStepAscent.step`. The hot path uses foreach kernels (a
constant number of launches per ascent step) and reads one scalar back to the host per
ascent step: the gradient norm, to skip non-finite ascents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

_RULES = ("normalized", "projected", "accumulated")
_DESCENTS = ("last", "mean")
# Above this the single fused "p += (a/||g||) g" would overflow fp32; divide first instead.
_MAX_FUSED_SCALE = 1e30
# below this the fast norm may have lost squares to underflow: redo it in float64
_UNDERFLOW_RISK = 1e-15


def _global_norm(tensors: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Euclidean norm of a list of tensors (in ``dtype`` if given), as a 0-d float64 tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    per_tensor = torch._foreach_norm(tensors, 2, dtype=dtype) if dtype else torch._foreach_norm(tensors, 2)
    return torch.linalg.vector_norm(torch.stack(per_tensor).double())


def _gradient_norm(tensors: list[Tensor]) -> float:
    """The global norm on the host: fast in the tensors' dtype, redone in float64 only when the
    fast one may have overflowed or underflowed (squares of fp32 values beyond ~1e19 or below ~1e-19)."""
    norm = _global_norm(tensors).item()  # the one host sync of an ascent step
    if not math.isfinite(norm) or norm < _UNDERFLOW_RISK:
        norm = _global_norm(tensors, dtype=torch.float64).item()
    return norm


def _cosine(a: list[Tensor], b: list[Tensor]) -> Tensor:
    dot = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)]).sum()
    denominator = _global_norm(a) * _global_norm(b)
    return torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), torch.zeros_like(dot))


class MultiStepAscent:
    """Takes k ascent steps on the weights and restores them, for multi-step SAM.

    Args:
        params: the parameters to perturb; those with ``requires_grad=False`` are ignored.
        ascent_steps: k >= 1.
        rho: radius of the neighbourhood.
        ascent_rule: "normalized" (step rho/k), "projected" (step step_mult*rho, project onto
            the rho-ball after every step) or "accumulated" (step rho, no projection).
        step_mult: step size of "projected", in units of rho.
        adaptive: ASAM. With T = |w| + adaptive_eta (w the unperturbed weights) each step is
            a T^2 g / ||T g|| and "projected" projects onto ||d / T|| <= rho.
        adaptive_eta: the eta of ASAM.
        descent: "last" (descend with the gradient at w + d_k) or "mean" (with the mean of
            the gradients at w + d_1 .. w + d_k).
        track_directions: also measure the cosine between successive ascent gradients and
            between the first ascent gradient and the descent gradient (keeps two more copies
            of the gradients; for diagnostics, not for speed).

    After each training step the attributes ``grad_norms`` (host floats, one per ascent
    step, in the rule's norm), ``perturbation_norm`` (||d_k||, a 0-d tensor, in the rule's
    norm), ``skipped`` (a non-finite gradient norm dropped the perturbation) and
    ``zero_gradient`` (a zero gradient left the weights unperturbed) describe it.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        ascent_steps: int = 1,
        rho: float = 0.05,
        ascent_rule: str = "normalized",
        step_mult: float = 1.0,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        descent: str = "last",
        track_directions: bool = False,
    ) -> None:
        if ascent_rule not in _RULES:
            raise ValueError(f"ascent_rule={ascent_rule!r} is invalid: allowed values are {', '.join(_RULES)}.")
        if descent not in _DESCENTS:
            raise ValueError(f"descent={descent!r} is invalid: allowed values are {', '.join(_DESCENTS)}.")
        if int(ascent_steps) < 1:
            raise ValueError(f"ascent_steps={ascent_steps!r} is invalid: the engine needs k >= 1.")
        if not rho > 0 or not step_mult > 0 or adaptive_eta < 0:
            raise ValueError("rho and step_mult must be > 0 and adaptive_eta >= 0.")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MultiStepAscent got no trainable parameters.")
        self.ascent_steps = int(ascent_steps)
        self.rho = float(rho)
        self.ascent_rule = ascent_rule
        self.step_mult = float(step_mult)
        self.adaptive = bool(adaptive)
        self.adaptive_eta = float(adaptive_eta)
        self.descent = descent
        self.track_directions = bool(track_directions)
        if ascent_rule == "normalized":
            self.step_size = self.rho / self.ascent_steps
        elif ascent_rule == "projected":
            self.step_size = self.rho * self.step_mult
        else:
            self.step_size = self.rho
        self._backup: list[Tensor] | None = None  # the one fp32 copy of the weights, reused every step
        self._held: list[Tensor | None] | None = None  # accumulated grads set aside during the ascent
        self._scale: list[Tensor] | None = None  # ASAM's T, for this step only
        self._mean_sum: list[Tensor | None] | None = None  # "mean": sum of grads at d_1..d_{k-1}
        self._in_step = False
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self.steps_taken = 0
        self._reach = 0.0  # an upper bound on ||d|| in the rule's norm: the steps' lengths added up
        self._measure_on_restore = False
        self.moved = False
        self.skipped = False
        self.zero_gradient = False
        self.grad_norms: list[float] = []
        self.perturbation_norm: Tensor | None = None
        self.successive_cosines: list[Tensor] = []  # with track_directions only
        self.descent_cosine: Tensor | None = None
        self._first_grad: list[Tensor] | None = None
        self._prev_grad: list[Tensor] | None = None
        self._pre_descent: list[Tensor | None] | None = None

    # ----------------------------------------------------------------- step protocol
    @torch.no_grad()
    def begin(self) -> None:
        """Snapshot the weights and set aside the gradients already accumulated in p.grad."""
        if self._in_step:
            raise RuntimeError("MultiStepAscent.begin() called twice without restore().")
        if self._backup is None:
            self._backup = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_copy_(self._backup, self.params)
        self._held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        if self.adaptive:
            self._scale = torch._foreach_abs(self._backup)
            torch._foreach_add_(self._scale, self.adaptive_eta)
        self._mean_sum = None
        self._reset_step_state()
        self._in_step = True

    @torch.no_grad()
    def ascend(self) -> bool:
        """Take one ascent step with the gradient in p.grad, then clear p.grad.

        Returns True while the ascent goes on, False once a non-finite gradient norm has
        dropped the perturbation (the weights are back at w; stop ascending and descend).
        """
        if not self._in_step:
            raise RuntimeError("MultiStepAscent.ascend() called outside begin()/restore().")
        self.steps_taken += 1
        i = self.steps_taken
        if i > self.ascent_steps:
            raise RuntimeError(f"ascend() called more than ascent_steps={self.ascent_steps} times.")
        idx = [j for j, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[j] for j in idx]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        if self.skipped:
            return False
        if self.descent == "mean" and i >= 2:
            self._add_to_mean_sum(idx, grads)
        if self.track_directions:
            self._track(idx, grads, i)
        if self.adaptive:
            scale = [self._scale[j] for j in idx]
            torch._foreach_mul_(grads, scale)  # u = T g
        norm = _gradient_norm(grads)
        self.grad_norms.append(norm)
        if not math.isfinite(norm):
            self._drop_perturbation()
            return False
        if norm == 0.0:
            # Nothing to climb along: this step does not move; the descent is a plain step if
            # no earlier step moved.
            self.zero_gradient = True
        else:
            if self.adaptive:
                torch._foreach_mul_(grads, scale)  # T^2 g
            factor = self.step_size / norm
            if factor < _MAX_FUSED_SCALE:
                torch._foreach_add_(params, grads, alpha=factor)
            else:  # tiny norm: normalise first so the scale cannot overflow
                torch._foreach_div_(grads, norm)
                torch._foreach_add_(params, grads, alpha=self.step_size)
            self.moved = True
            self._reach += self.step_size  # each step has length step_size in the rule's norm
        if self.ascent_rule == "projected" and self._reach > self.rho:
            # the consumed gradients are free: d = p - w is formed in them, not in new memory
            self._project(grads if len(idx) == len(self.params) else None)
        elif i == self.ascent_steps:
            # projected too when the steps cannot have left the ball (k=1, or step_mult <= 1/k)
            self._measure_perturbation()
        return True

    @torch.no_grad()
    def shift(self, offsets: list[Tensor]) -> None:
        """Move the weights by ``offsets`` (one per trainable tensor) inside a step, e.g. to a
        random start in the ball. Move them only through the engine between begin() and
        restore(): it bounds ||d|| by the lengths of its own steps to skip needless projections."""
        if not self._in_step:
            raise RuntimeError("MultiStepAscent.shift() called outside begin()/restore().")
        torch._foreach_add_(self.params, [o.to(p) for p, o in zip(self.params, offsets, strict=True)])
        self.moved = True
        self._reach = math.inf  # unknown: project (and measure) from here on

    @torch.no_grad()
    def begin_descent(self) -> float:
        """Put the accumulated gradients back in p.grad before the descent backward.

        Returns the factor to multiply the descent loss by: 1 for "last", 1/k for "mean"
        (p.grad then already holds (1/k) times the sum of the gradients at d_1..d_{k-1}).
        """
        if not self._in_step:
            raise RuntimeError("MultiStepAscent.begin_descent() called outside begin()/restore().")
        for p in self.params:
            p.grad = None  # an ascent pass without a following ascend() leaves nothing behind
        if self.track_directions and self._first_grad is not None:
            # the accumulated grads before this batch, so the descent direction is p.grad minus these
            self._pre_descent = [None if g is None else g.clone() for g in self._held]
        factor = 1.0
        if self.descent == "mean" and not self.skipped and self.steps_taken == self.ascent_steps:
            factor = 1.0 / self.ascent_steps
            if self._mean_sum is not None:
                pairs = [(j, s) for j, s in enumerate(self._mean_sum) if s is not None]
                onto = [(self._held[j], s) for j, s in pairs if self._held[j] is not None]
                alone = [(j, s) for j, s in pairs if self._held[j] is None]
                if onto:
                    torch._foreach_add_([h for h, _ in onto], [s for _, s in onto], alpha=factor)
                if alone:
                    torch._foreach_mul_([s for _, s in alone], factor)
                    for j, s in alone:
                        self._held[j] = s
        self._mean_sum = None
        self._return_held_grads()
        return factor

    @torch.no_grad()
    def end_descent(self) -> None:
        """With track_directions: measure cos(first ascent gradient, descent gradient) after the descent backward."""
        if not self.track_directions or self._pre_descent is None or self._first_grad is None:
            return
        descent = []
        for p, pre in zip(self.params, self._pre_descent, strict=True):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            descent.append(g - pre if pre is not None else g)
        self.descent_cosine = _cosine(self._first_grad, descent)
        self._pre_descent = None

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the weights back from the snapshot (bit-exact); safe to call after an error."""
        if not self._in_step:
            return
        if self._measure_on_restore:
            # ||d|| of a multi-step ascent, from p - w formed in the weights just before they are
            # overwritten: one pass fewer than forming it in a separate buffer
            torch._foreach_sub_(self.params, self._backup)
            if self.adaptive:
                torch._foreach_div_(self.params, self._scale)
            self.perturbation_norm = _global_norm(self.params)
            self._measure_on_restore = False
        torch._foreach_copy_(self.params, self._backup)
        if self._held is not None:  # an error struck before begin_descent(): undo the set-aside
            for p in self.params:
                p.grad = None
            self._return_held_grads()
        self._scale = None
        self._mean_sum = None
        self._first_grad = self._prev_grad = self._pre_descent = None
        self._in_step = False

    def step(
        self,
        compute_loss: Callable[[], Tensor],
        backward: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """Run one full SAM step for a plain loop: k ascent passes, the descent pass, restore.

        ``compute_loss`` runs a forward pass and returns the loss; ``backward`` defaults to
        ``loss.backward()`` (pass ``accelerator.backward`` under accelerate). The descent
        gradient is added to p.grad; call the optimizer afterwards. Returns the loss at w.
        """
        backward = backward or (lambda loss: loss.backward())
        self.begin()
        try:
            clean = None
            for _ in range(self.ascent_steps):
                loss = compute_loss()
                backward(loss)
                if clean is None:
                    clean = loss.detach()
                if not self.ascend():
                    break
            factor = self.begin_descent()
            loss = compute_loss()
            backward(loss * factor if factor != 1.0 else loss)
        finally:
            self.restore()
        return clean

    # ----------------------------------------------------------------------- helpers
    def _return_held_grads(self) -> None:
        for p, g in zip(self.params, self._held, strict=True):
            p.grad = g
        self._held = None

    def _add_to_mean_sum(self, idx: list[int], grads: list[Tensor]) -> None:
        """S += g with foreach kernels; a tensor's first gradient is copied in."""
        if self._mean_sum is None:
            self._mean_sum = [None] * len(self.params)
        fresh = [(j, g) for j, g in zip(idx, grads, strict=True) if self._mean_sum[j] is None]
        known = [(self._mean_sum[j], g) for j, g in zip(idx, grads, strict=True) if self._mean_sum[j] is not None]
        if known:
            torch._foreach_add_([s for s, _ in known], [g for _, g in known])
        if fresh:
            copies = torch._foreach_mul([g for _, g in fresh], 1.0)
            for (j, _), copy in zip(fresh, copies, strict=True):
                self._mean_sum[j] = copy

    def _track(self, idx: list[int], grads: list[Tensor], i: int) -> None:
        full = [torch.zeros_like(p) for p in self.params]
        for j, g in zip(idx, grads, strict=True):
            full[j] = g.detach().clone()
        if self._prev_grad is not None:
            self.successive_cosines.append(_cosine(self._prev_grad, full))
        if i == 1:
            self._first_grad = full
        self._prev_grad = full

    def _zero(self) -> Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.params[0].device)

    def _drop_perturbation(self) -> None:
        """A non-finite ascent: go back to w and descend there, as a plain step."""
        torch._foreach_copy_(self.params, self._backup)
        self.skipped = True
        self.moved = False
        self._mean_sum = None
        self.perturbation_norm = self._zero()

    def _displacement(self, out: list[Tensor] | None = None) -> list[Tensor]:
        """d = p - w, divided by T under ASAM (the norm the ball is defined in); written into
        ``out`` (free buffers shaped like the params) when given, else newly allocated."""
        if out is None:
            d = torch._foreach_sub(self.params, self._backup)
        else:
            d = out
            torch._foreach_copy_(d, self.params)
            torch._foreach_sub_(d, self._backup)
        if self.adaptive:
            torch._foreach_div_(d, self._scale)
        return d

    def _measure_perturbation(self) -> None:
        if not self.moved:
            self.perturbation_norm = self._zero()
        elif self.steps_taken == 1:
            # one step of length a in the rule's norm: known without touching the weights
            self.perturbation_norm = torch.full((), self.step_size, dtype=torch.float64, device=self.params[0].device)
        else:
            self._measure_on_restore = True  # set by restore()

    def _project(self, scratch: list[Tensor] | None = None) -> None:
        """Project w + d onto ||d|| <= rho (||d/T|| under ASAM), without a host sync.

        ``scratch``: free buffers shaped like the params to hold d (saves an allocation).
        """
        if not self.moved:
            self.perturbation_norm = self._zero()
            return
        d = self._displacement(scratch)
        norm = _global_norm(d)
        # c = min(1, rho/||d||); the division is safe because a moved point has ||d|| > 0
        shrink = torch.clamp(self.rho / norm.clamp_min(1e-300), max=1.0)
        self.perturbation_norm = norm * shrink
        if self.adaptive:
            torch._foreach_mul_(d, self._scale)  # back to weight units
        # w + c d = (w + d) + (c - 1) d; inside the ball c - 1 = 0 leaves the weights untouched
        torch._foreach_mul_(d, (shrink - 1).to(d[0].dtype))
        torch._foreach_add_(self.params, d)
        self._reach = self.rho
