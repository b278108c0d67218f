"""Every launch check: set-ups SAM cannot train correctly (the variants' declared refusals, DeepSpeed, FSDP2,
DataParallel, dtypes, optimizers that step inside backward), refused before training with a message saying why."""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from ..engine.variants import Refusal, Variant, is_builtin
from .deepspeed import check_precision, map_bf16_onto_autocast

logger = logging.getLogger(__name__)

_FULL_PRECISION = (torch.float32, torch.float64)


def check_launch(trainer) -> None:
    """DeepSpeed and FSDP2 without a synchronized ascent, FSDP1, DataParallel, and what DeepSpeed cannot make
    exact yet, optimizers that step inside backward: refuse with the reason and what to use instead."""
    check_optim_name(getattr(trainer.args, "optim", None))  # (sam_config beside plain TrainingArguments)
    if trainer.is_deepspeed_enabled:
        check_deepspeed(trainer)
    check_variants(trainer)
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


def check_deepspeed(trainer: Any) -> None:
    """What SAM under DeepSpeed can make exact; the rest refused before training, naming the flag."""
    config = trainer.sam_config
    ds_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    if not config.sync_ascent:
        raise ValueError(
            "SAMTrainer under DeepSpeed needs --sam_sync_ascent true: ZeRO reduces every backward's gradient over "
            "all ranks (it cannot skip the sync), so the ascent is the all-ranks gradient, one perturbation for "
            "all ranks, as --sam_sync_ascent gives under DDP."
        )
    map_bf16_onto_autocast(trainer)
    check_precision(trainer)
    zero = ds_config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", None):
            raise ValueError(f"SAMTrainer under DeepSpeed does not support ZeRO's {key} (not proven exact).")
    # the engine works on each rank's part of the all-ranks gradients and weights and sums every norm and dot
    # product over the ranks, so the variants run as in one process, except where their declaration refuses
    # DeepSpeed (checks.check_variants, run by check_launch after this)


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


def chosen_variants(config) -> list[tuple[str, Variant, object]]:
    """(kind, variant, options) of each variant the config chooses that takes part in its steps."""
    return [(kind, config.variant(kind), config.variant_options(kind)) for kind in config.active_kinds()]


def _flag(kind: str, variant: Variant, options: object) -> str:
    """``sam_<kind>='<name>'``, with the options set off their defaults (the ones a refusal may hinge on)."""
    if not is_builtin(variant) or options is None:
        return f"sam_{kind}={variant.name!r}"
    changed = [f"sam_{f.name}={getattr(options, f.name)!r}" for f in fields(options)
               if getattr(options, f.name) != f.default]  # fmt: skip
    return f"sam_{kind}={variant.name!r}" + (f" with {', '.join(changed)}" if changed else "")


def check_variants(trainer) -> None:
    """Each chosen variant's declared refusals (hf_sam.engine.variants): several processes without a synchronized
    ascent, gradient accumulation on several processes, DeepSpeed, ..."""
    config, args = trainer.sam_config, trainer.args
    several = getattr(args, "world_size", 1) > 1
    accumulation = args.gradient_accumulation_steps > 1
    settings = {
        "several processes without sam_sync_ascent": several and not config.sync_ascent,
        "gradient accumulation on several processes": several and accumulation,
        "DeepSpeed": bool(getattr(trainer, "is_deepspeed_enabled", False)),
        "several processes": several,
        "gradient accumulation": accumulation,
        "fp16": bool(getattr(args, "fp16", False)),
    }
    refusals = [(_flag(kind, variant, options), r) for kind, variant, options in chosen_variants(config)
                for r in variant.refusals if r.applies(options)]  # fmt: skip
    for flag, refusal in refusals:
        if settings[refusal.where]:
            raise ValueError(_refusal_message(flag, refusal))


def _refusal_message(flag: str, refusal: Refusal) -> str:
    if refusal.where == "several processes without sam_sync_ascent":
        return f"{flag} with several processes needs --sam_sync_ascent true: {refusal.why}."
    if refusal.where == "gradient accumulation on several processes":
        return f"{flag} with several processes does not support gradient accumulation: {refusal.why}."
    if refusal.where == "DeepSpeed":
        return f"{flag} is not supported under DeepSpeed: {refusal.why}."
    return f"{flag} does not support {refusal.where}: {refusal.why}."


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
