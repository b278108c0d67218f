"""The compute dtype a SAM step's forward passes run in, the loss scale its gradients carry, and
``sam/perturbation_fidelity``: what the lowered kernels see of the perturbation (:mod:`hf_sam.measures.fidelity`),
measured at logging steps only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.ascent import MultiStepAscent
from ..measures.fidelity import lowered_parameters, perturbation_fidelity

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def autocast_dtype(trainer: Any) -> torch.dtype | None:
    """bf16/fp16 when the forward runs under autocast (accelerate's native AMP, DeepSpeed's torch_autocast);
    None in fp32."""
    if trainer.is_deepspeed_enabled:
        section = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("torch_autocast", {})
        if section.get("enabled", False) in (True, "true"):
            return _DTYPES.get(str(section.get("dtype", "bfloat16")).replace("torch.", ""), torch.bfloat16)
        return None
    accelerator = trainer.accelerator
    if getattr(accelerator, "native_amp", False):
        return _DTYPES.get(str(accelerator.mixed_precision))
    return None


class FidelityProbe:
    """Measures the fidelity at the perturbed point of a step, over the lowered parameters the engine moves."""

    def __init__(
        self, model: nn.Module, engine: MultiStepAscent, dtype: torch.dtype, owners: list[nn.Parameter] | None = None
    ) -> None:
        """``owners``: the model parameter each engine tensor belongs to (under ZeRO, the rank's parts' own)."""
        lowered = {id(p) for p in lowered_parameters(model)}
        owners = engine.params if owners is None else owners
        self.indices = [j for j, p in enumerate(owners) if id(p) in lowered]
        self.dtype = dtype

    def __call__(self, engine: MultiStepAscent) -> dict[str, torch.Tensor]:
        if not self.indices:
            return {}
        weights, backup = engine.weights, engine.backup
        cosine, ratio = perturbation_fidelity(
            [weights[j] for j in self.indices], [backup[j] for j in self.indices], self.dtype
        )
        return {"sam/perturbation_fidelity": cosine, "sam/perturbation_fidelity_norm_ratio": ratio}


def loss_scale(trainer: Any) -> torch.Tensor | None:
    """The factor fp16 loss scaling puts on the gradients (accelerate's GradScaler, or DeepSpeed's under
    ``torch_autocast``), a device tensor read without a sync; None without loss scaling."""
    if trainer.is_deepspeed_enabled:
        from .deepspeed import deepspeed_scaler

        return scale_of(deepspeed_scaler(trainer), trainer.args.device)
    return scale_of(getattr(trainer.accelerator, "scaler", None), trainer.args.device)


def scale_of(scaler: Any, device: torch.device) -> torch.Tensor | None:
    """A GradScaler's current scale as a device tensor (no sync); None for no scaler or a disabled one."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # before the first backward the scaler has not made it yet: it will be the initial scale
        scale = torch.tensor(scaler.get_scale(), dtype=torch.float32, device=device)
    return scale


def logs_next_step(trainer: Any) -> bool:
    """Whether the optimizer step now running will be logged (every step unless logging by steps)."""
    args, state = trainer.args, trainer.state
    strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
    if strategy != "steps":
        return strategy != "no"
    every = int(getattr(state, "logging_steps", 0) or args.logging_steps or 0)
    upcoming = state.global_step + 1
    return (every > 0 and upcoming % every == 0) or (upcoming == 1 and bool(args.logging_first_step))


class FidelityLog:
    """Hands the SAM step a :class:`FidelityProbe` when ``sam/perturbation_fidelity`` is to be measured: with
    diagnostics, under autocast, on the steps that will be logged (its kernels run over every lowered weight);
    under ZeRO and FSDP2 over the rank's own partition or shards."""

    def __init__(self) -> None:
        self._probe: tuple[MultiStepAscent, FidelityProbe] | None = None

    def probe(self, trainer: Any, model: nn.Module, engine: MultiStepAscent) -> FidelityProbe | None:
        if not trainer.sam_config.diagnostics or not logs_next_step(trainer):
            return None
        dtype = autocast_dtype(trainer)
        if dtype is None:
            return None
        if self._probe is None or self._probe[0] is not engine:
            # under ZeRO the engine holds this rank's parts: measured over them, as over FSDP2's own shards
            parts = trainer.sam_run.zero_parts if trainer.is_deepspeed_enabled else None
            self._probe = (engine, FidelityProbe(model, engine, dtype, None if parts is None else parts.owners))
        return self._probe[1]
