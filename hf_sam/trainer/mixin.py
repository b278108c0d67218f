"""SAMMixin: multi-step SAM for any ``transformers.Trainer`` subclass; SAMTrainer and friends.

The Trainer keeps the optimizer, clipping, the scheduler, zeroing and checkpoints. The mixin
only runs the ascent and descent passes inside each micro-batch's ``training_step`` (see
:mod:`hf_sam.trainer.micro_batch`) and adds the ``sam/*`` metrics to the training logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback

from ..config import SAMConfig
from ..engine.ascent import MultiStepAscent, scaled_loss
from ..engine.descents.xsam import alpha_grid
from .args import SAMArgumentsMixin
from .checks import check_launch, check_trainable_dtypes
from .launch import GradientSync
from .lookbehind import LookbehindStep, check_lookbehind
from .micro_batch import RandomState, SAMMicroBatch, frozen_batchnorm_stats, rolled_back
from .step_metrics import SAMStepMetrics

SAM_STATE_FILE = "sam_state.json"


class _EverySAMStepRan(TrainerCallback):
    """Fails the first optimizer step made without a SAM micro-batch: a training_step override
    that neither calls super().training_step() nor accelerator.backward() trains without SAM."""

    def __init__(self, trainer: SAMMixin) -> None:
        self.trainer = trainer
        self.seen = 0

    def on_step_end(self, args, state, control, **kwargs):
        ran = self.trainer.sam_micro_batches_run
        if ran == self.seen:
            raise RuntimeError(
                f"{type(self.trainer).__name__}: an optimizer step ran without a SAM step. Its training_step "
                "override must call super().training_step() (SAM runs inside it)."
            )
        self.seen = ran


class SAMMixin:
    """Adds multi-step SAM to a ``Trainer`` subclass: ``class SAMSFTTrainer(SAMMixin, SFTTrainer)``.

    The SAM knobs come from the ``sam_*`` fields of the arguments (any class built with
    :class:`SAMArgumentsMixin`) or from ``sam_config=SAMConfig(...)``. With ``ascent_steps=0`` the
    trainer is exactly its base class. The subclass's ``training_step`` runs once per micro-batch
    and makes the clean pass; its ``compute_loss`` is used for every pass, and what it records on
    the trainer in the extra passes (the attributes in ``sam_rollback_attributes``) is undone.
    """

    # Trainer attributes the extra SAM passes must not change: TRL's metrics and token count.
    sam_rollback_attributes: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(SAMMixin):
            raise TypeError(f"{cls.__name__}: put SAMMixin before the Trainer class in the bases.")
        for base in mro[: mro.index(SAMMixin)]:
            if base is not cls and issubclass(base, Trainer) and not issubclass(base, SAMMixin):
                raise TypeError(
                    f"{cls.__name__}: put SAMMixin (or SAMTrainer) first in the bases, e.g. "
                    f"`class {cls.__name__}(SAMMixin, {base.__name__})`: {base.__name__}.__init__ does not "
                    "know sam_config and its training_step would bypass SAM."
                )

    def __init__(self, *args: Any, sam_config: SAMConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if sam_config is None:
            sam_config = self.args.sam_config if isinstance(self.args, SAMArgumentsMixin) else SAMConfig()
        sam_config.validate()
        self.sam_config = sam_config
        self._sam_engine: MultiStepAscent | None = None
        self._sam_bound_to: nn.Module | None = None
        self._sam_batchnorms: list[nn.Module] = []
        self._sam_metrics = SAMStepMetrics(sam_config.diagnostics)
        self.sam_micro_batches_run = 0
        # XSAM's dynamic alpha and the epoch it was chosen in (saved with checkpoints)
        self.sam_xsam_alpha: float | None = sam_config.xsam_alpha
        self._sam_xsam_epoch: int | None = None
        self._lookbehind: LookbehindStep | None = None
        if sam_config.ascent_steps >= 1:
            self.add_callback(_EverySAMStepRan(self))
            check_launch(self)
            if self.model is not None:
                check_trainable_dtypes(self.model)
        if sam_config.method == "lookbehind":
            check_lookbehind(self)
            self._lookbehind = LookbehindStep(self)
            self.add_callback(self._lookbehind)

    @property
    def sam_skipped_ascents(self) -> int:
        return self._sam_metrics.skipped_ascents

    @property
    def sam_zero_gradient_ascents(self) -> int:
        return self._sam_metrics.zero_gradient_ascents

    # ------------------------------------------------------------------- binding
    def train(self, *args: Any, **kwargs: Any) -> Any:
        # every train() call may train another model (model_init, hyperparameter_search) or
        # re-wrap it: bind anew at its first step, after accelerate has prepared the model
        self._sam_unbind()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._sam_unbind()

    def _sam_unbind(self) -> None:
        self._sam_engine = None
        self._sam_bound_to = None
        self._sam_batchnorms = []

    def _sam_bind(self, model: nn.Module) -> MultiStepAscent:
        """The engine for the model being trained (the one training_step receives)."""
        if self._sam_engine is None or self._sam_bound_to is not model:
            check_trainable_dtypes(model)
            self._sam_engine = MultiStepAscent(model.parameters(), **self.sam_config.engine_kwargs())
            self._sam_bound_to = model
            self._sam_batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self._sam_metrics.last_logged_step = self.state.global_step
        return self._sam_engine

    # --------------------------------------------------------------------- the step
    def sam_shared_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Work done once per micro-batch and shared by all its passes (DPO: the reference log-probs).

        Override to add it to the inputs; the default returns them unchanged.
        """
        return inputs

    def sam_step_context(self) -> contextlib.AbstractContextManager:
        """A context around the whole SAM micro-batch (DPO: read the shared reference log-probs)."""
        return contextlib.nullcontext()

    def _sam_pass(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        factor: float | torch.Tensor,
        backward: Any,
    ) -> torch.Tensor:
        """One extra forward+backward pass as the stock training_step makes it; returns its loss."""
        prepared = self._prepare_inputs(dict(inputs))
        with self.compute_loss_context_manager():
            # compute_loss may pop labels or add keys: every pass gets its own shallow copy
            loss = self.compute_loss(model, dict(prepared), num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if not scaled:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        backward(scaled_loss(loss, factor))
        return loss.detach()

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """k ascent passes, then the descent pass at w + d_k; weights restored on return.

        The descent gradient is added to p.grad like the stock step's; the returned loss is the
        clean loss at w (what the stock Trainer reports for this batch).
        """
        if self.sam_config.ascent_steps == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._lookbehind is not None:  # another method, its own step (hf_sam.trainer.lookbehind)
            self.sam_micro_batches_run += 1
            return self._lookbehind.run(model, self._prepare_inputs(inputs), num_items_in_batch)
        engine = self._sam_bind(model)
        inputs = self.sam_shared_inputs(model, inputs)
        extra_inputs = dict(inputs)  # before the clean pass can change the dict it is given
        config = self.sam_config
        choose = self._sam_choose_xsam_alpha_now()
        if self.sam_xsam_alpha is not None:
            engine.xsam_alpha = self.sam_xsam_alpha
        micro = SAMMicroBatch(
            engine=engine,
            sync=GradientSync(model, config.sync_ascent),
            batchnorms=self._sam_batchnorms,
            run_pass=lambda batch, factor, backward: self._sam_pass(model, batch, num_items_in_batch, factor, backward),
            inputs=extra_inputs,
            side_effects=lambda: rolled_back(self, self.sam_rollback_attributes),
            rng=RandomState(engine.params[0].device) if config.replay_rng else None,
            probe=(lambda: self._sam_probe_loss(model, extra_inputs, num_items_in_batch)) if choose else None,
            alphas=alpha_grid(config.xsam_alpha_max) if choose else None,
        )
        try:
            with self.sam_step_context(), micro.driving(self.accelerator):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            engine.restore()
        if not micro.ran:
            raise RuntimeError(
                f"{type(self).__name__}.training_step made no accelerator.backward() call, so SAM could not run: "
                "a training_step override must call super().training_step() or self.accelerator.backward()."
            )
        self.sam_micro_batches_run += 1
        if choose:
            self.sam_xsam_alpha = engine.xsam_alpha
            self._sam_xsam_epoch = self._sam_epoch_index()
        self._sam_metrics.record(
            engine, micro.clean, micro.perturbed, micro.pass_losses, self._loss_scale(), self.state.global_step
        )
        return loss

    # ---------------------------------------------------------------------- XSAM
    def _sam_epoch_index(self) -> int:
        return math.floor((self.state.epoch or 0.0) + 1e-9)

    def _sam_choose_xsam_alpha_now(self) -> bool:
        """XSAM's dynamic alpha is chosen at the first optimizer step of every epoch."""
        config = self.sam_config
        if config.descent != "xsam" or config.xsam_alpha is not None:
            return False
        return self._sam_xsam_epoch != self._sam_epoch_index()

    @torch.no_grad()
    def _sam_probe_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """The training loss at the current weights, forward only (BatchNorm frozen by the caller)."""
        prepared = self._prepare_inputs(dict(inputs))
        with self.compute_loss_context_manager():
            return self.compute_loss(model, dict(prepared), num_items_in_batch=num_items_in_batch).detach()

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.sam_config.descent == "xsam" and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            state = {"xsam_alpha": self.sam_xsam_alpha, "xsam_epoch": self._sam_xsam_epoch}
            with open(os.path.join(folder, SAM_STATE_FILE), "w") as f:
                json.dump(state, f)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # called when training resumes from ``checkpoint``: restore the chosen alpha with the RNG states
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint, SAM_STATE_FILE) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            self.sam_xsam_alpha, self._sam_xsam_epoch = state["xsam_alpha"], state["xsam_epoch"]

    # ------------------------------------------------------------------- logging
    def _loss_scale(self) -> torch.Tensor | None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)  # a device tensor: reading it does not sync

    def sam_log_metrics(self) -> dict[str, float]:
        """The sam/* metrics averaged since the last call (and reset)."""
        if self._lookbehind is not None:
            alphas = self._lookbehind.last_alphas
            return {"sam/lookbehind_alpha": float(torch.stack(alphas).mean())} if alphas else {}
        if self._sam_engine is not None:  # the logs are read back here anyway: review the norms' precision too
            self._sam_engine.review_norm_precision()
        return self._sam_metrics.read(self.state.global_step, self.accelerator)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Training logs (they carry "loss") get the sam/* metrics; evaluation logs do not.
        if "loss" in logs and self.sam_config.ascent_steps >= 1:
            logs.update(self.sam_log_metrics())
        super().log(logs, *args, **kwargs)


class SAMTrainer(SAMMixin, Trainer):
    """A ``transformers.Trainer`` that trains with multi-step Sharpness-Aware Minimization.

    The SAM knobs come from :class:`SAMTrainingArguments` (``sam_*`` fields) or, with plain
    ``TrainingArguments``, from ``sam_config``. With ``ascent_steps=0`` it is the stock Trainer.
    """


class SAMSeq2SeqTrainer(SAMMixin, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with multi-step SAM (use :class:`SAMSeq2SeqTrainingArguments`)."""


__all__ = ["SAMMixin", "SAMSeq2SeqTrainer", "SAMTrainer", "frozen_batchnorm_stats"]
