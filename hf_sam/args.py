"""SAMTrainingArguments: TrainingArguments plus the ``sam_*`` flags of every HfArgumentParser CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .config import ASCENT_RULES, DESCENT_RULES, SAMConfig


@dataclass
class SAMTrainingArguments(TrainingArguments):
    """TrainingArguments with the multi-step SAM knobs; see :class:`hf_sam.SAMConfig`."""

    sam_ascent_steps: int = field(
        default=1,
        metadata={"help": "Number k of ascent steps before the descent (k >= 0; 0 = plain training)."},
    )
    sam_rho: float = field(default=0.05, metadata={"help": "Radius rho of the neighbourhood (> 0)."})
    sam_ascent_rule: str = field(
        default="normalized",
        metadata={
            "help": "How each ascent step is taken: normalized (step rho/k), projected "
            "(step sam_step_mult*rho, then project onto the rho-ball) or accumulated (step rho).",
            "choices": list(ASCENT_RULES),
        },
    )
    sam_step_mult: float = field(
        default=1.0, metadata={"help": "Step size of the 'projected' rule in units of rho (> 0)."}
    )
    sam_adaptive: bool = field(
        default=False, metadata={"help": "ASAM: scale the ascent by T = |w| + sam_adaptive_eta elementwise."}
    )
    sam_adaptive_eta: float = field(default=0.01, metadata={"help": "The eta of ASAM (>= 0)."})
    sam_descent: str = field(
        default="last",
        metadata={
            "help": "Descent gradient: 'last' (at w + d_k) or 'mean' (mean over w + d_1 .. w + d_k).",
            "choices": list(DESCENT_RULES),
        },
    )
    sam_sync_ascent: bool = field(
        default=False,
        metadata={"help": "DDP: all-reduce the ascent gradients instead of perturbing per device."},
    )

    sam_diagnostics: bool = field(
        default=False,
        metadata={
            "help": "Log the loss and gradient norm at every ascent point and the cosines between successive "
            "ascent gradients and between the first ascent and the descent gradient (slower)."
        },
    )

    def __post_init__(self) -> None:
        # Validate the SAM knobs first: they are cheap and the error should come before anything else.
        self.sam_config  # noqa: B018 - raises ValueError naming the sam_* field
        super().__post_init__()

    @property
    def sam_config(self) -> SAMConfig:
        """The validated :class:`SAMConfig` these arguments describe."""
        return SAMConfig.from_fields(
            prefix="sam_",
            ascent_steps=self.sam_ascent_steps,
            rho=self.sam_rho,
            ascent_rule=self.sam_ascent_rule,
            step_mult=self.sam_step_mult,
            adaptive=self.sam_adaptive,
            adaptive_eta=self.sam_adaptive_eta,
            descent=self.sam_descent,
            sync_ascent=self.sam_sync_ascent,
            diagnostics=self.sam_diagnostics,
        )
