"""One whole SAM step for a plain loop, through the engine's step protocol (begin, k x ascend,
begin_descent, the descent backward, end_descent, restore)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def scaled_loss(loss: Tensor, factor: float | Tensor) -> Tensor:
    """``loss * factor``, skipping the multiplication for a plain 1 (a tensor factor is never compared:
    that would read it back to the host)."""
    return loss if isinstance(factor, float) and factor == 1.0 else loss * factor


def run_step(engine: Any, compute_loss: Callable[[], Tensor], backward: Callable[[Tensor], None] | None) -> Tensor:
    """k ascent passes, the descent pass and the restore on ``engine`` (a MultiStepAscent); the descent
    gradient is added to p.grad. Returns the loss at w."""
    backward = backward or (lambda loss: loss.backward())
    engine.begin()
    try:
        clean = None
        for _ in range(engine.ascent_steps):  # all k passes: whether to stop is not read from the device
            loss = compute_loss()
            backward(loss)
            if clean is None:
                clean = loss.detach()
            engine.ascend()
        factor = engine.begin_descent()
        backward(scaled_loss(compute_loss(), factor))
        engine.end_descent()
    finally:
        engine.restore()
    return clean
