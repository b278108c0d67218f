"""Validation of the whole-step knobs that are not registered variants (SAM every n steps, the rho schedule) and
of the combinations no method defines. A variant's own options are checked by the
variant's declaration (:mod:`hf_sam.engine.variants`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .engine.variants import finite_number

RHO_SCHEDULES = ("constant", "lr")

Fail = Callable[[str, object, str], None]


def validate_family(config: Any, fail: Fail, prefix: str) -> None:
    """Raise (through ``fail``) a ValueError naming the first field out of its range or combination."""
    p = prefix
    _ranges(config, fail)
    # an option read only by one setting: refuse it elsewhere rather than ignore it silently
    if config.rho_schedule != "lr" and config.rho_min != 0:
        fail("rho_min", config.rho_min, f"it is used only by {p}rho_schedule='lr'")
    if config.ascent_steps == 0:
        for name, default in (("every_n_steps", 1), ("rho_schedule", "constant")):
            if getattr(config, name) != default:
                fail(name, getattr(config, name), f"it needs {p}ascent_steps >= 1")
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
    n = config.every_n_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        fail("every_n_steps", n, "it must be an integer >= 1 (1 = SAM at every step)")
    if config.rho_schedule not in RHO_SCHEDULES:
        fail("rho_schedule", config.rho_schedule, f"allowed values are {', '.join(RHO_SCHEDULES)}")
    if not finite_number(config.rho_min) or config.rho_min < 0:
        fail("rho_min", config.rho_min, "it must be a finite number >= 0")
