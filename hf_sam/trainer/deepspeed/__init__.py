"""Everything SAM does under DeepSpeed ZeRO (stages 0-3), in one place:

- :mod:`.backend`: the gradient backend for an engine that owns backward, the gradient partitions and the optimizer
  step (each pass at an accumulation boundary, the held descents of accumulation, the stock pass of a one-pass step);
- :mod:`.partitions`: this rank's parts of ZeRO's partitions, the tensors the SAM engine works on, and the refresh
  of the forward's parameters after the engine moves them;
- :mod:`.precision`: DeepSpeed's ``torch_autocast`` (``--bf16`` mapped onto it), 16-bit storage refused, its loss
  scaler.

The launch check (``--sam_sync_ascent``, offload, precision) is :func:`hf_sam.trainer.checks.check_deepspeed`, with
every other launch check; the variants DeepSpeed refuses are declared with them (:mod:`hf_sam.engine.variants`).
"""

from .backend import DeepSpeedBackend, HeldDescent, deepspeed_backend, sam_engine_tensors, stock_pass, zero_stage
from .partitions import ReplicatedParts, Zero3Parts, Zero12Parts, ZeroParts, zero_parts
from .precision import check_precision, deepspeed_scaler, map_bf16_onto_autocast

__all__ = [
    "DeepSpeedBackend",
    "HeldDescent",
    "ReplicatedParts",
    "Zero12Parts",
    "Zero3Parts",
    "ZeroParts",
    "check_precision",
    "deepspeed_backend",
    "deepspeed_scaler",
    "map_bf16_onto_autocast",
    "sam_engine_tensors",
    "stock_pass",
    "zero_parts",
    "zero_stage",
]
