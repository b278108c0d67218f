"""The ``sam_*`` flags of every HfArgumentParser CLI.

``SAMArgumentsMixin`` holds only the SAM fields, so it can be put in front of any arguments class
(``TrainingArguments``, ``Seq2SeqTrainingArguments``, TRL's ``SFTConfig``...) without touching that
class's own defaults: ``class SAMSFTConfig(SAMArgumentsMixin, SFTConfig)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from ..config import SAMConfig
from .checks import check_optim_name


class _SAMArguments:
    """What the ``sam_*`` fields do beside being fields: validated first, and turned into a :class:`SAMConfig`."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if TrainingArguments in mro and mro.index(TrainingArguments) < mro.index(SAMArgumentsMixin):
            raise TypeError(
                f"{cls.__name__}: put SAMArgumentsMixin before the arguments class in the bases, e.g. "
                f"`class {cls.__name__}(SAMArgumentsMixin, {cls.__bases__[0].__name__})`; otherwise the sam_* "
                "values are never validated."
            )

    def __post_init__(self) -> None:
        # Validate the SAM knobs first: they are cheap and the error should come before anything else.
        config = self.sam_config  # raises ValueError naming the sam_* field
        if config.ascent_steps >= 1:  # before the optimizer's package is asked for
            check_optim_name(getattr(self, "optim", None))
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()

    @property
    def sam_config(self) -> SAMConfig:
        """The validated :class:`SAMConfig` these arguments describe."""
        # every SAMConfig field is the sam_-prefixed field of the same name (a test holds the two lists equal)
        return SAMConfig.from_fields(
            prefix="sam_", **{f.name: getattr(self, f"sam_{f.name}") for f in fields(SAMConfig)}
        )


# every sam_* field is SAMConfig's field of the same name, with its type, default and help (declared once, there or
# with its variant); docs/usage.md's table is generated from these fields: python -m hf_sam.trainer.flag_table
SAMArgumentsMixin = make_dataclass(
    "SAMArgumentsMixin",
    [(f"sam_{f.name}", f.type, field(default=f.default, metadata=dict(f.metadata))) for f in fields(SAMConfig)],
    bases=(_SAMArguments,),
    namespace={"__module__": __name__},
)
SAMArgumentsMixin.__doc__ = """The multi-step SAM knobs as ``sam_*`` dataclass fields; see :class:`hf_sam.SAMConfig`.

Put it first in the bases of an arguments dataclass: the other class's defaults are kept and the ``sam_*`` values
are validated before anything else."""


@dataclass
class SAMTrainingArguments(SAMArgumentsMixin, TrainingArguments):
    """TrainingArguments with the multi-step SAM knobs; see :class:`hf_sam.SAMConfig`."""


@dataclass
class SAMSeq2SeqTrainingArguments(SAMArgumentsMixin, Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with the multi-step SAM knobs."""
