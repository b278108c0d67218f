"""The ``sam_*`` flags of every HfArgumentParser CLI.

``SAMArgumentsMixin`` holds only the SAM fields, so it can be put in front of any arguments class
(``TrainingArguments``, ``Seq2SeqTrainingArguments``, TRL's ``SFTConfig``...) without touching that
class's own defaults: ``class SAMSFTConfig(SAMArgumentsMixin, SFTConfig)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from ..config import (
    ASCENT_RULES,
    DESCENT_RULES,
    DIRECTIONS,
    GRANULARITIES,
    METHODS,
    PERTURBED_WEIGHTS,
    RHO_SCHEDULES,
    SAMConfig,
)
from .checks import check_optim_name

# each sam_* field's default is SAMConfig's (written once, there); its help is the flag reference's text
# (docs/usage.md's table is generated from these fields: python -m hf_sam.trainer.flag_table)
_DEFAULTS = {f.name: f.default for f in fields(SAMConfig)}


@dataclass
class SAMArgumentsMixin:
    """The multi-step SAM knobs as ``sam_*`` dataclass fields; see :class:`hf_sam.SAMConfig`.

    Put it first in the bases of an arguments dataclass: the other class's defaults are kept and
    the ``sam_*`` values are validated before anything else.
    """

    sam_ascent_steps: int = field(
        default=_DEFAULTS["ascent_steps"],
        metadata={
            "help": (
                "Number k >= 0 of ascent steps before the descent. 0 = no ascent: exactly the stock Trainer (the "
                "baseline of every comparison)."
            ),
        },
    )
    sam_rho: float = field(
        default=_DEFAULTS["rho"],
        metadata={
            "help": ("Radius rho > 0 of the neighbourhood."),
        },
    )
    sam_ascent_rule: str = field(
        default=_DEFAULTS["ascent_rule"],
        metadata={
            "help": (
                "How each ascent step is taken: 'normalized' (step rho/k, no projection), 'projected' (step "
                "sam_step_mult * rho, then project onto the rho-ball) or 'accumulated' (step rho, no projection)."
            ),
            "choices": list(ASCENT_RULES),
        },
    )
    sam_step_mult: float = field(
        default=_DEFAULTS["step_mult"],
        metadata={
            "help": ("Step size of the 'projected' rule in units of rho (> 0; that rule only)."),
        },
    )
    sam_adaptive: bool = field(
        default=_DEFAULTS["adaptive"],
        metadata={
            "help": (
                "ASAM: T = |w| + sam_adaptive_eta elementwise for every trainable parameter; each step is a T^2 g / "
                "||T g||, and 'projected' projects onto ||d / T|| <= rho."
            ),
        },
    )
    sam_adaptive_eta: float = field(
        default=_DEFAULTS["adaptive_eta"],
        metadata={
            "help": ("The eta of ASAM (>= 0; sam_adaptive only)."),
        },
    )
    sam_descent: str = field(
        default=_DEFAULTS["descent"],
        metadata={
            "help": (
                "Descent gradient: 'last' (at w + d_k), 'mean' (the mean of the gradients at w + d_1 .. w + d_k), "
                "'xsam' (||g_k|| u(alpha), the spherical interpolation from d_k (alpha 0) to g_k (alpha 1, SAM's "
                "descent bit for bit) and beyond; XSAM, arXiv 2603.10048), 'gsam' (GSAM: g_s minus sam_gsam_alpha "
                "times the part of the clean gradient orthogonal to g_s) or 'wsam' (WSAM: g + a (g_s - g), a = "
                "sam_wsam_gamma / (1 - sam_wsam_gamma))."
            ),
            "choices": list(DESCENT_RULES),
        },
    )
    sam_sync_ascent: bool = field(
        default=_DEFAULTS["sync_ascent"],
        metadata={
            "help": (
                "DDP: all-reduce the ascent gradients (one perturbation for all ranks) instead of perturbing per "
                "device; required under FSDP2 and DeepSpeed."
            ),
        },
    )
    sam_replay_rng: bool = field(
        default=_DEFAULTS["replay_rng"],
        metadata={
            "help": (
                "Run every ascent and descent pass with the clean pass's random state (the same dropout masks), so "
                "that sam/sharpness measures the perturbation, not dropout noise."
            ),
        },
    )
    sam_xsam_alpha: float | None = field(
        default=_DEFAULTS["xsam_alpha"],
        metadata={
            "help": (
                "XSAM (sam_descent xsam only): a fixed alpha >= 0, or unset to choose it at the first step of every "
                "epoch among 0, 0.1, .., sam_xsam_alpha_max by the largest training loss at w + sam_xsam_rho_max "
                "u(alpha) (21 forward passes per epoch; saved with checkpoints)."
            ),
        },
    )
    sam_xsam_alpha_max: float = field(
        default=_DEFAULTS["xsam_alpha_max"],
        metadata={
            "help": ("XSAM: the largest alpha of the dynamic choice."),
        },
    )
    sam_xsam_rho_max: float | None = field(
        default=_DEFAULTS["xsam_rho_max"],
        metadata={
            "help": ("XSAM: the radius of the dynamic choice's points (unset: 2 sam_rho)."),
        },
    )
    sam_gsam_alpha: float = field(
        default=_DEFAULTS["gsam_alpha"],
        metadata={
            "help": ("GSAM's alpha >= 0 (sam_descent gsam only)."),
        },
    )
    sam_wsam_gamma: float = field(
        default=_DEFAULTS["wsam_gamma"],
        metadata={
            "help": ("WSAM's gamma in [0, 1) (sam_descent wsam only): the sharpness weight is gamma / (1 - gamma)."),
        },
    )
    sam_wsam_decouple: bool = field(
        default=_DEFAULTS["wsam_decouple"],
        metadata={
            "help": (
                "WSAM: the optimizer steps with the clean gradient g and the weights then move by -lr a (g_s - g) "
                "(true), or the optimizer descends with g + a (g_s - g) (false)."
            ),
        },
    )
    sam_direction: str = field(
        default=_DEFAULTS["direction"],
        metadata={
            "help": (
                "Ascent direction: 'gradient' or 'friendly' (F-SAM: the ascent gradient minus sam_friendly_sigma "
                "times a momentum of the clean gradients; with sam_descent last)."
            ),
            "choices": list(DIRECTIONS),
        },
    )
    sam_friendly_sigma: float = field(
        default=_DEFAULTS["friendly_sigma"],
        metadata={
            "help": ("F-SAM's sigma >= 0."),
        },
    )
    sam_friendly_lambda: float = field(
        default=_DEFAULTS["friendly_lambda"],
        metadata={
            "help": ("F-SAM's momentum lambda in [0, 1)."),
        },
    )
    sam_every_n_steps: int = field(
        default=_DEFAULTS["every_n_steps"],
        metadata={
            "help": (
                "SAM at optimizer steps 0, n, 2n, ..; one forward+backward pass (the stock step) at the others (1 = "
                "SAM at every step)."
            ),
        },
    )
    sam_reuse_alpha: float = field(
        default=_DEFAULTS["reuse_alpha"],
        metadata={
            "help": (
                "LookSAM (with sam_every_n_steps > 1): add alpha ||g|| / ||g_v|| g_v to the one-pass steps' gradient, "
                "g_v the part of the last SAM step's g_s orthogonal to its g (0 = plain SAM every n steps)."
            ),
        },
    )
    sam_reuse_granularity: str = field(
        default=_DEFAULTS["reuse_granularity"],
        metadata={
            "help": (
                "LookSAM's norms and cosine over the whole gradient ('global', the paper's algorithm 1) or per "
                "parameter tensor ('tensor')."
            ),
            "choices": list(GRANULARITIES),
        },
    )
    sam_rho_schedule: str = field(
        default=_DEFAULTS["rho_schedule"],
        metadata={
            "help": (
                "'constant' or 'lr' (GSAM's: rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min) over "
                "the run's learning-rate schedule, for every method)."
            ),
            "choices": list(RHO_SCHEDULES),
        },
    )
    sam_rho_min: float = field(
        default=_DEFAULTS["rho_min"],
        metadata={
            "help": ("The smallest rho of sam_rho_schedule lr (in [0, sam_rho])."),
        },
    )
    sam_method: str = field(
        default=_DEFAULTS["method"],
        metadata={
            "help": (
                "'sam' (multi-step SAM with the rules above), 'lookbehind' (Lookbehind-SAM: k ascent steps of "
                "sam_rho, an optimizer step of fast weights after each, then the weights move by sam_lookbehind_alpha "
                "towards the fast ones; its own ascent and descent) or 'msam' (Momentum-SAM: one pass at w - sam_rho "
                "v/||v||, v the optimizer's momentum; k = 1)."
            ),
            "choices": list(METHODS),
        },
    )
    sam_lookbehind_alpha: float | None = field(
        default=_DEFAULTS["lookbehind_alpha"],
        metadata={
            "help": (
                "Lookbehind's alpha in (0, 1]; unset (None, in Python or a config file) for the adaptive per-tensor "
                "alpha."
            ),
        },
    )
    sam_start_step: float = field(
        default=_DEFAULTS["start_step"],
        metadata={
            "help": (
                "SAM late in training: the optimizer steps before it are the stock Trainer's (one pass each, bit for "
                "bit), SAM runs from it on. An integer step, or a float in [0, 1) as a fraction of the run's steps, "
                "rounded up (as --warmup_steps). With sam_every_n_steps the SAM steps are still the multiples of n; "
                "refused with sam_method lookbehind."
            ),
        },
    )
    sam_diagnostics: bool = field(
        default=_DEFAULTS["diagnostics"],
        metadata={
            "help": (
                "Also log the loss and gradient norm at every ascent point, the cosines between successive ascent "
                "gradients and between the first ascent and the descent gradient, and under autocast the "
                "perturbation's fidelity (slower)."
            ),
        },
    )
    sam_perturbed_weights: str = field(
        default=_DEFAULTS["perturbed_weights"],
        metadata={
            "help": (
                "Where the passes' perturbed weights live: 'swap' (a second buffer the parameters point at; w is "
                "never written, so there is no snapshot or restore copy), 'copy' (the parameters, after a snapshot "
                "that is copied back) or 'auto' (swap, except for FSDP2 shards, parameters sharing storage, DeepSpeed "
                "and CUDA-graph compile modes, where a parameter's storage must stay put)."
            ),
            "choices": list(PERTURBED_WEIGHTS),
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


@dataclass
class SAMTrainingArguments(SAMArgumentsMixin, TrainingArguments):
    """TrainingArguments with the multi-step SAM knobs; see :class:`hf_sam.SAMConfig`."""


@dataclass
class SAMSeq2SeqTrainingArguments(SAMArgumentsMixin, Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with the multi-step SAM knobs."""
