"""Mixed precision for SAM under DeepSpeed: torch autocast over fp32 parameters, never bf16/fp16 storage.

DeepSpeed's ``bf16`` and ``fp16`` sections store the parameters the forward uses in 16 bits: a perturbation
of rho/sqrt(n) per weight is mostly rounded away there, and restoring w after the descent would not be exact.
Its ``torch_autocast`` section (DeepSpeed >= 0.17) keeps fp32 parameters and runs the forward under
``torch.autocast``, which is what ``--bf16`` means under DDP and FSDP2; SAM works on it unchanged.

Two differences from ``--bf16`` under DDP, both DeepSpeed's:
- gradients of the "lower precision safe" modules (Linear, Conv by default) are reduced over the ranks in
  the autocast dtype, not fp32; ``"lower_precision_safe_modules": []`` reduces every gradient in fp32, as DDP
  does;
- fp16 autocast scales the loss with a ``torch.amp.GradScaler`` inside DeepSpeed's optimizer: the gradients
  SAM reads carry its scale (the ascent's direction does not depend on it, as under DDP's fp16; the logs and
  the state kept across steps are unscaled with :func:`hf_sam.trainer.precision.loss_scale`); an overflow in an ascent
  drops that perturbation (the engine's guard), and DeepSpeed's scaler sees one in the descent (not tested
  under DeepSpeed).

``--bf16`` with a DeepSpeed config whose ``bf16.enabled`` is ``"auto"`` or absent is mapped onto
``torch_autocast`` (bf16, fp32 communication): the same numbers as DDP with ``--bf16``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

# what --bf16 becomes: DDP's meaning (autocast forward, fp32 weights, fp32 gradient reduction)
BF16_AUTOCAST = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}

SNIPPET = (
    '"bf16": {"enabled": false}, "torch_autocast": {"enabled": true, "dtype": "bfloat16"} '
    '(add "lower_precision_safe_modules": [] to reduce gradients in fp32, as DDP does)'
)


def _user_config(args: Any) -> dict:
    """The DeepSpeed config as the user wrote it, before transformers and accelerate filled "auto"."""
    source = getattr(args, "deepspeed", None)
    if isinstance(source, dict):
        return source
    if isinstance(source, str) and os.path.exists(source):
        with open(source, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(source, str):
        try:
            return json.loads(source)
        except json.JSONDecodeError:
            return {}
    return {}


def _enabled(section: dict | None) -> bool:
    return bool(section) and section.get("enabled", False) in (True, "true", "True")


def map_bf16_onto_autocast(trainer: Any) -> bool:
    """``--bf16`` with ``bf16.enabled`` "auto" or unset in the user's config: rewrite the (already filled)
    config to ``torch_autocast`` before DeepSpeed reads it. Returns whether it did."""
    args = trainer.args
    plugin = trainer.accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config
    if not (getattr(args, "bf16", False) and _enabled(ds_config.get("bf16"))):
        return False
    if _enabled(ds_config.get("torch_autocast")):
        return False  # both on: DeepSpeed's own error names the conflict
    written = _user_config(args).get("bf16", {}).get("enabled", "auto")
    if written != "auto":
        return False  # bf16 storage asked for in so many words: refused by check_precision
    ds_config["bf16"] = {"enabled": False}
    ds_config["torch_autocast"] = copy.deepcopy(BF16_AUTOCAST)
    # the Trainer casts float inputs to this dtype under DeepSpeed: the parameters stay fp32
    plugin.hf_ds_config._dtype = torch.float32
    logger.info("SAMTrainer: --bf16 under DeepSpeed runs as torch_autocast (bf16 compute, fp32 weights and reduction).")
    return True


def check_precision(trainer: Any) -> None:
    """Refuse 16-bit parameter storage, naming what works instead."""
    ds_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    for key, what in (("bf16", "bf16"), ("fp16", "fp16")):
        if _enabled(ds_config.get(key)):
            raise ValueError(
                f"SAMTrainer under DeepSpeed does not support the {key} section ({what} parameter storage): the "
                "parameters the forward uses would be 16-bit, so most of a perturbation of rho/sqrt(n) per weight "
                "rounds away and w is not restored exactly after the descent. Use DeepSpeed's torch_autocast "
                f"instead (fp32 parameters, the forward under torch.autocast): {SNIPPET}; or pass --bf16 with "
                '"bf16": {"enabled": "auto"} (or no bf16 section), which SAMTrainer maps onto torch_autocast.'
            )


def deepspeed_scaler(trainer: Any) -> Any:
    """fp16 under ``torch_autocast``: DeepSpeed's own GradScaler (inside the ZeRO optimizer, or the engine's under
    ZeRO-0), whose scale the gradients SAM reads carry; None otherwise."""
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        return None
    engine = wrapped.engine
    return getattr(engine.optimizer, "torch_autocast_gradscaler", None) or getattr(
        engine, "torch_autocast_z0_gradscaler", None
    )
