"""SAMMixin: multi-step SAM for any ``transformers.Trainer`` subclass; SAMTrainer and friends.

The Trainer keeps the optimizer, clipping, the scheduler, zeroing and checkpoints. The mixin
only runs the ascent and descent passes inside each micro-batch's ``training_step`` (see
:mod:`hf_sam.trainer.micro_batch`) and adds the ``sam/*`` metrics to the training logs.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback

from ..config import SAMConfig
from ..engine.ascent import MultiStepAscent, scaled_loss
from ..engine.descents.xsam import alpha_grid
from . import compat
from .args import SAMArgumentsMixin
from .checks import check_launch, check_optimizer_steps_outside_backward, check_trainable_dtypes, perturbed_weights_mode
from .gradient_backend import AutogradBackend, GradientBackend
from .launch import GradientSync
from .lookbehind import LookbehindStep
from .micro_batch import RandomState, SAMMicroBatch, frozen_batchnorm_stats, rolled_back
from .model_card import add_sam_to_card
from .msam import MomentumSAMStep, momentum_key
from .precision import FidelityLog, loss_scale
from .rho_schedule import LearningRateRho
from .run_state import SAMRun
from .sam_state import load_sam_state, save_sam_state
from .step_metrics import SAMStepMetrics


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


class _AfterOptimizerStep(TrainerCallback):
    """Right after ``optimizer.step()``, before the scheduler steps: WSAM's decoupled sharpness term."""

    def __init__(self, trainer: SAMMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        engine = self.trainer.sam_run.engine
        if engine is not None:
            # accelerate's wrapper knows whether its GradScaler skipped the step (it has read the scale already)
            skipped = bool(getattr(self.trainer.optimizer, "step_was_skipped", False))
            engine.after_optimizer_step(self.trainer.optimizer, skipped)


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
        self._sam_new_run()  # what one train() owns (hf_sam.trainer.run_state)
        self._sam_metrics = SAMStepMetrics(sam_config.diagnostics)
        self.sam_micro_batches_run = 0
        # XSAM's dynamic alpha and the epoch it was chosen in (saved with checkpoints)
        self.sam_xsam_alpha: float | None = sam_config.xsam_alpha
        self._sam_xsam_epoch: int | None = None
        self._lookbehind: LookbehindStep | None = None
        self._msam: MomentumSAMStep | None = MomentumSAMStep(self) if sam_config.method == "msam" else None
        self._sam_fidelity = FidelityLog()  # sam/perturbation_fidelity
        if sam_config.ascent_steps >= 1:
            self.add_callback(_EverySAMStepRan(self))
            self.add_callback(_AfterOptimizerStep(self))
            check_launch(self)
            if self.model is not None:
                check_trainable_dtypes(self.model)
        if sam_config.method == "lookbehind":
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
        self._sam_new_run()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._sam_new_run()

    def _sam_new_run(self) -> None:
        """A new run's state, with nothing of an earlier run's (its engine, LookSAM's g_v in it, the rho schedule's
        bounds): a resumed run reads them back from its checkpoint."""
        config = self.sam_config
        schedule = LearningRateRho(config.rho, config.rho_min) if config.rho_schedule == "lr" else None
        self.sam_run = SAMRun(rho_schedule=schedule)

    def _sam_bind(self, model: nn.Module) -> MultiStepAscent:
        """The engine for the model being trained (the one training_step receives)."""
        if self.sam_run.engine is None or self.sam_run.bound_to is not model:
            check_trainable_dtypes(model)
            kwargs = {**self.sam_config.engine_kwargs(), "perturbed_weights": perturbed_weights_mode(self)}
            params, placement = list(model.parameters()), {}
            if self.is_deepspeed_enabled:  # this rank's parts of ZeRO's partitions (hf_sam.trainer.deepspeed)
                from .deepspeed import sam_engine_tensors

                params, placement = sam_engine_tensors(self, model)
            self.sam_run.engine = MultiStepAscent(params, **kwargs, **placement)
            self._sam_load_pending_state(self.sam_run.engine)
            self.sam_run.bound_to = model
            self.sam_run.batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return self.sam_run.engine

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
        if not compat.loss_is_scaled_for_ga(self, num_items_in_batch):
            loss = loss / compat.accumulation_steps(self)
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

        Where the passes run: this method ends in the Trainer's own ``training_step`` (so a subclass's
        ``compute_loss`` and contexts, TRL's included, apply), inside ``micro.driving(accelerator)``, which
        takes over that step's one ``accelerator.backward(loss)`` call: the clean pass's backward, then the
        other k passes, then the descent (``SAMMicroBatch._run`` in :mod:`hf_sam.trainer.micro_batch`).
        """
        if self.sam_config.ascent_steps == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        if not self.sam_run.optimizer_checked:  # before any pass: an in-backward step would move the weights first
            check_optimizer_steps_outside_backward(self.optimizer, model)
            self.sam_run.optimizer_checked = True
        stock = lambda: super(SAMMixin, self).training_step(model, inputs, num_items_in_batch)  # noqa: E731
        if self.is_deepspeed_enabled:
            from .deepspeed import stock_pass

            stock = stock_pass(self, stock)
        if self.state.global_step < self.sam_config.first_sam_step(self.state.max_steps):  # SAM late in training
            self._sam_micro_batch_done(1)
            return stock()
        rho = self._sam_current_rho()
        if self._lookbehind is not None:  # another method, its own step (hf_sam.trainer.lookbehind)
            self._sam_micro_batch_done(self.sam_config.ascent_steps + 1)
            self._lookbehind.rho = rho
            return self._lookbehind.run(model, self._prepare_inputs(inputs), num_items_in_batch)
        if self._msam is not None:  # one pass at w - rho v/||v|| (hf_sam.trainer.msam)
            self._sam_micro_batch_done(1)
            self._msam.rho = rho
            loss = self._msam.run(model, stock)
            if self._msam.perturbation is not None:
                norm = self._msam.perturbation.perturbation_norm
                self._sam_metrics.add({"sam/perturbation_norm": norm}, self.state.global_step)
            return loss
        engine = self._sam_bind(model)
        engine.grad_scale = self._loss_scale()
        if self.sam_run.rho_schedule is not None:
            engine.set_rho(rho)
        if self.state.global_step % self.sam_config.every_n_steps:  # SAM every n steps: one pass between
            self._sam_micro_batch_done(1)
            loss = stock()
            if self.accelerator.sync_gradients:  # the step's last micro-batch: LookSAM adds its reused term
                engine.one_pass_step()
            return loss
        inputs = self.sam_shared_inputs(model, inputs)
        extra_inputs = dict(inputs)  # before the clean pass can change the dict it is given
        config = self.sam_config
        choose = self._sam_choose_xsam_alpha_now()
        if self.sam_xsam_alpha is not None:
            engine.xsam_alpha = self.sam_xsam_alpha
        micro = SAMMicroBatch(
            engine=engine,
            sync=GradientSync(model, config.sync_ascent),
            batchnorms=self.sam_run.batchnorms,
            run_pass=lambda batch, factor, backward: self._sam_pass(model, batch, num_items_in_batch, factor, backward),
            inputs=extra_inputs,
            side_effects=lambda: rolled_back(self, self.sam_rollback_attributes),
            rng=RandomState(engine.params[0].device) if config.replay_rng else None,
            loss_at=(lambda: self._sam_loss_at(model, extra_inputs, num_items_in_batch)) if choose else None,
            alphas=alpha_grid(config.xsam_alpha_max) if choose else None,
            backend=self._sam_backend(engine),
            at_perturbed=self._sam_fidelity.probe(self, model, engine),
        )
        try:
            # SAM takes over here: the stock step's accelerator.backward(loss) runs all k + 1 passes (see the docstring)
            with self.sam_step_context(), micro.driving(self.accelerator):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            micro.backend.restore(engine)
        if not micro.ran:
            raise RuntimeError(
                f"{type(self).__name__}.training_step made no accelerator.backward() call, so SAM could not run: "
                "a training_step override must call super().training_step() or self.accelerator.backward()."
            )
        self._sam_micro_batch_done(self.sam_config.ascent_steps + 1, len(micro.alphas or ()))
        if choose:
            self.sam_xsam_alpha = engine.xsam_alpha
            self._sam_xsam_epoch = self._sam_epoch_index()
        self._sam_metrics.record(
            engine,
            micro.clean,
            micro.perturbed,
            micro.pass_losses,
            self._loss_scale(),
            self.state.global_step,
            micro.measured,
        )
        return loss

    def floating_point_ops(self, inputs: dict[str, Any]) -> float:
        """The stock count of one forward+backward pass (called right after each micro-batch's
        ``training_step``), times the passes SAM made in that micro-batch: ``total_flos`` counts SAM's compute."""
        return super().floating_point_ops(inputs) * self.sam_run.flops_factor

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The base class's card, with SAM's method, papers and settings in its hyperparameters."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            add_sam_to_card(os.path.join(self.args.output_dir, "README.md"), self.sam_config)

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
    def _sam_loss_at(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """The training loss at the current weights, forward only (BatchNorm frozen by the caller)."""
        prepared = self._prepare_inputs(dict(inputs))
        with self.compute_loss_context_manager():
            return self.compute_loss(model, dict(prepared), num_items_in_batch=num_items_in_batch).detach()

    def _sam_backend(self, engine: MultiStepAscent) -> GradientBackend:
        """Where the passes' gradients are: autograd's p.grad, or DeepSpeed's partitions."""
        if not self.is_deepspeed_enabled:
            return AutogradBackend()
        from .deepspeed import deepspeed_backend

        return deepspeed_backend(self, engine)

    # --------------------------------------------------------- state across steps
    def _sam_micro_batch_done(self, passes: int, forwards: int = 0) -> None:
        """The micro-batch made ``passes`` forward+backward passes and ``forwards`` forward-only ones."""
        self.sam_micro_batches_run += 1
        # a forward is 2 of the 6 FLOPs per parameter and token a forward+backward costs
        self.sam_run.flops_factor = passes + forwards / 3
        self._sam_metrics.count_passes(passes, self.state.global_step)

    def _sam_current_rho(self) -> float:
        """rho for this step: constant, or from the learning rate (sam_rho_schedule="lr")."""
        schedule = self.sam_run.rho_schedule
        if schedule is None:
            return self.sam_config.rho
        lr = self.optimizer.param_groups[0]["lr"]
        return schedule.at(lr, self.lr_scheduler, self.state.max_steps)

    def _sam_load_pending_state(self, engine: MultiStepAscent) -> None:
        """State read from a checkpoint before the engine existed (F-SAM's m, LookSAM's g_v)."""
        pending, self.sam_run.pending_state = self.sam_run.pending_state, None
        if not pending:
            return
        if "engine" in pending:  # LookSAM's memory is the engine's descent: its g_v comes back through here too
            engine.load_state_dict(pending["engine"])

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = super().create_optimizer(*args, **kwargs)
        if self._msam is not None:
            momentum_key(optimizer)  # MSAM without a momentum: refused before any step
        return optimizer

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.sam_config.ascent_steps >= 1:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            save_sam_state(self, folder)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # called when training resumes from ``checkpoint``: restore SAM's state with the RNG states
        super()._load_rng_state(checkpoint)
        load_sam_state(self, checkpoint)

    # ------------------------------------------------------------------- logging
    def _loss_scale(self) -> torch.Tensor | None:
        return loss_scale(self)

    def sam_log_metrics(self) -> dict[str, float]:
        """The sam/* metrics averaged since the last call (and reset)."""
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
