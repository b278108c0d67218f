"""The engine: the SAM perturbation in pure torch, on a list of tensors.

Nothing here imports transformers, accelerate or the rest of hf_sam, so the engine runs in a plain
PyTorch loop. :class:`MultiStepAscent` is the step protocol; :mod:`.rules` the ascent rules (step
size, projection); :mod:`.descents` the descents, one small object each; :mod:`.tensors` the norms
over shards; :mod:`.guarded` the updates decided on the device;
:class:`LookbehindSAM` Lookbehind-SAM for a plain loop; :mod:`.variants` the registry every variant is
declared in, and what a user's own variant is written with (re-exported here). See docs/architecture.md.
"""

from .ascent import MultiStepAscent, scaled_loss
from .descents.base import CleanGradientDescent, DescentContext, LastDescent, RewritingDescent
from .directions import GradientDirection
from .lookbehind import LookbehindSAM
from .momentum import MomentumPerturbation
from .rules import AscentRule
from .tensors import global_dot, global_norm
from .variants import Refusal, Variant, needs_one_gradient_for_all_ranks, option, register, unregister

__all__ = [
    "AscentRule",
    "CleanGradientDescent",
    "DescentContext",
    "GradientDirection",
    "LastDescent",
    "LookbehindSAM",
    "MomentumPerturbation",
    "MultiStepAscent",
    "Refusal",
    "RewritingDescent",
    "Variant",
    "global_dot",
    "global_norm",
    "needs_one_gradient_for_all_ranks",
    "option",
    "register",
    "unregister",
    "scaled_loss",
]
