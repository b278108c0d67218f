"""SAMTrainer: the Trainer glue around the ascent engine.

The Trainer keeps the optimizer, clipping, the scheduler and zeroing; SAMTrainer only
overrides ``training_step`` to run the k ascent passes before the descent pass, and ``log``
to add the ``sam/*`` metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .args import SAMTrainingArguments
from .ascent import MultiStepAscent
from .config import SAMConfig

logger = logging.getLogger(__name__)

_CORE_METRICS = ("sam/grad_norm", "sam/loss_clean", "sam/loss_perturbed", "sam/perturbation_norm")


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: list[nn.Module]) -> Iterator[None]:
    """Run forward passes that use batch statistics but leave running statistics untouched.

    With ``track_running_stats=False`` a training-mode BatchNorm normalizes with the batch
    statistics exactly as before but neither updates running_mean/var nor counts the batch.
    """
    changed = [m for m in modules if m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def _forced_ddp_sync(model: nn.Module) -> Iterator[None]:
    """Re-enable DDP's all-reduce even inside the Trainer's no_sync (for ``sync_ascent``)."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps DDP
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        yield
        return
    previous = ddp.require_backward_grad_sync
    ddp.require_backward_grad_sync = True
    try:
        yield
    finally:
        ddp.require_backward_grad_sync = previous


