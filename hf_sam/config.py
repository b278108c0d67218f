"""SAMConfig: every multi-step SAM knob, validated in one place.

The core knobs are declared here; the options of each variant (GSAM's alpha, XSAM's, F-SAM's sigma, ...) are
declared with the variant in the registry (:mod:`hf_sam.engine.variants`) and become fields of SAMConfig through
its bases. The ``sam_*`` fields of every CLI are generated from these fields (:mod:`hf_sam.trainer.args`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from . import engine  # noqa: F401  (declares the built-in variants)
from .config_family import RHO_SCHEDULES, validate_family
from .engine import variants
from .engine.descents.looksam import GRANULARITIES
from .engine.moved_weights import MODES as PERTURBED_WEIGHTS

__all__ = ["GRANULARITIES", "PERTURBED_WEIGHTS", "RHO_SCHEDULES", "SAMConfig", "VARIANT_KINDS"]
# the fields that name a registered variant, by kind
VARIANT_KINDS = variants.KINDS
_DEFAULT_VARIANT = {
    "ascent_rule": "normalized",
    "descent": "last",
    "direction": "gradient",
    "method": "sam",
    "reuse": "looksam",
}


def _knob(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = list(choices)
    return field(default=default, metadata=metadata)


def _chosen(kind: str, help: str) -> Any:
    """A field naming a registered variant: its help lists the built-in ones with their summaries."""
    listed = "; ".join(f"'{v.name}': {v.summary}" for v in variants.variants(kind))
    text = f"{help} {listed}; or a variant registered with hf_sam.register."
    return field(default=_DEFAULT_VARIANT[kind], metadata={"help": text, "choices": variants.RegisteredNames(kind)})


# a variant's options are declared once, with the variant; SAMConfig inherits them (built-ins only: a user's
# variant takes its options through ``options``)
_OPTION_BASES = tuple(dict.fromkeys(v.options for v in variants.builtin_variants() if v.options is not None))


@dataclass
class _CoreKnobs:
    """The knobs of every SAM step (the variants' options follow them in :class:`SAMConfig`)."""

    ascent_steps: int = _knob(
        1,
        "Number k >= 0 of ascent steps before the descent. 0 = no ascent: exactly the stock Trainer (the baseline "
        "of every comparison).",
    )
    rho: float = _knob(0.05, "Radius rho > 0 of the neighbourhood.")
    ascent_rule: str = _chosen("ascent_rule", "How each ascent step is taken.")
    adaptive: bool = _knob(
        False,
        "ASAM: T = |w| + sam_adaptive_eta elementwise for every trainable parameter; each step is a T^2 g / "
        "||T g||, and 'projected' projects onto ||d / T|| <= rho.",
    )
    adaptive_eta: float = _knob(0.01, "The eta of ASAM (>= 0; sam_adaptive only).")
    descent: str = _chosen("descent", "Which gradient the descent step takes.")
    direction: str = _chosen("direction", "The vector each ascent step normalizes.")
    method: str = _chosen("method", "The whole step.")
    options: dict | str | None = _knob(
        None,
        "The options of a variant registered with hf_sam.register (a dict, or its JSON on the command line, as "
        "--lr_scheduler_kwargs); a built-in variant's options are flags of their own.",
    )
    sync_ascent: bool = _knob(
        False,
        "DDP: all-reduce the ascent gradients (one perturbation for all ranks) instead of perturbing per device; "
        "required under FSDP2 and DeepSpeed.",
    )
    replay_rng: bool = _knob(
        False,
        "Run every ascent and descent pass with the clean pass's random state (the same dropout masks), so that "
        "sam/sharpness measures the perturbation, not dropout noise.",
    )
    diagnostics: bool = _knob(
        False,
        "Also log the loss and gradient norm at every ascent point, the cosines between successive ascent "
        "gradients and between the first ascent and the descent gradient, and under autocast the perturbation's "
        "fidelity (slower).",
    )
    every_n_steps: int = _knob(
        1,
        "SAM at optimizer steps 0, n, 2n, ..; one forward+backward pass (the stock step) at the others (1 = SAM at "
        "every step).",
    )
    reuse: str = _chosen("reuse", "What the one-pass steps of sam_every_n_steps > 1 add from the SAM steps.")
    rho_schedule: str = _knob(
        "constant",
        "'constant' or 'lr' (GSAM's: rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min) over the "
        "run's learning-rate schedule, for every method).",
        RHO_SCHEDULES,
    )
    rho_min: float = _knob(0.0, "The smallest rho of sam_rho_schedule lr (in [0, sam_rho]).")
    start_step: float = _knob(
        0,
        "SAM late in training: the optimizer steps before it are the stock Trainer's (one pass each, bit for bit), "
        "SAM runs from it on. An integer step, or a float in [0, 1) as a fraction of the run's steps, rounded up "
        "(as --warmup_steps). With sam_every_n_steps the SAM steps are still the multiples of n; refused with "
        "sam_method lookbehind.",
    )
    perturbed_weights: str = _knob(
        "auto",
        "Where the passes' perturbed weights live: 'swap' (a second buffer the parameters point at; w is never "
        "written, so there is no snapshot or restore copy), 'copy' (the parameters, after a snapshot that is "
        "copied back) or 'auto' (swap, except for FSDP2 shards, parameters sharing storage, DeepSpeed and "
        "CUDA-graph compile modes, where a parameter's storage must stay put).",
        PERTURBED_WEIGHTS,
    )


# the core knobs first, then each built-in variant's options in declared order (a dataclass lists its bases' fields
# from the last base of its MRO)
@dataclass
class SAMConfig(*reversed(_OPTION_BASES), _CoreKnobs):
    """The multi-step SAM hyper-parameters, without the ``sam_`` prefix of the CLI. Each field's meaning is its
    ``metadata["help"]``, the text of its ``--sam_<name>`` flag and of the flag reference in docs/usage.md."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "") -> None:
        """Raise a ValueError naming the field (with ``prefix``) and what is allowed."""

        def fail(name: str, value: object, allowed: str) -> None:
            raise ValueError(f"{prefix}{name}={value!r} is invalid: {allowed}.")

        k = self.ascent_steps
        if isinstance(k, bool) or not isinstance(k, int):
            fail("ascent_steps", k, "it must be an integer >= 0 (0 = plain training)")
        if k < 0:
            fail("ascent_steps", k, "it must be an integer >= 0 (0 = plain training)")
        for name in ("rho", "adaptive_eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, value, "it must be a number")
            if value != value or value in (float("inf"), float("-inf")):
                fail(name, value, "it must be finite")
        if k >= 1 and not self.rho > 0:
            fail("rho", self.rho, f"it must be > 0 when {prefix}ascent_steps >= 1")
        if self.rho < 0:
            fail("rho", self.rho, "it must be >= 0")
        if self.perturbed_weights not in PERTURBED_WEIGHTS:
            fail("perturbed_weights", self.perturbed_weights, f"allowed values are {', '.join(PERTURBED_WEIGHTS)}")
        if self.adaptive_eta < 0:
            fail("adaptive_eta", self.adaptive_eta, "it must be >= 0")
        for name in ("adaptive", "sync_ascent", "replay_rng", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "it must be True or False")
        if self.adaptive_eta != 0.01 and not self.adaptive:
            fail(
                "adaptive_eta",
                self.adaptive_eta,
                f"it is used only by ASAM ({prefix}adaptive=True); leave it at 0.01 or turn ASAM on",
            )
        self._validate_variants(fail, prefix)
        self._validate_start_step(fail, prefix)
        validate_family(self, fail, prefix)
        self._validate_method(fail, prefix)
        if k == 0 and self.adaptive:
            fail("adaptive", self.adaptive, f"ASAM needs {prefix}ascent_steps >= 1")

    def _validate_variants(self, fail, prefix: str) -> None:
        """Each chosen variant is registered, has its options in range, and gets an ascent when it needs one; an
        option of a variant not chosen is refused rather than ignored silently."""
        chosen = {kind: self.variant(kind, fail) for kind in VARIANT_KINDS}
        active = self.active_kinds()
        for variant in variants.builtin_variants():  # every option in its range, chosen or not
            variant.make_options({f.name: getattr(self, f.name) for f in variant.option_fields()}, fail, prefix)
        inactive = f"{prefix}every_n_steps > 1"  # where the one inactive kind, reuse, acts
        for kind in VARIANT_KINDS:
            if kind not in active and getattr(self, kind) != _DEFAULT_VARIANT[kind]:
                fail(kind, getattr(self, kind), f"it is used only by {inactive}")
        for variant in variants.builtin_variants():
            if chosen[variant.kind] is variant and variant.kind in active:
                continue
            owner = inactive if chosen[variant.kind] is variant else f"{prefix}{variant.kind}='{variant.name}'"
            for f in variant.option_fields():
                if getattr(self, f.name) != f.default:
                    fail(f.name, getattr(self, f.name), f"it is used only by {owner}")
        extra = self.user_options(fail)
        claimed: set[str] = set()
        for kind in active:
            self.variant_options(kind, fail, prefix, extra)
            if not variants.is_builtin(chosen[kind]):
                claimed |= {f.name for f in chosen[kind].option_fields()}
        for name, value in extra.items():
            if name not in claimed:
                fail(f"options['{name}']", value, "no chosen variant registered by the user takes it")
        if self.ascent_steps == 0:
            for kind in active:
                if chosen[kind].needs_ascent:
                    fail(kind, chosen[kind].name, f"it needs {prefix}ascent_steps >= 1")

    def active_kinds(self) -> tuple[str, ...]:
        """The kinds whose chosen variant takes part in a step: all of them, but ``reuse`` only with
        ``every_n_steps`` > 1 (the one-pass steps it acts in)."""
        n = self.every_n_steps
        every_n = isinstance(n, int) and not isinstance(n, bool) and n > 1
        return tuple(kind for kind in VARIANT_KINDS if kind != "reuse" or every_n)

    def variant(self, kind: str, fail=None) -> variants.Variant:
        """The registered variant this config chooses for ``kind`` (a field of :data:`VARIANT_KINDS`)."""
        try:
            return variants.lookup(kind, getattr(self, kind))
        except ValueError:
            if fail is None:
                raise
            fail(kind, getattr(self, kind), f"allowed values are {', '.join(variants.names(kind))}")
            raise

    def user_options(self, fail=None) -> dict[str, Any]:
        """``options`` as a dict (a JSON string from a command line is parsed)."""
        options = self.options
        if options is None:
            return {}
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as error:
                if fail is None:
                    raise
                fail("options", self.options, f"it must be a JSON object ({error})")
        if not isinstance(options, dict):
            if fail is None:
                raise TypeError("options must be a dict")
            fail("options", self.options, "it must be a dict (or a JSON object)")
        return dict(options)

    def variant_options(self, kind: str, fail=None, prefix: str = "", extra: dict | None = None) -> Any:
        """The options object of the chosen ``kind`` variant (checked): a built-in's from this config's fields, a
        user's from ``options``."""
        variant = self.variant(kind)
        if fail is None:

            def fail(name: str, value: object, allowed: str) -> None:
                raise ValueError(f"{prefix}{name}={value!r} is invalid: {allowed}.")

        if variants.is_builtin(variant):
            values = {f.name: getattr(self, f.name) for f in variant.option_fields()}
            return variant.make_options(values, fail, prefix)
        given = self.user_options(fail) if extra is None else extra
        values = {f.name: given[f.name] for f in variant.option_fields() if f.name in given}
        outer = fail
        return variant.make_options(
            values, lambda name, value, allowed: outer(f"options['{name}']", value, allowed), prefix
        )

    def build(self, kind: str) -> Any:
        """The object the engine calls for ``kind`` ("ascent_rule", "descent", "direction" or "reuse"), with its
        options."""
        return self.variant(kind).build(self.variant_options(kind), self.rho)

    def _validate_start_step(self, fail, prefix: str) -> None:
        start = self.start_step
        shape = "an integer step or a fraction in [0, 1) of the run's steps"
        if isinstance(start, bool) or not isinstance(start, (int, float)) or start != start:
            fail("start_step", start, f"it must be a number: {shape}")
        if start < 0:
            fail("start_step", start, f"it must be >= 0: {shape}")
        if start >= 1 and start != int(start):
            fail("start_step", start, f"it must be {shape}")
        if start and self.ascent_steps == 0:
            fail("start_step", start, f"it is used only by {prefix}ascent_steps >= 1")
        if start and self.method == "lookbehind":
            fail("start_step", start, f"{prefix}method='lookbehind' keeps slow weights across its steps: not supported")

    def first_sam_step(self, max_steps: int) -> int:
        """The optimizer step (0-based) SAM starts at, in a run of ``max_steps`` steps."""
        start = self.start_step
        return int(start) if start >= 1 or start == 0 else math.ceil(max_steps * start)

    def _validate_method(self, fail, prefix: str) -> None:
        if self.method == "sam":
            return
        if self.method == "msam":
            if self.ascent_steps != 1:
                fail("ascent_steps", self.ascent_steps, f"{prefix}method='msam' makes one pass: it needs 1")
            # MSAM's perturbation comes from the optimizer's momentum: no ascent pass, no descent choice
            for name in (
                "ascent_rule",
                "descent",
                "direction",
                "every_n_steps",
                "sync_ascent",
                "replay_rng",
                "diagnostics",
            ):
                if getattr(self, name) != _default(name):
                    fail(name, getattr(self, name), f"{prefix}method='msam' has no ascent pass to apply it to")
            return
        # Lookbehind has its own ascent (k steps of rho) and descent (optimizer steps on fast weights)
        for name in ("ascent_rule", "descent", "adaptive", "sync_ascent", "diagnostics", "direction", "every_n_steps"):
            if getattr(self, name) != _default(name):
                fail(name, getattr(self, name), f"{prefix}method={self.method!r} has its own ascent and descent")

    @classmethod
    def from_fields(cls, prefix: str = "", **values: object) -> SAMConfig:
        """Build and validate a config whose error messages name fields as ``prefix + name``."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"SAMConfig got unknown fields: {sorted(unknown)}")
        config = cls.__new__(cls)
        for f in fields(cls):
            setattr(config, f.name, values.get(f.name, f.default))
        config.validate(prefix)
        return config

    def engine_kwargs(self) -> dict:
        """The keyword arguments of :class:`hf_sam.engine.MultiStepAscent` for this config: the core knobs, and the
        rule, descent and direction built with their options (with ``every_n_steps`` > 1 the descent is the reuse
        variant's: SAM's, remembering what the one-pass steps reuse)."""
        descent = "reuse" if self.every_n_steps > 1 else "descent"
        return {
            "ascent_steps": self.ascent_steps,
            "rho": self.rho,
            "adaptive": self.adaptive,
            "adaptive_eta": self.adaptive_eta,
            "perturbed_weights": self.perturbed_weights,
            "track_directions": self.diagnostics,
            "ascent_rule": self.build("ascent_rule"),
            "descent": self.build(descent),
            "direction": self.build("direction"),
        }

    @property
    def step_size(self) -> float:
        """The length a of each ascent step, in the rule's norm."""
        return self.build("ascent_rule").step_size(self.rho, max(self.ascent_steps, 1))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _default(name: str) -> Any:
    return next(f.default for f in fields(SAMConfig) if f.name == name)
