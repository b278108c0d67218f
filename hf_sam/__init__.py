"""hf-sam: multi-step Sharpness-Aware Minimization for the Hugging Face Trainer."""

from .args import SAMTrainingArguments
from .ascent import MultiStepAscent
from .config import SAMConfig
from .trainer import SAMTrainer

__version__ = "0.1.0"

__all__ = ["MultiStepAscent", "SAMConfig", "SAMTrainer", "SAMTrainingArguments", "__version__"]
