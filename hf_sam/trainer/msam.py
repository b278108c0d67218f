"""Momentum-SAM inside the Trainer's step (``sam_method="msam"``).

One forward+backward pass per micro-batch, the stock step's own, at w~ = w - rho v / ||v|| with v the
optimizer's momentum (:class:`~hf_sam.engine.momentum.MomentumPerturbation`); the weights are back at
w before the optimizer steps. The loss the Trainer logs is the loss at w~, and BatchNorm running
statistics come from that one pass. The momentum is SGD's ``momentum_buffer`` or Adam's/AdamW's
``exp_avg``; an optimizer without one is refused before training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..engine.momentum import MomentumPerturbation
from .checks import perturbed_weights_mode

_ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


def momentum_key(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer-state key of the momentum MSAM perturbs along; ValueError if there is none."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    groups = inner.param_groups
    if isinstance(inner, torch.optim.SGD) and all(g.get("momentum", 0) > 0 for g in groups):
        return "momentum_buffer"
    if isinstance(inner, _ADAM_FAMILY) and all(g["betas"][0] > 0 for g in groups):
        return "exp_avg"
    raise ValueError(
        f"sam_method='msam' perturbs along the optimizer's momentum, and {type(inner).__name__} has none MSAM "
        "can read: use SGD with momentum (--optim sgd --optim_args momentum=0.9; early transformers 5.x "
        "releases, 5.0 among them, ignore optim_args for SGD: pass optimizers=(torch.optim.SGD(..., "
        "momentum=0.9), None)) or Adam/AdamW (beta1 > 0)."
    )


class MomentumSAMStep:
    """One trainer's MSAM: the perturbation bound to the model being trained."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.perturbation: MomentumPerturbation | None = None
        self._bound_to: nn.Module | None = None
        self.rho = trainer.sam_config.rho

    def run(self, model: nn.Module, stock_step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The stock step at w~; returns its loss (the loss at w~)."""
        config, optimizer = self.trainer.sam_config, self.trainer.optimizer
        key = momentum_key(optimizer)
        if self.perturbation is None or self._bound_to is not model:
            mode = perturbed_weights_mode(self.trainer)
            self.perturbation = MomentumPerturbation(
                model.parameters(), self.rho, config.adaptive, config.adaptive_eta, perturbed_weights=mode
            )
            self._bound_to = model
        self.perturbation.set_rho(self.rho)
        state = optimizer.state
        momenta = [state[p].get(key) if p in state else None for p in self.perturbation.params]
        self.perturbation.begin(momenta)
        try:
            return stock_step()
        finally:
            self.perturbation.restore()
