"""GSAM's rho schedule (``sam_rho_schedule="lr"``): rho follows the learning rate.

    rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

with lr_t the learning rate of the step about to be taken (the first group's) and lr_min, lr_max the
bounds of the run's schedule: rho at the peak learning rate, rho_min at the lowest. The bounds are read
from the schedule itself (every ``lr_scheduler_type`` of transformers is a ``LambdaLR``) over the
run's steps, once, and saved with checkpoints.
"""

from __future__ import annotations

from typing import Any


def learning_rate_bounds(scheduler: Any, steps: int) -> tuple[float, float]:
    """(lowest, highest) learning rate of the first parameter group over steps 0..steps."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    lambdas = getattr(inner, "lr_lambdas", None)
    if not lambdas:
        raise ValueError(
            f"sam_rho_schedule='lr' needs a LambdaLR learning-rate schedule to read its bounds from (got "
            f"{type(inner).__name__}); every lr_scheduler_type of transformers but reduce_lr_on_plateau is one."
        )
    base = float(inner.base_lrs[0])
    values = [base * float(lambdas[0](t)) for t in range(max(int(steps), 0) + 1)]
    return min(values), max(values)


class LearningRateRho:
    """rho_t from the current learning rate (see the module)."""

    def __init__(self, rho: float, rho_min: float) -> None:
        self.rho = float(rho)
        self.rho_min = float(rho_min)
        self.bounds: tuple[float, float] | None = None  # (lr_min, lr_max), read at the first step

    def at(self, learning_rate: float, scheduler: Any, steps: int) -> float:
        """rho for a step at ``learning_rate`` of a run of ``steps`` optimizer steps under ``scheduler``."""
        if self.bounds is None:
            self.bounds = learning_rate_bounds(scheduler, steps)
        low, high = self.bounds
        if high <= low:  # a constant learning rate: rho at the peak
            return self.rho
        return self.rho_min + (self.rho - self.rho_min) * (learning_rate - low) / (high - low)
