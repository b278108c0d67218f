"""The registry of SAM's variants: every ascent rule, descent, direction and whole-step method is declared here
once, with its options, what it needs and where it runs. Everything else reads these declarations: the
``sam_*`` fields of :class:`hf_sam.SAMConfig` (a variant's options are fields of it), their validation, the
launch checks, the study's method names and the flag reference in ``docs/usage.md``.

A variant of a user's own is declared the same way, from the user's script, through :func:`register`
(see ``docs/architecture.md``, "A variant of your own"); its options then come through ``sam_options``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

# "reuse": what the one-pass steps of sam_every_n_steps > 1 add from the SAM steps (its object is the descent of
# those SAM steps, which remembers what it needs)
KINDS = ("ascent_rule", "descent", "direction", "method", "reuse")
# the settings the registry can refuse a variant in (the docs' "where it runs" column)
WHERE = (
    "several processes without sam_sync_ascent",
    "gradient accumulation on several processes",
    "DeepSpeed",
    "several processes",
    "gradient accumulation",
    "fp16",
)

Fail = Callable[[str, object, str], None]


def finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Refusal:
    """A setting a variant cannot run in: ``where`` one of :data:`WHERE`; ``when`` tells, from the variant's
    options, whether this configuration is refused there (None: always); ``why`` is the message's reason."""

    where: str
    why: str
    when: Callable[[Any], bool] | None = None

    def applies(self, options: Any) -> bool:
        return self.when is None or bool(self.when(options))


@dataclass(frozen=True)
class Variant:
    """One variant, declared once.

    kind: one of :data:`KINDS`. name: its value of ``sam_<kind>``. summary: one line for the docs' table.
    build: ``build(options, rho)`` returns the object the engine calls (a rule, descent or direction; None
        for a whole-step method, which the Trainer's step dispatches by name).
    options: a dataclass of the variant's options (each field with a default and ``metadata["help"]``, and an
        optional ``check(fail)`` method for ranges), or None.
    needs_ascent: it needs ``sam_ascent_steps >= 1`` (every variant but SAM's own descent and direction).
    refusals: the settings it cannot run in (several processes without a synchronized ascent, accumulation on
        several processes, DeepSpeed), each with the reason.
    paper: where it comes from.
    """

    kind: str
    name: str
    summary: str
    build: Callable[[Any, float], Any] | None = None
    options: type | None = None
    needs_ascent: bool = True
    refusals: tuple[Refusal, ...] = ()
    paper: str = ""

    def option_fields(self) -> list:
        return list(fields(self.options)) if self.options is not None else []

    def make_options(self, values: dict[str, Any], fail: Fail, prefix: str = "") -> Any:
        """The variant's options object from ``values`` (its option names), checked; None without options."""
        if self.options is None:
            for name, value in values.items():
                fail(f"options['{name}']", value, f"{prefix}{self.kind}={self.name!r} takes no options")
            return None
        known = {f.name for f in fields(self.options)}
        for name, value in values.items():
            if name not in known:
                fail(f"options['{name}']", value, f"{prefix}{self.kind}={self.name!r} takes {sorted(known)}")
        options = self.options(**values)
        check = getattr(options, "check", None)
        if check is not None:
            check(fail)
        return options


def needs_one_gradient_for_all_ranks(what: str, when: Callable[[Any], bool] | None = None) -> tuple[Refusal, Refusal]:
    """The refusals of a variant that combines ``what`` (the clean gradient g and g_s, or d_k and g_k): under several
    processes they must be the all-ranks ones (``when``: from the options, whether it combines them)."""
    return (
        Refusal(WHERE[0], f"it combines {what}, which would then be each rank's own, not the all-ranks ones", when),
        Refusal(
            WHERE[1],
            f"it combines {what}, and the gradients of non-final micro-batches are not all-reduced, so the ranks "
            "would combine different ones",
            when,
        ),
    )


_REGISTRY: dict[str, dict[str, Variant]] = {kind: {} for kind in KINDS}
_BUILTIN: set[tuple[str, str]] = set()


def register(variant: Variant, *, replace: bool = False) -> Variant:
    """Declare a variant, selectable from then on by ``sam_<kind>=<name>`` (for a rule: ``sam_ascent_rule``).

    Its options dataclass must give every field a default. A name already taken is refused unless
    ``replace`` (never for a built-in). Returns the variant."""
    if variant.kind not in KINDS:
        raise ValueError(f"Variant kind {variant.kind!r} is invalid: allowed kinds are {', '.join(KINDS)}.")
    if not variant.name or not variant.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"Variant name {variant.name!r} is invalid: letters, digits, '_' and '-' only.")
    if variant.kind != "method" and variant.build is None:
        raise ValueError(f"The {variant.kind} {variant.name!r} needs a build(options, rho) callable.")
    if variant.options is not None:
        if not is_dataclass(variant.options):
            raise TypeError(f"The options of {variant.kind} {variant.name!r} must be a dataclass.")
        for f in fields(variant.options):
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"Option {f.name!r} of {variant.kind} {variant.name!r} needs a default.")
    taken = _REGISTRY[variant.kind].get(variant.name)
    if taken is not None and ((variant.kind, variant.name) in _BUILTIN or not replace):
        raise ValueError(f"The {variant.kind} {variant.name!r} is already registered.")
    _REGISTRY[variant.kind][variant.name] = variant
    return variant


def unregister(kind: str, name: str) -> None:
    """Remove a user's variant (built-ins stay)."""
    if (kind, name) in _BUILTIN:
        raise ValueError(f"The built-in {kind} {name!r} cannot be removed.")
    _REGISTRY[kind].pop(name, None)


class RegisteredNames(Sequence):
    """The names registered for a kind, read when used: a command line's ``choices`` that a variant registered
    after the arguments class was built is in too."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __getitem__(self, index):
        return names(self.kind)[index]

    def __len__(self) -> int:
        return len(names(self.kind))

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY[self.kind]


def names(kind: str) -> tuple[str, ...]:
    """The names selectable for ``kind``, built-ins first in their declared order."""
    return tuple(_REGISTRY[kind])


def lookup(kind: str, name: str) -> Variant:
    """The variant ``name`` of ``kind``; a ValueError naming the allowed values when there is none."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(f"{kind}={name!r} is invalid: allowed values are {', '.join(names(kind))}.") from None


def variants(kind: str | None = None) -> list[Variant]:
    """Every registered variant (of ``kind``), in declared order."""
    kinds = KINDS if kind is None else (kind,)
    return [v for k in kinds for v in _REGISTRY[k].values()]


def builtin_variants() -> list[Variant]:
    """The variants hf_sam declares (their options are ``SAMConfig`` fields)."""
    return [v for v in variants() if is_builtin(v)]


def is_builtin(variant: Variant) -> bool:
    return (variant.kind, variant.name) in _BUILTIN


def owner_of(option: str) -> Variant | None:
    """The built-in variant an option field belongs to (None for a core field)."""
    return next((v for v in builtin_variants() for f in v.option_fields() if f.name == option), None)


def declare_builtin(variant: Variant) -> Variant:
    register(variant)
    _BUILTIN.add((variant.kind, variant.name))
    return variant


def option(default: Any, help: str) -> Any:
    """A field of a variant's options: its default and its help (the flag's help and the docs' text)."""
    return field(default=default, metadata={"help": help})
