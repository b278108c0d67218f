"""The descents: which gradient the descent step takes, one small object per rule.

LookSAM's memory (:mod:`.looksam`) is the ``sam_reuse`` variant's descent, for the SAM steps of
``sam_every_n_steps`` > 1. A new descent is one module (copy :mod:`.mean`): a :class:`~.base.LastDescent` subclass
with the hooks it needs, declared once in the registry (:func:`hf_sam.engine.variants.register`) under its
``sam_descent`` name. Importing this package declares the built-in ones.
"""

# ruff: noqa: I001
from __future__ import annotations

# the import order is the order the descents are declared in, and listed in flags and docs
from .base import DescentContext, LastDescent
from .mean import MeanDescent
from .xsam import XSAMDescent
from .gsam import GSAMDescent
from .wsam import WSAMDescent
from .looksam import LookSAMDescent

__all__ = [
    "DescentContext",
    "GSAMDescent",
    "LastDescent",
    "LookSAMDescent",
    "MeanDescent",
    "WSAMDescent",
    "XSAMDescent",
]
