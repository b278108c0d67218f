"""The descent protocol and SAM's own descent, the one every other descent extends.

- :class:`LastDescent` (SAM): the gradient at w + d_k.

Each descent is driven by :class:`~hf_sam.engine.ascent.MultiStepAscent` through four hooks: ``begin`` (a new step),
``ascent_gradient`` (each ascent step's gradient, T g under ASAM), ``before_backward`` (returns the
descent loss's factor) and ``after_backward``. It sees the engine as a :class:`DescentContext`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from ..ascent_record import AscentRecord
from ..tensors import ShardLayout


class DescentContext(Protocol):
    """What a descent reads and may change on the engine that drives it (a
    :class:`~hf_sam.engine.ascent.MultiStepAscent`): the descents receive the engine through this
    protocol, so that they need not import it."""

    params: list[Tensor]  # the trainable parameters (p.grad lives here)
    held_grads: list[Tensor | None] | None  # the accumulated gradients set aside by begin()
    ascent_steps: int  # k
    steps_taken: int  # ascent steps taken in this training step
    record: AscentRecord  # what the ascent did (device tensors)

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
