"""What one ``train()`` call owns: the SAM state that lives from a run's first step to its end.

The trainer holds one :class:`SAMRun` at a time (``trainer.sam_run``), made anew when ``train()`` starts and when it
ends: another ``train()`` (``model_init``, ``hyperparameter_search``) may train another model or re-wrap it, and a
resumed run reads back from its checkpoint what it needs. Everything SAM keeps between steps of a run is here (the
engine holds the descent's memory: LookSAM's g_v, F-SAM's momentum); only XSAM's chosen alpha, the metrics and the
micro-batch count live on the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..engine.ascent import MultiStepAscent
from .rho_schedule import LearningRateRho


@dataclass
class SAMRun:
    """The state of one run.

    engine: the engine bound to the model being trained (None until the first SAM step).
    bound_to: the model the engine was built on (a re-wrapped model gets a new engine).
    batchnorms: that model's BatchNorm layers (their statistics are frozen during the ascent passes).
    optimizer_checked: the optimizer was checked for a step inside backward (once per run, before any pass).
    pending_state: the engine's state read from a checkpoint, waiting for the engine (F-SAM's m, LookSAM's g_v).
    flops_factor: the last micro-batch's forward+backward passes (the Trainer's total_flops).
    zero_parts: under DeepSpeed, this rank's parts of ZeRO's partitions the engine works on.
    held_descent: under DeepSpeed, the descent gradients of a step's earlier micro-batches.
    rho_schedule: ``sam_rho_schedule="lr"``'s rho from the learning rate, with the bounds it read from this run's
        schedule (None for a constant rho).
    """

    engine: MultiStepAscent | None = None
    bound_to: nn.Module | None = None
    batchnorms: list[nn.Module] = field(default_factory=list)
    optimizer_checked: bool = False
    pending_state: dict[str, Any] | None = None
    flops_factor: float = 1.0
    zero_parts: Any = None
    held_descent: Any = None
    rho_schedule: LearningRateRho | None = None
