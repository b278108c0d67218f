"""hf-sam: multi-step Sharpness-Aware Minimization for the Hugging Face Trainer."""

from typing import Any

from .config import SAMConfig
from .engine import LookbehindSAM, MultiStepAscent, Refusal, Variant, option, register
from .trainer import (
    SAMArgumentsMixin,
    SAMMixin,
    SAMSeq2SeqTrainer,
    SAMSeq2SeqTrainingArguments,
    SAMTrainer,
    SAMTrainingArguments,
    upcast_trainable_parameters,
)

__version__ = "0.1.0"

# TRL stays optional: these names import it on first use
_TRL_NAMES = ("SAMSFTTrainer", "SAMSFTConfig", "SAMDPOTrainer", "SAMDPOConfig")


def __getattr__(name: str) -> Any:
    if name in _TRL_NAMES:
        from .integrations import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'hf_sam' has no attribute {name!r}")


__all__ = [
    "LookbehindSAM",
    "MultiStepAscent",
    "Refusal",
    "SAMArgumentsMixin",
    "SAMConfig",
    "SAMMixin",
    "SAMSeq2SeqTrainer",
    "SAMSeq2SeqTrainingArguments",
    "SAMTrainer",
    "SAMTrainingArguments",
    "Variant",
    "option",
    "register",
    "upcast_trainable_parameters",
    "__version__",
    *_TRL_NAMES,
]
