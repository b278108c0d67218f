"""SAM every n steps and LookSAM inside the Trainer (``sam_every_n_steps``, ``sam_reuse_alpha``).

Optimizer steps whose index (0-based, ``state.global_step``) is a multiple of n are full SAM steps;
every other step makes exactly one forward+backward pass per micro-batch, the stock step's. With
``sam_reuse_alpha`` > 0 each full step also leaves g_v (:class:`~hf_sam.engine.descents.looksam.
LookSAMDescent`), and after the last micro-batch of a cheap step alpha ||g|| / ||g_v|| g_v is added
to the accumulated gradient g. All micro-batches of a step follow the step's kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine.descents.looksam import LookSAMDescent, add_reuse_
from ..engine.tensors import ShardLayout, local


class EveryNSteps:
    """Which optimizer steps are SAM steps, and LookSAM's reuse on the others."""

    def __init__(self, trainer) -> None:
        config = trainer.sam_config
        self.trainer = trainer
        self.n = config.every_n_steps
        self.alpha = config.reuse_alpha
        self.granularity = config.reuse_granularity
        self.memory = LookSAMDescent(self.granularity) if self.alpha > 0 else None

    def forget(self) -> None:
        """A new run (another train() call, a model_init trial): no g_v from an earlier one."""
        self.memory = LookSAMDescent(self.granularity) if self.alpha > 0 else None

    def full_step(self, global_step: int) -> bool:
        return global_step % self.n == 0

    def after_full_micro_batch(self, layout: ShardLayout) -> None:
        """After a SAM micro-batch: at the step's last one, g_v from the step's g and g_s."""
        if self.memory is not None and self.trainer.accelerator.sync_gradients:
            self.memory.finish_step(layout)

    def cheap_step(
        self, params: list[torch.Tensor], layout: ShardLayout, stock_step: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """One pass (the stock step); at the step's last micro-batch, the reuse term."""
        loss = stock_step()
        if self.memory is None or self.memory.g_v is None or not self.trainer.accelerator.sync_gradients:
            return loss
        for p in params:
            if p.grad is None:  # a tensor the pass did not reach has g = 0
                p.grad = torch.zeros_like(p)
        grads = [local(p.grad) for p in params]
        add_reuse_(grads, self.memory.g_v, self.alpha, self.granularity, layout, self.memory.g_v_size(layout))
        return loss
