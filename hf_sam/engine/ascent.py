"""The multi-step SAM perturbation engine: pure torch on a list of parameters.

Nothing here knows about the Trainer, so the engine is usable from a plain PyTorch or
accelerate loop. One training step with k ascent steps is driven as::

    engine.begin()                    # snapshot w, set aside accumulated grads
    for i in range(k):
        loss_fn().backward()          # gradient at w + d_{i-1} lands in p.grad
        engine.ascend()               # move to w + d_i (unless non-finite), clear p.grad
    scale = engine.begin_descent()    # grads back in place (plus the "mean" sum); w after a drop
    (loss_fn() * scale).backward()    # descent gradient is *added* to p.grad
    engine.end_descent()              # XSAM's combination, direction diagnostics
    engine.restore()                  # the weights back at w, bit for bit

or all at once with :meth:`MultiStepAscent.step`. The hot path uses foreach kernels (a
constant number of launches per ascent step) and reads nothing back to the host: the gradient
norm, the skip of a non-finite ascent and the step size are all decided on the device
(:mod:`hf_sam.engine.guarded`), so a GPU's launch queue never drains inside a step. A non-finite
ascent therefore does not stop the loop: the remaining ascent passes run and leave the weights
where they are, and the descent is at w. What the ascent did is in :attr:`record`.

Where the perturbed point lives is :mod:`hf_sam.engine.moved_weights`'s choice: by default in a second
buffer the parameters point at during the passes (w itself is never written, so there is no restore
copy), or, where a parameter's storage must not change, in the parameters after a snapshot.

FSDP2 shards (DTensors) and ZeRO's partitions: the engine works on each rank's part and sums every norm
over all ranks (:mod:`hf_sam.engine.tensors`), the perturbation one process holding the whole would take.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .ascent_record import AscentRecord
from .descents import LastDescent, XSAMDescent
from .direction_cosines import DirectionTracker
from .directions import GradientDirection
from .guarded import reset_where_, uniform
from .moved_weights import MovedWeights, choose_mode
from .rules import AscentRule, project_
from .tensors import ShardLayout, global_norm, local
from .variants import Variant, declare_builtin, lookup

__all__ = ["MultiStepAscent", "scaled_loss"]


class MultiStepAscent:
    """Takes k ascent steps on the weights and restores them, for multi-step SAM.

    Args:
        params: the parameters to perturb; those with ``requires_grad=False`` are ignored.
        ascent_steps: k >= 1.
        rho: radius of the neighbourhood.
        ascent_rule: an :class:`~hf_sam.engine.rules.AscentRule` (the step length, and whether steps are
            projected onto the rho-ball), or a registered rule's name with its default options: "normalized"
            (step rho/k), "projected" (step rho, projected after every step) or "accumulated" (step rho).
        adaptive: ASAM. With T = |w| + adaptive_eta (w the unperturbed weights) each step is
            a T^2 g / ||T g|| and "projected" projects onto ||d / T|| <= rho.
        adaptive_eta: the eta of ASAM.
        descent: a :class:`~hf_sam.engine.descents.LastDescent` (which gradient the descent takes), or a
            registered descent's name with its default options ("last", "mean", "xsam", "gsam", "wsam").
        direction: a :class:`~hf_sam.engine.directions.GradientDirection`, or a registered direction's name
            ("gradient", "friendly").
        :meth:`hf_sam.SAMConfig.engine_kwargs` builds all three from a config's options.
        track_directions: also measure the cosine between successive ascent gradients and
            between the first ascent gradient and the descent gradient (keeps two more copies
            of the gradients; for diagnostics, not for speed).
        perturbed_weights: "swap" (the passes run on a second buffer the parameters point at),
            "copy" (on the parameters, after a snapshot) or "auto" (swap unless unsafe: FSDP2
            shards, parameters sharing storage); see :mod:`hf_sam.engine.moved_weights`.
        partition_group: the params are each rank's part of the whole over this group (ZeRO's partitions).

    After each training step :attr:`record` (an :class:`~hf_sam.engine.ascent_record.AscentRecord` of
    device tensors) and ``perturbation_norm`` (||d_k||, a 0-d tensor, in the rule's norm) describe
    it; the properties ``grad_norms``, ``skipped``, ``moved`` and ``zero_gradient`` read the record
    back to the host (each read waits for the device: for logs and tests, not for the hot path).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        ascent_steps: int = 1,
        rho: float = 0.05,
        ascent_rule: str | AscentRule = "normalized",
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        descent: str | LastDescent = "last",
        track_directions: bool = False,
        direction: str | GradientDirection = "gradient",
        perturbed_weights: str = "auto",
        partition_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        if int(ascent_steps) < 1:
            raise ValueError(f"ascent_steps={ascent_steps!r} is invalid: the engine needs k >= 1.")
        if not rho > 0 or adaptive_eta < 0:
            raise ValueError("rho must be > 0 and adaptive_eta >= 0.")
        rule = _built("ascent_rule", ascent_rule, rho)
        given = list(params)
        self.params = [p for p in given if p.requires_grad]
        if not self.params:
            raise ValueError("MultiStepAscent got no trainable parameters.")
        self._layout = ShardLayout(self.params, partition_group)
        self.ascent_steps = int(ascent_steps)
        self.rho = float(rho)
        self.rule: AscentRule = rule
        self.ascent_rule = rule.name
        self.adaptive = bool(adaptive)
        self.adaptive_eta = float(adaptive_eta)
        self.descent_rule: LastDescent = _built("descent", descent, self.rho)
        self.descent = self.descent_rule.name
        self.direction: GradientDirection = _built("direction", direction, self.rho)
        self.track_directions = bool(track_directions)
        self.step_size = rule.step_size(self.rho, self.ascent_steps)
        self._weights: list[Tensor] = self._layout.locals(self.params)  # local shards under FSDP2
        self.perturbed_weights = choose_mode(perturbed_weights, given, self._layout)
        self._moved = MovedWeights(self.params, self._weights, self.perturbed_weights)  # the one extra copy
        self.held_grads: list[Tensor | None] | None = None  # accumulated grads set aside during the ascent
        # the factor the gradients in p.grad carry (fp16 loss scaling, set by the loop before each step; None
        # for 1): state kept across steps (F-SAM's momentum, WSAM's decoupled term) is held unscaled
        self.grad_scale: Tensor | None = None
        self._scale: list[Tensor] | None = None  # ASAM's T, for this step only
        self._directions: DirectionTracker | None = None  # with track_directions only
        self._in_step = False
        # 16-bit gradients' squares are summed in float32, not in their own dtype
        wide = all(w.dtype in (torch.float32, torch.float64) for w in self._weights)
        self._norm_dtype = None if wide else torch.float32
        self._uniform = uniform(self._weights)  # the weights' layouts do not change (FSDP2 views alike)
        self._step_size_t = torch.tensor(self.step_size, dtype=torch.float64, device=self._weights[0].device)
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self.steps_taken = 0
        self._reach = 0.0  # an upper bound on ||d|| in the rule's norm: the steps' lengths added up
        self._measure_on_restore = False
        self.record = AscentRecord(self._weights[0].device)
        self.perturbation_norm: Tensor | None = None
        self.successive_cosines: list[Tensor] = []  # with track_directions only
        self.descent_cosine: Tensor | None = None

    # what the descents read (hf_sam.engine.descents.base.DescentContext)
    weights = property(lambda self: self._weights, doc="The trainable tensors (local shards under FSDP2).")
    backup = property(lambda self: self._moved.backup, doc="w during the step (never written by the step).")
    layout = property(lambda self: self._layout, doc="Which tensors are shards.")
    asam_scale = property(lambda self: self._scale, doc="ASAM's T = |w| + eta for this step (None without ASAM).")

    @property
    def xsam_alpha(self) -> float | None:
        """XSAM's alpha (None for another descent); settable between steps (the dynamic choice)."""
        return self.descent_rule.alpha if isinstance(self.descent_rule, XSAMDescent) else None

    @xsam_alpha.setter
    def xsam_alpha(self, value: float) -> None:
        if not isinstance(self.descent_rule, XSAMDescent):
            raise TypeError(f"The descent {self.descent!r} has no XSAM alpha.")
        self.descent_rule.alpha = float(value)

    @property
    def xsam_angle(self) -> Tensor | None:
        return self.descent_rule.angle

    # host reads of the record (each waits for the device)
    @property
    def grad_norms(self) -> list[float]:
        return [float(n) for n in self.record.grad_norms]

    @property
    def skipped(self) -> bool:
        return bool(self.record.dropped)

    @property
    def moved(self) -> bool:
        return bool(self.record.moved)

    @property
    def zero_gradient(self) -> bool:
        return bool(self.record.zero)

    # ----------------------------------------------------------------- step protocol
    @torch.no_grad()
    def begin(self) -> None:
        """Keep w (a snapshot under "copy") and set aside the gradients already accumulated in p.grad."""
        if self._in_step:
            raise RuntimeError("MultiStepAscent.begin() called twice without restore().")
        if self._layout.sharded:  # FSDP2 may hand out new local views between steps
            self._weights = self._layout.locals(self.params)
        self._moved.begin(self._weights)
        self.held_grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        if self.adaptive:
            self._scale = torch._foreach_abs(self._moved.backup)
            torch._foreach_add_(self._scale, self.adaptive_eta)
        self._reset_step_state()
        self.descent_rule.begin(len(self.params))
        self.direction.begin(self._weights)
        self._directions = DirectionTracker(self._weights, self._layout) if self.track_directions else None
        self._in_step = True

    @torch.no_grad()
    def ascend(self) -> Tensor:
        """Take one ascent step with the gradient in p.grad, then clear p.grad.

        Nothing is read back to the host. Returns a 0-d bool tensor, false once a non-finite
        gradient norm has dropped the perturbation; a loop need not look at it (testing it reads
        it back): after a drop the remaining steps leave the weights alone and the descent is at w.
        """
        if not self._in_step:
            raise RuntimeError("MultiStepAscent.ascend() called outside begin()/restore().")
        self.steps_taken += 1
        i = self.steps_taken
        if i > self.ascent_steps:
            raise RuntimeError(f"ascend() called more than ascent_steps={self.ascent_steps} times.")
        idx = [j for j, p in enumerate(self.params) if p.grad is not None]
        grads = [local(self.params[j].grad) for j in idx]
        for j in idx:
            self.params[j].grad = None
        if self._directions is not None:
            self._directions.ascent_gradient(idx, grads, i)
            self.successive_cosines = self._directions.successive
        self.direction.adjust(i, idx, grads, self.grad_scale)  # F-SAM: g - sigma m
        if self.adaptive:
            scale = [self._scale[j] for j in idx]
            torch._foreach_mul_(grads, scale)  # u = T g
        # one arithmetic at every step, no mode for a checkpoint to carry: squares summed in float32 (at least), the
        # tensors' norms combined in float64. Squares that overflow float32 (an element beyond ~1e19) give an inf
        # norm, so the ascent is dropped as a non-finite one; all vanishing (every element below ~1e-19) give 0, a
        # zero gradient. A float64 sum would cost 6-11% of a pass on a CPU (benchmarks/norm_precision.py).
        norm = global_norm(grads, self._layout, self._layout.flags(idx), dtype=self._norm_dtype)
        norm = norm.to(self._weights[0].device)  # (a rank owning no shard sums on the CPU)
        moving = self.record.observe(norm)
        self.descent_rule.ascent_gradient(i, idx, grads, self.record)
        if self.adaptive:
            torch._foreach_mul_(grads, scale)  # T^2 g
        # a / ||g|| is inf or nan only when the step is skipped; the grads are spent (scratch from here on)
        self._moved.move(idx, grads, torch.div(self._step_size_t, norm), ~moving, self._uniform, spent=True)
        self._reach += self.step_size  # each step has length step_size (or 0) in the rule's norm
        if self.rule.projects and self._reach > self.rho:
            # the consumed gradients are free: d = p - w is formed in them, not in new memory
            self._project(grads if len(idx) == len(self.params) else None)
        elif i == self.ascent_steps:
            # projected too when the steps cannot have left the ball (k=1, or step_mult <= 1/k)
            self._measure_perturbation()
        return self.record.intact

    @torch.no_grad()
    def shift(self, offsets: list[Tensor]) -> None:
        """Move the weights by ``offsets`` (one per trainable tensor) inside a step, e.g. to a
        random start in the ball. Move them only through the engine between begin() and
        restore(): it bounds ||d|| by the lengths of its own steps to skip needless projections."""
        if not self._in_step:
            raise RuntimeError("MultiStepAscent.shift() called outside begin()/restore().")
        self._moved.move_out()
        torch._foreach_add_(self._weights, [local(o).to(w) for w, o in zip(self._weights, offsets, strict=True)])
        self.record.shifted = True
        self._reach = math.inf  # unknown: project (and measure) from here on

    @torch.no_grad()
    def begin_descent(self) -> float | Tensor:
        """Put the accumulated gradients back in p.grad before the descent backward.

        Returns the factor to multiply the descent loss by: 1 for "last", 1/k for "mean"
        (p.grad then already holds (1/k) times the sum of the gradients at d_1..d_{k-1}), as a
        0-d tensor for "mean" (1 when the ascent was dropped).
        """
        if not self._in_step:
            raise RuntimeError("MultiStepAscent.begin_descent() called outside begin()/restore().")
        for p in self.params:
            p.grad = None  # an ascent pass without a following ascend() leaves nothing behind
        self.direction.end(self.record.dropped)
        if self.steps_taken >= 2 or self.record.shifted:  # a drop after a move: back to w, decided on the device
            dropped = self.record.dropped
            reset_where_(self._weights, self.backup, dropped, self._uniform)
            if self.perturbation_norm is not None:  # a projection before the drop measured a move
                norm = self.perturbation_norm
                self.perturbation_norm = torch.where(dropped, torch.zeros_like(norm), norm)
        # (one step, no shift: a dropped step did not move, and its measured norm is 0 already)
        if self._directions is not None:
            self._directions.before_descent_backward(self.held_grads)
        return self.descent_rule.before_backward(self)

    @torch.no_grad()
    def choose_xsam_alpha(self, loss_at: Callable[[], Tensor | float], alphas: list[float]) -> float:
        """XSAM's dynamic alpha (after the descent backward): :meth:`.descents.xsam.XSAMDescent.choose_alpha`."""
        return self.descent_rule.choose_alpha(self, loss_at, alphas)

    @torch.no_grad()
    def end_descent(self) -> None:
        """After the descent backward: the descent's own last word (XSAM's combination); with
        track_directions, cos(first ascent gradient, descent gradient)."""
        self.descent_rule.after_backward(self)
        if self._directions is not None:
            self.descent_cosine = self._directions.descent_cosine([p.grad for p in self.params])
            self._directions = None

    @torch.no_grad()
    def restore(self) -> None:
        """The weights back at w, bit for bit (pointed back, or copied back); safe to call after an error."""
        if not self._in_step:
            return
        if self._measure_on_restore:
            # ||d|| of a multi-step ascent, from p - w formed in the weights just before they are
            # overwritten: one pass fewer than forming it in a separate buffer
            torch._foreach_sub_(self._weights, self.backup)
            if self.adaptive:
                torch._foreach_div_(self._weights, self._scale)
            self.perturbation_norm = global_norm(self._weights, self._layout, self._layout.flags())
            self._measure_on_restore = False
        self._moved.restore()
        if self.held_grads is not None:  # an error struck before begin_descent(): undo the set-aside
            for p in self.params:
                p.grad = None
            self.return_held_grads()
        self._scale = None
        self._directions = None
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
            for _ in range(self.ascent_steps):  # all k passes: whether to stop is not read from the device
                loss = compute_loss()
                backward(loss)
                if clean is None:
                    clean = loss.detach()
                self.ascend()
            factor = self.begin_descent()
            backward(scaled_loss(compute_loss(), factor))
            self.end_descent()
        finally:
            self.restore()
        return clean

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, skipped: bool = False) -> None:
        """Call right after ``optimizer.step()``: a descent that updates the weights itself after the
        optimizer (WSAM's decoupled sharpness term) does it here; the others do nothing. ``skipped``: the
        step was skipped (a GradScaler found inf/NaN), so the descent's own update is dropped too."""
        self.descent_rule.after_optimizer_step(optimizer, self._layout.locals(self.params), skipped)

    def one_pass_step(self) -> None:
        """Call at the last micro-batch of a one-pass step between SAM steps, its gradient in p.grad: the descent
        adds what it remembers from the SAM steps (LookSAM's reuse; the others nothing)."""
        self.descent_rule.one_pass_step(self.params, self._layout)

    def state_dict(self) -> dict:
        """What the engine carries from one step to the next (F-SAM's momentum, a descent's own), for checkpoints."""
        return {"direction": self.direction.state_dict(), "descent": self.descent_rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.direction.load_state_dict(state.get("direction", {}))
        self.descent_rule.load_state_dict(state.get("descent", {}), self._weights)

    def set_rho(self, rho: float) -> None:
        """A new radius from the next step on (a rho schedule); the rule's step size follows."""
        self.rho = float(rho)
        self.step_size = self.rule.step_size(self.rho, self.ascent_steps)
        self._step_size_t.fill_(self.step_size)

    # ----------------------------------------------------------------------- helpers
    def return_held_grads(self) -> None:
        """Put the gradients set aside by begin() back in p.grad."""
        for p, g in zip(self.params, self.held_grads, strict=True):
            p.grad = g
        self.held_grads = None

    def _measure_perturbation(self) -> None:
        if self.steps_taken == 1 and not self.record.shifted:
            # one step of length a in the rule's norm (or none): known without touching the weights
            self.perturbation_norm = self.step_size * self.record.moved.double()
        else:
            self._measure_on_restore = True  # set by restore()

    def _project(self, scratch: list[Tensor] | None = None) -> None:
        """The "projected" rule's projection; ``scratch``: free buffers to hold d (saves an allocation)."""
        self.perturbation_norm = project_(
            self._weights, self.backup, self._scale, self.rho, self._layout, scratch, self._uniform
        )
        self._reach = self.rho


def scaled_loss(loss: Tensor, factor: float | Tensor) -> Tensor:
    """``loss * factor``, skipping the multiplication for a plain 1 (a tensor factor is never compared:
    that would read it back to the host)."""
    return loss if isinstance(factor, float) and factor == 1.0 else loss * factor


def _built(kind: str, given: object, rho: float) -> object:
    """``given`` itself when it is a built object, else the registered ``kind`` of that name with its defaults."""
    if not isinstance(given, str):
        return given
    variant = lookup(kind, given)
    options = variant.options() if variant.options is not None else None
    return variant.build(options, rho)


declare_builtin(
    Variant("method", "sam", "k ascent steps, then the descent step (everything above)", needs_ascent=False,
            paper="SAM (Foret et al., 2021, arXiv 2010.01412)")
)  # fmt: skip
