"""Where a SAM micro-batch's gradients are and how the weights are reached: the plain backend (autograd
fills p.grad, the weights are the parameters) and, for DeepSpeed, :mod:`hf_sam.trainer.deepspeed`.

The micro-batch driver calls the engine only through a backend, so that an engine that owns backward,
gradient partitions and the optimizer step (DeepSpeed) can put the gradients where the SAM engine reads
them, gather partitioned weights around its updates, and step the optimizer after the weights are back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..engine.ascent import MultiStepAscent

Backward = Callable[[torch.Tensor], None]


class GradientBackend(Protocol):
    """What the micro-batch driver calls for each pass: where its gradient goes and how the engine reaches it."""

    def begin(self, engine: MultiStepAscent) -> None: ...

    def ascent_backward(self, loss: torch.Tensor, backward: Backward) -> None: ...

    def ascend(self, engine: MultiStepAscent) -> None: ...

    def begin_descent(self, engine: MultiStepAscent) -> float | torch.Tensor: ...

    def descent_backward(self, loss: torch.Tensor, backward: Backward) -> None: ...

    def end_descent(self, engine: MultiStepAscent) -> None: ...

    def restore(self, engine: MultiStepAscent) -> None: ...


class AutogradBackend:
    """Autograd puts each pass's gradient in p.grad, the accelerator's backward syncs it; the engine's
    calls pass straight through."""

    def begin(self, engine: MultiStepAscent) -> None:
        engine.begin()

    def ascent_backward(self, loss: torch.Tensor, backward: Backward) -> None:
        backward(loss)

    def ascend(self, engine: MultiStepAscent) -> None:
        engine.ascend()

    def begin_descent(self, engine: MultiStepAscent) -> float | torch.Tensor:
        return engine.begin_descent()

    def descent_backward(self, loss: torch.Tensor, backward: Backward) -> None:
        backward(loss)

    def end_descent(self, engine: MultiStepAscent) -> None:
        engine.end_descent()

    def restore(self, engine: MultiStepAscent) -> None:
        engine.restore()
