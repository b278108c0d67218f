"""Set-ups SAM cannot train correctly, refused before training with a message saying why."""

from __future__ import annotations

import torch
from torch import nn

_FULL_PRECISION = (torch.float32, torch.float64)


def check_launch(trainer) -> None:
    """DeepSpeed, FSDP and DataParallel: refuse with the reason and what to use instead."""
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "SAMTrainer does not support DeepSpeed: its engine steps the optimizer inside "
            "backward() and ZeRO-2/3 cannot skip gradient syncs, so the ascent passes would "
            "update and all-reduce the weights. Use DDP (accelerate launch --multi_gpu) or "
            "sam_ascent_steps=0."
        )
    if trainer.is_fsdp_enabled:
        raise ValueError(
            "SAMTrainer does not support FSDP yet: the ascent norms would be computed per "
            "shard instead of over the whole model. Use DDP or sam_ascent_steps=0."
        )
    if trainer.args.n_gpu > 1:
        raise ValueError(
            f"SAMTrainer does not support torch.nn.DataParallel ({trainer.args.n_gpu} GPUs in one "
            "process): the ascent needs each pass's gradients in one place. Launch one process "
            "per GPU with `accelerate launch --multi_gpu` (DDP) instead, or set "
            "CUDA_VISIBLE_DEVICES to one GPU."
        )


def low_precision_trainable(model: nn.Module) -> list[tuple[str, torch.dtype]]:
    """The trainable floating-point parameters stored in fewer than 32 bits, by name."""
    return [
        (name, p.dtype)
        for name, p in model.named_parameters()
        if p.requires_grad and p.is_floating_point() and p.dtype not in _FULL_PRECISION
    ]


def check_trainable_dtypes(model: nn.Module) -> None:
    """Trainable weights must be fp32/fp64; frozen ones (a bf16 or quantized base) may be anything."""
    low = low_precision_trainable(model)
    if not low:
        return
    shown = ", ".join(f"{name} ({str(dtype).removeprefix('torch.')})" for name, dtype in low[:5])
    more = f" and {len(low) - 5} more" if len(low) > 5 else ""
    raise ValueError(
        f"SAMTrainer needs trainable weights in float32; these are 16-bit: {shown}{more}. A perturbation "
        "of size rho/sqrt(n) per weight mostly rounds away in 16-bit weights. Load the model in float32, or "
        "keep a 16-bit frozen base and cast only the trainable tensors with "
        "`hf_sam.upcast_trainable_parameters(model)` (PEFT's `modules_to_save` copies keep the base's dtype); "
        "then train with bf16=True or fp16=True for mixed precision."
    )


def upcast_trainable_parameters(model: nn.Module) -> list[str]:
    """Cast every trainable 16-bit floating-point parameter to float32 in place, before training.

    Frozen parameters (a bf16 or quantized base) are left as they are. Returns the names cast.
    """
    cast = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype not in _FULL_PRECISION:
            p.data = p.data.float()  # before any optimizer exists, as nn.Module.float() does
            cast.append(name)
    return cast
