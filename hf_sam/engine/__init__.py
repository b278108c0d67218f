"""The engine: the SAM perturbation in pure torch, on a list of tensors.

Nothing here imports transformers, accelerate or the rest of hf_sam, so the engine runs in a plain
PyTorch loop. :class:`MultiStepAscent` is the step protocol; :mod:`.rules` the ascent rules (step
size, projection); :mod:`.descents` the descents, one small object each; :mod:`.tensors` the norms
over shards; :mod:`.guarded` the updates decided on the device;
:class:`LookbehindSAM` Lookbehind-SAM for a plain loop. See docs/architecture.md.
"""

from .ascent import MultiStepAscent, scaled_loss
from .lookbehind import LookbehindSAM

__all__ = ["LookbehindSAM", "MultiStepAscent", "scaled_loss"]
