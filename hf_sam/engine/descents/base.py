"""The descent protocol and SAM's own descent, the one every other descent extends.

- :class:`LastDescent` (SAM): the gradient at w + d_k.
- :class:`RewritingDescent`: a descent that rewrites g_s (XSAM, GSAM, WSAM), the accumulated
  gradients of earlier micro-batches set aside meanwhile; :class:`CleanGradientDescent` keeps g for it.

Each descent is driven by :class:`~hf_sam.engine.ascent.MultiStepAscent` through the hooks :class:`LastDescent`
declares, each with its default: ``begin`` (a new step), ``ascent_gradient`` (each ascent step's gradient, T g
under ASAM), ``before_backward`` (returns the descent loss's factor), ``after_backward``, ``after_optimizer_step``
(a descent that moves the weights itself after the optimizer, WSAM's; LookSAM's memory ends its step there),
``one_pass_step`` (the one-pass steps of ``sam_every_n_steps`` > 1: LookSAM's reuse), ``choose_alpha`` (XSAM's
dynamic alpha), and ``state_dict``/``load_state_dict`` (what it carries across steps, for checkpoints). It sees the
engine as a :class:`DescentContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ..ascent_record import AscentRecord
from ..tensors import ShardLayout, local
from ..variants import Variant, declare_builtin


class DescentContext(Protocol):
    """What a descent reads and may change on the engine that drives it (a
    :class:`~hf_sam.engine.ascent.MultiStepAscent`): the descents receive the engine through this
    protocol, so that they need not import it."""

    params: list[Tensor]  # the trainable parameters (p.grad lives here)
    held_grads: list[Tensor | None] | None  # the accumulated gradients set aside by begin()
    ascent_steps: int  # k
    steps_taken: int  # ascent steps taken in this training step
    record: AscentRecord  # what the ascent did (device tensors)
    grad_scale: Tensor | None  # the factor p.grad carries (fp16 loss scaling), None for 1

    @property
    def weights(self) -> list[Tensor]: ...  # the trainable tensors (local shards under FSDP2)

    @property
    def backup(self) -> list[Tensor]: ...  # w, as it was at begin()

    @property
    def layout(self) -> ShardLayout: ...

    @property
    def asam_scale(self) -> list[Tensor] | None: ...  # ASAM's T = |w| + eta (None without ASAM)

    def return_held_grads(self) -> None:
        """Put the set-aside gradients back in p.grad."""


class LastDescent:
    """SAM's descent: the gradient at w + d_k, added to the gradients already accumulated."""

    name = "last"
    angle: Tensor | None = None  # the last descent's angle to d_k in degrees, for a descent that measures it (XSAM)

    def begin(self, size: int) -> None:
        """A new training step over ``size`` trainable tensors."""

    def ascent_gradient(self, step: int, idx: list[int], grads: list[Tensor], record: AscentRecord) -> None:
        """The gradient of ascent step ``step`` (tensors ``idx``); ``record``: what the ascent did so far."""

    def before_backward(self, engine: DescentContext) -> float | Tensor:
        """Before the descent backward; returns the factor for the descent loss."""
        engine.return_held_grads()
        return 1.0

    def after_backward(self, engine: DescentContext) -> None:
        """After the descent backward (the descent gradient is in p.grad)."""

    def after_optimizer_step(
        self, optimizer: torch.optim.Optimizer, weights: list[Tensor], skipped: bool = False
    ) -> None:
        """Right after ``optimizer.step()`` (``weights``: the trainable tensors; ``skipped``: a GradScaler skipped
        the step): a descent that moves the weights itself does it here."""

    def one_pass_step(self, params: list[Tensor], layout: ShardLayout) -> None:
        """At the last micro-batch of a one-pass step between SAM steps (``sam_every_n_steps`` > 1), its gradient in
        ``params``' p.grad: a descent that remembers something from the SAM steps adds it here (LookSAM's reuse)."""

    def choose_alpha(self, engine: DescentContext, loss_at: Callable[[], Tensor | float], alphas: list[float]) -> float:
        """A descent with an alpha chosen during training (XSAM's dynamic one) picks it among ``alphas``."""
        raise TypeError(f"The descent {self.name!r} has no alpha to choose.")

    def state_dict(self) -> dict:
        """What the descent carries from one step to the next, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict, weights: list[Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (a resumed run); ``weights``: the engine's trainable tensors,
        whose devices and dtypes the loaded tensors take."""


declare_builtin(
    Variant("descent", "last", "the gradient at w + d_k (SAM)", lambda o, rho: LastDescent(), needs_ascent=False)
)  # fmt: skip


class RewritingDescent(LastDescent):
    """A descent that rewrites the descent gradient g_s of its micro-batch: the gradients accumulated
    by earlier micro-batches stay aside during the descent backward, so that p.grad holds g_s alone;
    :meth:`rewrite` changes it in place, then the set-aside gradients are added back (as autograd
    would have added them)."""

    def before_backward(self, engine: DescentContext) -> float | Tensor:
        return 1.0  # the accumulated gradients stay aside: the rewrite needs g_s alone

    def rewrite(self, engine: DescentContext, grads: list[Tensor]) -> None:
        """Change the descent gradient ``grads`` (local tensors, one per parameter) in place."""

    def after_backward(self, engine: DescentContext) -> None:
        held = engine.held_grads
        if held is None:
            return
        for p in engine.params:
            if p.grad is None:  # a tensor the descent did not reach has g = 0
                p.grad = torch.zeros_like(p)
        grads = [local(p.grad) for p in engine.params]
        self.rewrite(engine, grads)
        onto = [(local(h), g) for h, g in zip(held, grads, strict=True) if h is not None]
        if onto:  # the accumulated gradients of earlier micro-batches, as autograd would add them
            torch._foreach_add_([h for h, _ in onto], [g for _, g in onto])
        for p, h in zip(engine.params, held, strict=True):
            if h is not None:
                p.grad = h
        engine.held_grads = None


class CleanGradientDescent(RewritingDescent):
    """A rewriting descent that also keeps a copy of the first ascent gradient g_1 (the clean gradient at
    w) to combine with g_s (GSAM, WSAM, LookSAM's memory). The engine hands the hooks T g under ASAM:
    :meth:`clean_gradient` divides T out again."""

    _size = 0
    _copy: list[Tensor | None] | None = None

    def begin(self, size: int) -> None:
        self._size = size
        self._copy = None

    def ascent_gradient(self, step: int, idx: list[int], grads: list[Tensor], record: AscentRecord) -> None:
        if step != 1:
            return
        copies = torch._foreach_mul(grads, 1.0) if grads else []
        self._copy = [None] * self._size
        for j, c in zip(idx, copies, strict=True):
            self._copy[j] = c

    def clean_gradient(self, engine: DescentContext) -> list[Tensor]:
        """g, one local tensor per parameter (zeros where the clean pass gave none); forgets the copy."""
        copy, self._copy = self._copy, None
        if copy is None:
            raise RuntimeError("the descent needs the clean gradient: no ascent step was taken")
        g = [torch.zeros_like(w) if c is None else c for c, w in zip(copy, engine.weights, strict=True)]
        if engine.asam_scale is not None:
            torch._foreach_div_(g, engine.asam_scale)
        return g
