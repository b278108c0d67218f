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

from ..engine.lookbehind import ascend_, look_behind_


class LookbehindStep(TrainerCallback):
    """One trainer's Lookbehind state: the slow weights of the batch in flight, until the Trainer's step."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.pending: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None] | None = None
        self.rho = trainer.sam_config.rho  # this step's (a rho schedule sets it)
        self.last_alphas: list[torch.Tensor] = []

    def run(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """k + 1 passes and k - 1 optimizer steps; returns the clean loss at phi."""
        trainer, config = self.trainer, self.trainer.sam_config
        params = [p for p in model.parameters() if p.requires_grad]
        backward = trainer.accelerator.backward
        model.train()
        with torch.no_grad():
            slow = [p.detach().clone() for p in params]
            fast = [p.detach().clone() for p in params]
            chain = [p.detach().clone() for p in params]
        clean = trainer._sam_pass(model, inputs, num_items_in_batch, 1.0, backward)
        grad = self._take_grads(params)
        first_move = None
        for i in range(1, config.ascent_steps + 1):
            ascend_(chain, grad, self.rho)
            with torch.no_grad():
                torch._foreach_copy_(params, chain)
            trainer._sam_pass(model, inputs, num_items_in_batch, 1.0, backward)  # g(phi'_i)
            grad = self._take_grads(params)
            with torch.no_grad():
                torch._foreach_copy_(params, fast)
            for p, g in zip(params, grad, strict=True):
                p.grad = g.clone()
            if i == config.ascent_steps:
                break  # the Trainer clips and takes this step, then on_optimizer_step looks behind
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                trainer.accelerator.clip_grad_norm_(params, trainer.args.max_grad_norm)
            trainer.optimizer.step()
            with torch.no_grad():
                torch._foreach_copy_(fast, params)
                if first_move is None:
                    first_move = torch._foreach_sub(fast, slow)
            for p in params:
                p.grad = None
        self.pending = (params, slow, first_move)
        return clean

    @staticmethod
    def _take_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p in params:
            p.grad = None
        return grads

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
