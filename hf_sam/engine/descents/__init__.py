"""The descents: which gradient the descent step takes, one small object per rule.

A new descent is one module here (copy :mod:`.mean`): a :class:`~.base.LastDescent` subclass with the
hooks it needs, registered in :data:`DESCENTS` under its ``sam_descent`` name.
"""

from __future__ import annotations

from .base import DescentContext, LastDescent
from .gsam import GSAMDescent
from .mean import MeanDescent
from .wsam import WSAMDescent
from .xsam import XSAMDescent

DESCENTS: dict[str, type[LastDescent]] = {
    "last": LastDescent,
    "mean": MeanDescent,
    "xsam": XSAMDescent,
    "gsam": GSAMDescent,
    "wsam": WSAMDescent,
}


def make_descent(
    name: str,
    rho: float,
    xsam_alpha: float = 1.0,
    xsam_rho_max: float | None = None,
    gsam_alpha: float = 0.4,
    wsam_gamma: float = 0.9,
    wsam_decouple: bool = True,
) -> LastDescent:
    """The descent object for ``sam_descent=name`` (XSAM's alpha and radius default to 1 and 2 rho)."""
    if name not in DESCENTS:
        raise ValueError(f"descent={name!r} is invalid: allowed values are {', '.join(DESCENTS)}.")
    if name == "xsam":
        return XSAMDescent(xsam_alpha, 2 * rho if xsam_rho_max is None else xsam_rho_max)
    if name == "gsam":
        return GSAMDescent(gsam_alpha)
    if name == "wsam":
        return WSAMDescent(wsam_gamma, wsam_decouple)
    return DESCENTS[name]()


__all__ = [
    "DESCENTS",
    "DescentContext",
    "GSAMDescent",
    "LastDescent",
    "MeanDescent",
    "WSAMDescent",
    "XSAMDescent",
    "make_descent",
]
