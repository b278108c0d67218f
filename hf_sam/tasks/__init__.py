"""Vision and NLP tasks: hub loading and the embedded defaults."""

from .arguments import DataArguments, ModelArguments
from .embedded import load_embedded
from .run import parse_arguments, run_classification

__all__ = ["DataArguments", "ModelArguments", "load_embedded", "parse_arguments", "run_classification"]
