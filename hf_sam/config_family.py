"""Validation of the SAM family's knobs (GSAM, WSAM, F-SAM, LookSAM / every n steps, the rho schedule):
ranges, options that only one method reads, and the combinations no method defines."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

DIRECTIONS = ("gradient", "friendly")
GRANULARITIES = ("global", "tensor")
RHO_SCHEDULES = ("constant", "lr")

Fail = Callable[[str, object, str], None]


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_family(config: Any, fail: Fail, prefix: str) -> None:
    """Raise (through ``fail``) a ValueError naming the first field out of its range or combination."""
    p = prefix
    _ranges(config, fail)
    # an option read only by one method: refuse it elsewhere rather than ignore it silently
    for name, default, owner, active in (
        ("gsam_alpha", 0.4, f"{p}descent='gsam'", config.descent == "gsam"),
        ("wsam_gamma", 0.9, f"{p}descent='wsam'", config.descent == "wsam"),
        ("wsam_decouple", True, f"{p}descent='wsam'", config.descent == "wsam"),
        ("friendly_sigma", 1.0, f"{p}direction='friendly'", config.direction == "friendly"),
        ("friendly_lambda", 0.9, f"{p}direction='friendly'", config.direction == "friendly"),
        ("reuse_alpha", 0.0, f"{p}every_n_steps > 1", config.every_n_steps > 1),
        ("reuse_granularity", "global", f"{p}every_n_steps > 1", config.every_n_steps > 1),
        ("rho_min", 0.0, f"{p}rho_schedule='lr'", config.rho_schedule == "lr"),
    ):
        if not active and getattr(config, name) != default:
            fail(name, getattr(config, name), f"it is used only by {owner}")
    k = config.ascent_steps
    for name, value, default in (
        ("descent", config.descent, ("last", "mean", "xsam")),
        ("direction", config.direction, ("gradient",)),
        ("every_n_steps", config.every_n_steps, (1,)),
        ("rho_schedule", config.rho_schedule, ("constant",)),
    ):
        if k == 0 and value not in default:
            fail(name, value, f"it needs {p}ascent_steps >= 1")
    # combinations no method defines
    if config.direction == "friendly" and config.descent != "last":
        fail("direction", "friendly", f"F-SAM's direction composes with {p}descent='last' only, not {config.descent!r}")
    if config.every_n_steps > 1:
        for name, allowed in (("descent", "last"), ("direction", "gradient"), ("method", "sam")):
            value = getattr(config, name)
            if value != allowed:
                fail(
                    "every_n_steps",
                    config.every_n_steps,
                    f"SAM every n steps (LookSAM) runs {p}{name}={allowed!r} steps only, not {p}{name}={value!r}",
                )
    if config.rho_schedule == "lr" and config.rho_min > config.rho:
        fail("rho_min", config.rho_min, f"it must be <= {p}rho ({config.rho})")


def _ranges(config: Any, fail: Fail) -> None:
    if not _number(config.gsam_alpha) or config.gsam_alpha < 0:
        fail("gsam_alpha", config.gsam_alpha, "it must be a finite number >= 0")
    if not _number(config.wsam_gamma) or not 0 <= config.wsam_gamma < 1:
        fail("wsam_gamma", config.wsam_gamma, "it must be in [0, 1)")
    if config.direction not in DIRECTIONS:
        fail("direction", config.direction, f"allowed values are {', '.join(DIRECTIONS)}")
    if not _number(config.friendly_sigma) or config.friendly_sigma < 0:
        fail("friendly_sigma", config.friendly_sigma, "it must be a finite number >= 0")
    if not _number(config.friendly_lambda) or not 0 <= config.friendly_lambda < 1:
        fail("friendly_lambda", config.friendly_lambda, "it must be in [0, 1)")
    n = config.every_n_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        fail("every_n_steps", n, "it must be an integer >= 1 (1 = SAM at every step)")
    if not _number(config.reuse_alpha) or config.reuse_alpha < 0:
        fail("reuse_alpha", config.reuse_alpha, "it must be a finite number >= 0")
    if config.reuse_granularity not in GRANULARITIES:
        fail("reuse_granularity", config.reuse_granularity, f"allowed values are {', '.join(GRANULARITIES)}")
    if config.rho_schedule not in RHO_SCHEDULES:
        fail("rho_schedule", config.rho_schedule, f"allowed values are {', '.join(RHO_SCHEDULES)}")
    if not _number(config.rho_min) or config.rho_min < 0:
        fail("rho_min", config.rho_min, "it must be a finite number >= 0")
