"""The Trainer contract: SAM inside ``training_step`` of any ``transformers.Trainer`` subclass.

:mod:`.mixin` holds SAMMixin and the ready-made trainers; :mod:`.micro_batch` drives one micro-batch's
passes from the Trainer's own backward call; :mod:`.step_metrics` the ``sam/*`` logs; :mod:`.checks`
and :mod:`.launch` what is refused or adapted per launch (DDP, FSDP2, dtypes); :mod:`.lookbehind` a
whole-step method; :mod:`.args` the ``sam_*`` fields. See docs/architecture.md.
"""

from .args import SAMArgumentsMixin, SAMSeq2SeqTrainingArguments, SAMTrainingArguments
from .checks import upcast_trainable_parameters
from .micro_batch import frozen_batchnorm_stats
from .mixin import SAMMixin, SAMSeq2SeqTrainer, SAMTrainer

__all__ = [
    "SAMArgumentsMixin",
    "SAMMixin",
    "SAMSeq2SeqTrainer",
    "SAMSeq2SeqTrainingArguments",
    "SAMTrainer",
    "SAMTrainingArguments",
    "frozen_batchnorm_stats",
    "upcast_trainable_parameters",
]