def _unscaled(norm: float, loss_scale: torch.Tensor | None) -> float | torch.Tensor:
    """A gradient norm of loss-scaled (fp16) gradients, unscaled for the logs without a host sync."""
    return norm if loss_scale is None else norm / loss_scale.double()


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with multi-step Sharpness-Aware Minimization.

    The SAM knobs come from :class:`SAMTrainingArguments` (``sam_*`` fields) or, with plain
    ``TrainingArguments``, from ``sam_config``. With ``ascent_steps=0`` it is the stock Trainer.
    """

    def __init__(self, *args: Any, sam_config: SAMConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if sam_config is None:
            sam_config = self.args.sam_config if isinstance(self.args, SAMTrainingArguments) else SAMConfig()
        sam_config.validate()
        self.sam_config = sam_config
        self._sam_engine: MultiStepAscent | None = None
        self._sam_bn_modules = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._reset_sam_metrics()
        self.sam_skipped_ascents = 0  # totals over the whole run
        self.sam_zero_gradient_ascents = 0
        if sam_config.ascent_steps >= 1:
            self._check_supported()

    # ------------------------------------------------------------------ set-up checks
    def _check_supported(self) -> None:
        if self.is_deepspeed_enabled:
            raise ValueError(
                "SAMTrainer does not support DeepSpeed: its engine steps the optimizer inside "
                "backward() and ZeRO-2/3 cannot skip gradient syncs, so the ascent passes would "
                "update and all-reduce the weights. Use DDP (accelerate launch --multi_gpu) or "
                "sam_ascent_steps=0."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "SAMTrainer does not support FSDP yet: the ascent norms would be computed per "
                "shard instead of over the whole model. Use DDP or sam_ascent_steps=0."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"SAMTrainer does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one "
                "process): the ascent needs each pass's gradients in one place. Launch one process "
                "per GPU with `accelerate launch --multi_gpu` (DDP) instead, or set "
                "CUDA_VISIBLE_DEVICES to one GPU."
            )
        low = sorted(
            {str(p.dtype) for p in self.model.parameters() if p.requires_grad}
            - {str(torch.float32), str(torch.float64)}
        )
        if low:
            raise ValueError(
                f"SAMTrainer needs trainable weights in float32 (found {', '.join(low)}): a "
                "perturbation of size rho/sqrt(n) per weight mostly rounds away in 16-bit weights. "
                "Load the model in float32 and use bf16=True or fp16=True for mixed precision."
            )

    # --------------------------------------------------------------------- the step
    def _engine(self) -> MultiStepAscent:
        if self._sam_engine is None:
            self._sam_engine = MultiStepAscent(self.model.parameters(), **self.sam_config.engine_kwargs())
        return self._sam_engine

    def _ascent_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        if self.sam_config.sync_ascent:
            return _forced_ddp_sync(model)
        # Per-device perturbation (m-sharpness): no all-reduce during the ascent, forward included.
        return self.accelerator.no_sync(model)

    def _forward_backward(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any, factor: float = 1.0
    ) -> torch.Tensor:
        """One forward+backward pass as the stock training_step does it; returns the scaled loss."""
        with self.compute_loss_context_manager():
            # compute_loss may pop labels: every pass gets its own shallow copy of the inputs
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
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
        self.accelerator.backward(loss * factor if factor != 1.0 else loss)
        return loss.detach()

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """k ascent passes, then the descent pass at w + d_k; weights restored on return.

        The descent gradient is added to p.grad like the stock step; the returned loss is the
        clean loss at w (what the stock Trainer would report for this batch).
        """
        k = self.sam_config.ascent_steps
        if k == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            engine = self._engine()
            engine.begin()
            try:
                clean = None
                pass_losses = []  # L at w + d_0 .. w + d_k, for the diagnostics
                for i in range(k):
                    # only the first (clean) pass may update BatchNorm running statistics
                    freeze = frozen_batchnorm_stats(self._sam_bn_modules) if i else contextlib.nullcontext()
                    with self._ascent_context(model), freeze:
                        loss = self._forward_backward(model, inputs, num_items_in_batch)
                    if clean is None:
                        clean = loss
                    pass_losses.append(loss)
                    if not engine.ascend():
                        break
                factor = engine.begin_descent()
                with frozen_batchnorm_stats(self._sam_bn_modules):
                    perturbed = self._forward_backward(model, inputs, num_items_in_batch, factor)
                engine.end_descent()
            finally:
                engine.restore()
        self._record_sam_step(engine, clean, perturbed, pass_losses)
        return clean

    # ------------------------------------------------------------------- logging
    def _reset_sam_metrics(self) -> None:
        self._sam_sums: dict[str, torch.Tensor | float] = {}
        self._sam_counts: dict[str, int] = {}
        self._sam_micro_batches = 0
        self._sam_last_logged_step = getattr(getattr(self, "state", None), "global_step", 0)

    def _loss_scale(self) -> torch.Tensor | None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)  # a device tensor: reading it does not sync

    def _record_sam_step(
        self, engine: MultiStepAscent, clean: torch.Tensor, perturbed: torch.Tensor, pass_losses: list[torch.Tensor]
    ) -> None:
        sums = self._sam_sums
        scale = self._loss_scale()
        values = {
            "sam/loss_clean": clean.double(),
            "sam/loss_perturbed": perturbed.double(),
            "sam/grad_norm": _unscaled(engine.grad_norms[0] if engine.grad_norms else 0.0, scale),
            "sam/perturbation_norm": engine.perturbation_norm.to(clean.device)
            if engine.perturbation_norm is not None
            else 0.0,
        }
        if self.sam_config.diagnostics:
            values.update(self._diagnostic_values(engine, perturbed, pass_losses, scale))
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
            self._sam_counts[key] = self._sam_counts.get(key, 0) + 1
        self._sam_micro_batches += 1
        self.sam_skipped_ascents += int(engine.skipped)
        self.sam_zero_gradient_ascents += int(engine.zero_gradient and not engine.moved)
        if engine.skipped:
            logger.warning(
                "SAM ascent skipped at step %d: non-finite gradient norm; descending at the unperturbed weights.",
                self.state.global_step,
            )

    def _diagnostic_values(
        self, engine: MultiStepAscent, perturbed: torch.Tensor, pass_losses: list[torch.Tensor], scale
    ) -> dict[str, object]:
        """Loss at each ascent point d_i, gradient norm at each step, and the direction cosines."""
        values: dict[str, object] = {}
        # losses[i] = L(w + d_i); a step whose ascent stopped early has fewer points
        for i, loss in enumerate([*pass_losses[1:], perturbed] if engine.moved else []):
            values[f"sam/ascent_loss_{i + 1}"] = loss.double()
        values["sam/ascent_loss_0"] = pass_losses[0].double()
        for i, norm in enumerate(engine.grad_norms):
            values[f"sam/ascent_grad_norm_{i + 1}"] = _unscaled(norm, scale)
        if engine.successive_cosines:
            values["sam/cos_successive"] = torch.stack(engine.successive_cosines).mean()
        if engine.descent_cosine is not None:
            values["sam/cos_first_descent"] = engine.descent_cosine
        return values

    def sam_log_metrics(self) -> dict[str, float]:
        """The sam/* metrics averaged since the last call (and reset)."""
        steps = max(self.state.global_step - self._sam_last_logged_step, 1)
        n = self._sam_micro_batches
        out: dict[str, float] = {}
        if n:
            # every rank has the core keys; the diagnostics may differ between ranks and stay local
            keys = sorted(self._sam_sums, key=lambda key: (key not in _CORE_METRICS, key))
            vec = torch.stack(
                [torch.as_tensor(self._sam_sums[key], dtype=torch.float64).reshape(()).cpu() for key in keys]
            )
            if self.accelerator.num_processes > 1:
                core = len(_CORE_METRICS)
                reduced = self.accelerator.reduce(vec[:core].to(self.accelerator.device), reduction="mean").cpu()
                vec = torch.cat([reduced, vec[core:]])
            for key, total in zip(keys, vec.tolist(), strict=True):
                if key.startswith(("sam/loss_", "sam/ascent_loss_")):
                    # losses as the Trainer reports "loss": summed over micro-batches, averaged over steps
                    out[key] = total / steps * n / self._sam_counts[key]
                else:
                    out[key] = total / self._sam_counts[key]
            out["sam/sharpness"] = out["sam/loss_perturbed"] - out["sam/loss_clean"]
        out["sam/skipped_ascents"] = float(self.sam_skipped_ascents)
        out["sam/zero_gradient_ascents"] = float(self.sam_zero_gradient_ascents)
        self._reset_sam_metrics()
        self._sam_last_logged_step = self.state.global_step
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Training logs (they carry "loss") get the sam/* metrics; evaluation logs do not.
        if "loss" in logs and self.sam_config.ascent_steps >= 1:
            logs.update(self.sam_log_metrics())
        super().log(logs, *args, **kwargs)


__all__ = ["SAMTrainer", "frozen_batchnorm_stats"]
