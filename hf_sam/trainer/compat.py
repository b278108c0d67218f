"""Trainer attributes whose presence depends on the transformers release, read in one place.

Each function keeps the meaning the installed release gives the attribute, so SAM's extra passes
scale their loss exactly as that release's stock ``training_step`` scales the descent pass. When a
release renames or adds one, this module is the one edit.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

# transformers >= 5.20 reads the class attribute ``loss_is_scaled_for_ga`` (None: decide from the model);
# 5.0-5.19 have no such attribute and always decide from ``model_accepts_loss_kwargs``.
HAS_LOSS_IS_SCALED_FOR_GA = hasattr(Trainer, "loss_is_scaled_for_ga")


def loss_is_scaled_for_ga(trainer: Trainer, num_items_in_batch: Any) -> bool:
    """Whether the installed release's ``training_step`` takes this loss as already scaled for accumulation."""
    if HAS_LOSS_IS_SCALED_FOR_GA:
        declared = trainer.loss_is_scaled_for_ga
        if declared is not None:
            return bool(declared)
    # the rule of every 5.x release when nothing is declared: normalized by num_items_in_batch, by the
    # model or by a compute_loss_func
    accepts = getattr(trainer, "model_accepts_loss_kwargs", False)
    return bool(accepts and num_items_in_batch is not None) or getattr(trainer, "compute_loss_func", None) is not None


def declare_loss_unscaled(trainer: Trainer) -> None:
    """Say the model's loss is a per-batch mean that ignores ``num_items_in_batch`` (classification heads):
    the Trainer then divides it by the accumulation steps, on every release."""
    if HAS_LOSS_IS_SCALED_FOR_GA:
        trainer.loss_is_scaled_for_ga = False
    else:  # before 5.20 the same decision comes from model_accepts_loss_kwargs alone
        trainer.model_accepts_loss_kwargs = False


def accumulation_steps(trainer: Trainer) -> int:
    """The micro-batches of the current optimizer step (set by the training loop; the configured
    value outside it, where a script calls ``training_step`` itself)."""
    return getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)


__all__ = ["HAS_LOSS_IS_SCALED_FOR_GA", "accumulation_steps", "declare_loss_unscaled", "loss_is_scaled_for_ga"]
