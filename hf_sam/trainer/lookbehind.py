"""Lookbehind-SAM inside the Trainer's step (``sam_method="lookbehind"``).

The Trainer calls ``optimizer.step()``, clipping and the scheduler once per step. A Lookbehind batch
needs k optimizer steps on the fast weights: the first k - 1 are taken here, in ``training_step``,
clipped as the Trainer clips; the k-th is the Trainer's own (p.grad holds g(phi'_k) and the weights
theta_{k-1} when training_step returns). Right after it, ``on_optimizer_step`` moves the weights to
phi + alpha (theta_k - phi). The scheduler steps once per batch. Gradient accumulation, fp16 loss
scaling and several processes are refused before training: each would need an exact rule this
split does not give (a shared optimizer step over micro-batches, a scaler step per inner step, the
inner steps' all-reduces under no_sync).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..engine.lookbehind import inner_steps, look_behind_, take_gradients


class LookbehindStep(TrainerCallback):
    """One trainer's Lookbehind state: the slow weights of the batch in flight, until the Trainer's step."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.pending: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None] | None = None
        self.rho = trainer.sam_config.rho  # this step's (a rho schedule sets it)
        self.last_alphas: list[torch.Tensor] = []

    def run(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """k + 1 passes and k - 1 optimizer steps; returns the clean loss at phi."""
        trainer, k = self.trainer, self.trainer.sam_config.ascent_steps
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()

        def gradient() -> tuple[torch.Tensor, list[torch.Tensor]]:
            loss = trainer._sam_pass(model, inputs, num_items_in_batch, 1.0, trainer.accelerator.backward)
            return loss, take_gradients(params)

        def inner_step(i: int) -> bool:
            if i == k:
                return False  # the Trainer clips and takes this step, then on_optimizer_step looks behind
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                trainer.accelerator.clip_grad_norm_(params, trainer.args.max_grad_norm)
            trainer.optimizer.step()
            return True

        run = inner_steps(params, k, self.rho, gradient, inner_step)
        self.pending = (params, run.slow, run.first_move)
        return run.clean

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.pending is None:
            return
        params, slow, first_move = self.pending
        with torch.no_grad():
            fast = [p.detach().clone() for p in params]  # theta_k, after the Trainer's step
        self.last_alphas = look_behind_(params, slow, fast, first_move, self.trainer.sam_config.lookbehind_alpha)
        self.pending = None
        if self.last_alphas:
            alpha = torch.stack(self.last_alphas).mean()
            self.trainer._sam_metrics.add({"sam/lookbehind_alpha": alpha}, state.global_step)
