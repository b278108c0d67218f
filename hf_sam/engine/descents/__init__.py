"""The descents: which gradient the descent step takes, one small object per rule.

A new descent is one module (copy :mod:`.mean`): a :class:`~.base.LastDescent` subclass with the hooks it
needs, declared once in the registry (:func:`hf_sam.engine.variants.register`) under its ``sam_descent`` name.
Importing this package declares the built-in ones.
"""

# ruff: noqa: I001
from __future__ import annotations

# the import order is the order the descents are declared in, and listed in flags and docs
from .base import DescentContext, LastDescent
from .mean import MeanDescent
from .xsam import XSAMDescent
from .gsam import GSAMDescent
from .wsam import WSAMDescent

__all__ = ["DescentContext", "GSAMDescent", "LastDescent", "MeanDescent", "WSAMDescent", "XSAMDescent"]
