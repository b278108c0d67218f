"""The ``sam_*`` flags of every HfArgumentParser CLI.

``SAMArgumentsMixin`` holds only the SAM fields, so it can be put in front of any arguments class
(``TrainingArguments``, ``Seq2SeqTrainingArguments``, TRL's ``SFTConfig``...) without touching that
class's own defaults: ``class SAMSFTConfig(SAMArgumentsMixin, SFTConfig)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from ..config import ASCENT_RULES, DESCENT_RULES, DIRECTIONS, GRANULARITIES, METHODS, RHO_SCHEDULES, SAMConfig
from .checks import in_backward_refusal, steps_in_backward


@dataclass
class SAMArgumentsMixin:
    """The multi-step SAM knobs as ``sam_*`` dataclass fields; see :class:`hf_sam.SAMConfig`.

    Put it first in the bases of an arguments dataclass: the other class's defaults are kept and
    the ``sam_*`` values are validated before anything else.
    """

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
            "help": "Descent gradient: 'last' (at w + d_k), 'mean' (mean over w + d_1 .. w + d_k), 'xsam' "
            "(||g_k|| times the spherical interpolation between d_k and g_k; see --sam_xsam_alpha), 'gsam' "
            "(GSAM: g_s minus sam_gsam_alpha times the part of the clean gradient orthogonal to g_s) or 'wsam' "
            "(WSAM: g + a (g_s - g), a = sam_wsam_gamma / (1 - sam_wsam_gamma)).",
            "choices": list(DESCENT_RULES),
        },
    )
    sam_sync_ascent: bool = field(
        default=False,
        metadata={"help": "DDP: all-reduce the ascent gradients instead of perturbing per device."},
    )
    sam_replay_rng: bool = field(
        default=False,
        metadata={
            "help": "Replay the clean pass's random state (dropout masks) in every ascent and descent pass, so "
            "that sam/sharpness measures the perturbation and not dropout noise."
        },
    )
    sam_xsam_alpha: float | None = field(
        default=None,
        metadata={
            "help": "XSAM (--sam_descent xsam): a fixed alpha >= 0 (1 = SAM's descent, 0 = along the ascent), or "
            "unset to choose it at the first step of every epoch by the largest loss at w + rho_max u(alpha)."
        },
    )
    sam_xsam_alpha_max: float = field(default=2.0, metadata={"help": "XSAM: the largest alpha of the dynamic choice."})
    sam_xsam_rho_max: float | None = field(
        default=None, metadata={"help": "XSAM: the radius of the dynamic choice's points (default 2 * sam_rho)."}
    )
    sam_gsam_alpha: float = field(default=0.4, metadata={"help": "GSAM's alpha (>= 0; --sam_descent gsam)."})
    sam_wsam_gamma: float = field(
        default=0.9, metadata={"help": "WSAM's gamma in [0, 1): the sharpness weight is gamma / (1 - gamma)."}
    )
    sam_wsam_decouple: bool = field(
        default=True,
        metadata={
            "help": "WSAM: the optimizer steps with the clean gradient g and the weights then move by "
            "-lr a (g_s - g) (true), or the optimizer descends with g + a (g_s - g) (false)."
        },
    )
    sam_direction: str = field(
        default="gradient",
        metadata={
            "help": "Ascent direction: 'gradient' or 'friendly' (F-SAM: the ascent gradient minus "
            "sam_friendly_sigma times a momentum of the clean gradients).",
            "choices": list(DIRECTIONS),
        },
    )
    sam_friendly_sigma: float = field(default=1.0, metadata={"help": "F-SAM's sigma (>= 0)."})
    sam_friendly_lambda: float = field(default=0.9, metadata={"help": "F-SAM's momentum lambda in [0, 1)."})
    sam_every_n_steps: int = field(
        default=1,
        metadata={
            "help": "SAM at optimizer steps 0, n, 2n, ..; one forward+backward pass at the others (LookSAM's "
            "schedule; 1 = SAM at every step)."
        },
    )
    sam_reuse_alpha: float = field(
        default=0.0,
        metadata={
            "help": "LookSAM (with --sam_every_n_steps > 1): add alpha ||g|| / ||g_v|| g_v to the one-pass "
            "steps' gradient, g_v the part of the last SAM step's g_s orthogonal to its g (0 = plain SAM every n)."
        },
    )
    sam_reuse_granularity: str = field(
        default="global",
        metadata={
            "help": "LookSAM's norms and cosine over the whole gradient ('global', the paper's algorithm 1) or "
            "per parameter tensor ('tensor', its layer-wise variant).",
            "choices": list(GRANULARITIES),
        },
    )
    sam_rho_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' or 'lr' (GSAM's: rho follows the learning rate, sam_rho at its peak and "
            "sam_rho_min at its lowest).",
            "choices": list(RHO_SCHEDULES),
        },
    )
    sam_rho_min: float = field(default=0.0, metadata={"help": "The smallest rho of --sam_rho_schedule lr."})
    sam_method: str = field(
        default="sam",
        metadata={
            "help": "sam (multi-step SAM with the rules above), lookbehind (Lookbehind-SAM: k ascent steps of "
            "sam_rho, an optimizer step of fast weights after each, then the weights move by "
            "sam_lookbehind_alpha towards the fast ones) or msam (Momentum-SAM: one pass at "
            "w - sam_rho v/||v||, v the optimizer's momentum; k = 1).",
            "choices": list(METHODS),
        },
    )
    sam_lookbehind_alpha: float | None = field(
        default=0.5,
        metadata={"help": "Lookbehind's alpha in (0, 1]; unset (None) for the adaptive per-tensor alpha."},
    )
    sam_start_step: float = field(
        default=0,
        metadata={
            "help": "SAM late in training: plain optimizer steps (the stock Trainer's) before this step, SAM from it "
            "on. An integer step, or a float in [0, 1) as a fraction of the run's steps (as --warmup_steps)."
        },
    )
    sam_diagnostics: bool = field(
        default=False,
        metadata={
            "help": "Log the loss and gradient norm at every ascent point and the cosines between successive "
            "ascent gradients and between the first ascent and the descent gradient (slower)."
        },
    )
    sam_perturbed_weights: str = field(
        default="auto",
        metadata={
            "help": "Where the passes' perturbed weights live: 'swap' (a second buffer the parameters point at; "
            "w is never written, so there is no restore copy), 'copy' (the parameters, after a snapshot) or "
            "'auto' (swap unless unsafe: FSDP2 shards, tied storage, DeepSpeed, CUDA graphs).",
            "choices": ["auto", "swap", "copy"],
        },
    )

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
        optim = getattr(self, "optim", None)
        if config.ascent_steps >= 1 and steps_in_backward(optim):  # before the optimizer's package is asked for
            raise ValueError(in_backward_refusal(f"optim={getattr(optim, 'value', optim)!r}"))
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


@dataclass
class SAMTrainingArguments(SAMArgumentsMixin, TrainingArguments):
    """TrainingArguments with the multi-step SAM knobs; see :class:`hf_sam.SAMConfig`."""


@dataclass
class SAMSeq2SeqTrainingArguments(SAMArgumentsMixin, Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with the multi-step SAM knobs."""
