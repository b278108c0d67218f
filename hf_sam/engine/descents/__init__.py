"""The descents: which gradient the descent step takes, one small object per rule.

A new descent is one module here (copy :mod:`.mean`): a :class:`~.base.LastDescent` subclass with the
hooks it needs, registered in :data:`DESCENTS` under its ``sam_descent`` name.
"""

from __future__ import annotations

from .base import DescentContext, LastDescent
from .mean import MeanDescent
from .xsam import XSAMDescent

DESCENTS: dict[str, type[LastDescent]] = {"last": LastDescent, "mean": MeanDescent, "xsam": XSAMDescent}


def make_descent(name: str, rho: float, xsam_alpha: float = 1.0, xsam_rho_max: float | None = None) -> LastDescent:
    """The descent object for ``sam_descent=name`` (XSAM's alpha and radius default to 1 and 2 rho)."""
    if name not in DESCENTS:
        raise ValueError(f"descent={name!r} is invalid: allowed values are {', '.join(DESCENTS)}.")
    if name == "xsam":
        return XSAMDescent(xsam_alpha, 2 * rho if xsam_rho_max is None else xsam_rho_max)
    return DESCENTS[name]()


__all__ = ["DESCENTS", "DescentContext", "LastDescent", "MeanDescent", "XSAMDescent", "make_descent"]
