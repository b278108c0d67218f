"""Set-ups SAM cannot train correctly, refused before training with a message saying why."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_FULL_PRECISION = (torch.float32, torch.float64)


def check_launch(trainer) -> None:
    """DeepSpeed and FSDP2 without a synchronized ascent, FSDP1, DataParallel, and what DeepSpeed cannot make
    exact yet, optimizers that step inside backward: refuse with the reason and what to use instead."""
    check_optim_name(getattr(trainer.args, "optim", None))  # (sam_config beside plain TrainingArguments)
    if trainer.is_deepspeed_enabled:
        from .deepspeed import check_deepspeed

        check_deepspeed(trainer)
    check_xsam(trainer)
    check_family(trainer)
    perturbed_weights_mode(trainer)
    if trainer.is_fsdp_enabled:
        check_fsdp(trainer)
    elif trainer.args.fsdp:
        logger.warning(
            "--fsdp is set but FSDP is not active: accelerate enables FSDP only on accelerator devices, so "
            "this run trains %s.",
            "with DDP" if trainer.args.world_size > 1 else "in one process without sharding",
        )
    if trainer.args.n_gpu > 1:
        raise ValueError(
            f"SAMTrainer does not support torch.nn.DataParallel ({trainer.args.n_gpu} GPUs in one "
            "process): the ascent needs each pass's gradients in one place. Launch one process "
            "per GPU with `accelerate launch --multi_gpu` (DDP) instead, or set "
            "CUDA_VISIBLE_DEVICES to one GPU."
        )


_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def perturbed_weights_mode(trainer) -> str:
    """The engine's ``perturbed_weights`` for this launch: "auto" becomes "copy" where the launch, not the
    parameters, says their storage must stay put; an explicit "swap" there is refused."""
    mode = trainer.sam_config.perturbed_weights
    args = trainer.args  # (tests may pass a bare namespace)
    reason = None
    if trainer.is_deepspeed_enabled:
        reason = "DeepSpeed gathers and partitions p.data itself"
    elif getattr(args, "torch_compile", False) and getattr(args, "torch_compile_mode", None) in _CUDA_GRAPH_MODES:
        reason = f"torch_compile_mode={args.torch_compile_mode!r} records the parameters' addresses in CUDA graphs"
    if reason and mode == "swap":
        raise ValueError(f"sam_perturbed_weights='swap' cannot be used here: {reason}; use 'copy' or 'auto'.")
    return "copy" if reason else mode


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


def check_xsam(trainer) -> None:
    """XSAM's combination needs one d_k and one g_k on every rank: a synchronized ascent and no
    accumulation (the gradients of earlier micro-batches are set aside during the descent backward,
    so DDP would not all-reduce them)."""
    if trainer.sam_config.descent != "xsam" or trainer.args.world_size <= 1:
        return
    if not trainer.sam_config.sync_ascent or trainer.args.gradient_accumulation_steps > 1:
        raise ValueError(
            "sam_descent='xsam' with several processes needs --sam_sync_ascent true and gradient_accumulation_steps=1: "
            "every rank must combine the same perturbation d_k with the same all-reduced gradient g_k."
        )


def _uses_clean_gradient(config) -> tuple[str, str] | None:
    """The flag and value of a method that combines the clean gradient g with later ones, if any."""
    if config.descent in ("gsam", "wsam"):
        return "sam_descent", config.descent
    if config.direction == "friendly":
        return "sam_direction", "friendly"
    if config.every_n_steps > 1 and config.reuse_alpha > 0:
        return "sam_reuse_alpha", str(config.reuse_alpha)
    return None


def check_family(trainer) -> None:
    """GSAM, WSAM, F-SAM and LookSAM's reuse combine the clean gradient g with g_s (or keep it across
    steps): under several processes both must be the all-ranks gradients. (Under fp16 the state kept across
    steps is held unscaled: the engine's ``grad_scale``.)"""
    config, args = trainer.sam_config, trainer.args
    flag = _uses_clean_gradient(config)
    if flag is not None and getattr(args, "world_size", 1) > 1:
        name, value = flag
        if not config.sync_ascent:
            raise ValueError(
                f"{name}={value} with several processes needs --sam_sync_ascent true: without it the clean "
                "gradient g is each rank's own while g_s is all-reduced, and the method would combine the two."
            )
        if args.gradient_accumulation_steps > 1:
            raise ValueError(
                f"{name}={value} with several processes does not support gradient accumulation: the gradients of "
                "non-final micro-batches are not all-reduced, so ranks would combine different g and g_s."
            )


def check_fsdp(trainer) -> None:
    """FSDP2 works with a synchronized ascent (with gradient accumulation too: hf_sam.trainer.launch); FSDP1
    does not."""
    version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(
            "SAMTrainer supports FSDP version 2 only (fully_shard, the default of transformers 5): set "
            "fsdp_config={'version': 2} or fsdp_version: 2 in the accelerate config."
        )
    if not trainer.sam_config.sync_ascent and trainer.sam_config.method != "msam":  # MSAM: no ascent pass
        raise ValueError(
            "SAMTrainer under FSDP needs --sam_sync_ascent true: FSDP2 leaves no per-device gradient after a "
            "backward without gradient sync, so every ascent gradient is the all-ranks gradient (one "
            "perturbation for all ranks, as --sam_sync_ascent gives under DDP)."
        )


def steps_in_backward(optim: object) -> bool:
    """Whether a TrainingArguments ``optim`` value names an optimizer that steps inside backward (LOMO, AdaLomo,
    and the layer-wise GaLore and APOLLO variants: a hook updates each parameter as its gradient arrives)."""
    name = str(getattr(optim, "value", optim))
    return name in ("lomo", "adalomo") or name.endswith("_layerwise")


def check_optim_name(optim: object) -> None:
    """Refuse a TrainingArguments ``optim`` value that names an optimizer stepping inside backward."""
    if steps_in_backward(optim):
        raise ValueError(in_backward_refusal(f"optim={getattr(optim, 'value', optim)!r}"))


def in_backward_refusal(what: str) -> str:
    """Why SAM cannot train with an optimizer that steps inside backward; ``what`` names it (the ``optim`` value)."""
    return (
        f"{what} steps the optimizer inside backward (a gradient hook updates each "
        "parameter as its gradient arrives), so SAM's ascent passes would move the weights with gradients taken "
        "at perturbed points, and the descent gradient would never reach one optimizer step. SAM needs the k + 1 "
        "passes of a micro-batch to run before optimizer.step(): use an optimizer that steps there (adamw_torch, "
        "adafactor, galore_adamw without _layerwise, ...), or set sam_ascent_steps=0."
    )


def _holds_optimizer(hook: object) -> bool:
    """A gradient hook that is an optimizer's method, or that closes over an optimizer (or a dict or list of
    them, as the layer-wise pattern keeps one per parameter)."""
    if isinstance(getattr(hook, "__self__", None), torch.optim.Optimizer):
        return True
    hook = getattr(hook, "func", hook)  # functools.partial
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, torch.optim.Optimizer) for v in values):
            return True
    return False


def check_optimizer_steps_outside_backward(optimizer: object, model: nn.Module) -> None:
    """Refuse, before the first pass, an optimizer that steps inside backward: by its type (transformers'
    layer-wise stand-in, LOMO's), or by the kind of gradient hook it left on a trainable parameter (one that
    is an optimizer's method or holds optimizers: a user's own optimizer-in-backward)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    kind = type(inner)
    if kind.__name__ == "LayerWiseDummyOptimizer" or kind.__module__.split(".")[0] == "lomo_optim":
        raise ValueError(in_backward_refusal(f"The optimizer {kind.__module__}.{kind.__name__}"))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hooks = [*(getattr(p, "_post_accumulate_grad_hooks", None) or {}).values()]
        hooks += [*(getattr(p, "_backward_hooks", None) or {}).values()]
        for hook in hooks:
            if _holds_optimizer(hook):
                raise ValueError(
                    in_backward_refusal(
                        f"The gradient hook {getattr(hook, '__qualname__', hook)!r} on the trainable parameter {name}"
                    )
                )
