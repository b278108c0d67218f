"""SAM for TRL's trainers: ``SAMSFTTrainer``/``SAMSFTConfig`` and ``SAMDPOTrainer``/``SAMDPOConfig``.

Importing this module needs ``trl`` (``pip install trl``). The mixins keep every default of TRL's
configs and run TRL's own ``training_step`` contexts and ``compute_loss`` (metrics from the clean
pass only; see :class:`hf_sam.SAMMixin`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hf_sam's TRL trainers need the trl package: pip install trl (or pip install 'hf-sam[trl]')."
    ) from error

from torch import nn

from ..trainer.args import SAMArgumentsMixin
from ..trainer.mixin import SAMMixin


@dataclass
class SAMSFTConfig(SAMArgumentsMixin, SFTConfig):
    """TRL's ``SFTConfig`` (all its defaults) plus the ``sam_*`` fields."""


@dataclass
class SAMDPOConfig(SAMArgumentsMixin, DPOConfig):
    """TRL's ``DPOConfig`` (all its defaults) plus the ``sam_*`` fields."""


class SAMSFTTrainer(SAMMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with multi-step SAM; token counts and metrics come from the clean pass."""


class SAMDPOTrainer(SAMMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with multi-step SAM.

    The reference model's log-probabilities do not depend on the policy's weights: they are
    computed once per micro-batch and shared by the k + 1 passes (TRL reads them from the batch,
    as with ``precompute_ref_log_probs``).
    """

    def sam_shared_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.precompute_ref_logps or "ref_chosen_logps" in inputs:
            return inputs
        prepared = self._prepare_inputs(dict(inputs))
        reference = self.ref_model if self.ref_model is not None else self.model
        chosen, rejected = self.compute_ref_log_probs(reference, prepared)
        return {**prepared, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def sam_step_context(self) -> contextlib.AbstractContextManager:
        return _attribute(self, "precompute_ref_logps", True)


@contextlib.contextmanager
def _attribute(owner: object, name: str, value: object):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)
