"""SAMConfig: every multi-step SAM knob, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .config_family import DIRECTIONS, GRANULARITIES, RHO_SCHEDULES, validate_family
from .engine import rules
from .engine.moved_weights import MODES as PERTURBED_WEIGHTS

ASCENT_RULES = rules.RULES
__all__ = ["ASCENT_RULES", "DESCENT_RULES", "DIRECTIONS", "GRANULARITIES", "METHODS", "RHO_SCHEDULES", "SAMConfig"]
METHODS = ("sam", "lookbehind", "msam")
DESCENT_RULES = ("last", "mean", "xsam", "gsam", "wsam")


@dataclass
class SAMConfig:
    """The multi-step SAM hyper-parameters, without the ``sam_`` prefix of the CLI.

    ascent_steps: k >= 0 ascent passes before the descent pass; 0 is plain training.
    rho: radius of the neighbourhood (> 0 when k >= 1).
    ascent_rule: "normalized" (step rho/k), "projected" (step step_mult*rho, then project
        onto the rho-ball) or "accumulated" (step rho, no projection).
    step_mult: step size of "projected" in units of rho.
    adaptive: ASAM, scale by T = |w| + adaptive_eta elementwise.
    descent: "last" (gradient at w+d_k), "mean" (mean of the gradients at w+d_1..w+d_k),
        "xsam" (||g_k|| times the spherical interpolation u(alpha) between d_k and g_k, XSAM),
        "gsam" (GSAM: g_s - gsam_alpha times the part of the clean gradient g orthogonal to g_s) or
        "wsam" (WSAM: g + a (g_s - g), a = wsam_gamma / (1 - wsam_gamma); with wsam_decouple the
        optimizer steps with g and the weights then move by -lr a (g_s - g)).
    gsam_alpha, wsam_gamma, wsam_decouple: GSAM's alpha (>= 0), WSAM's gamma in [0, 1) and mode.
    direction: "gradient" or "friendly" (F-SAM: every ascent gradient minus friendly_sigma times a
        momentum m of the clean gradients, m <- friendly_lambda m + (1 - friendly_lambda) g).
    friendly_sigma, friendly_lambda: F-SAM's sigma (>= 0) and lambda in [0, 1).
    every_n_steps: optimizer steps 0, n, 2n, .. are SAM steps; the others make one pass (LookSAM's
        schedule); reuse_alpha > 0 adds reuse_alpha ||g|| / ||g_v|| g_v to those, g_v the part of
        the last SAM step's g_s orthogonal to its g, over all tensors or per tensor
        (reuse_granularity "global" or "tensor").
    rho_schedule: "constant" or "lr" (GSAM's: rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) /
        (lr_max - lr_min) over the run's learning-rate schedule), with rho_min in [0, rho].
    xsam_alpha: XSAM's fixed alpha (>= 0; 1 is SAM's descent), or None to choose it at the first
        optimizer step of every epoch among 0, 0.1, .., xsam_alpha_max by the largest loss at
        w + xsam_rho_max u(alpha).
    xsam_alpha_max: the largest alpha of the dynamic choice.
    xsam_rho_max: the radius of the dynamic choice's points (None: 2 rho).
    method: "sam" (everything above), "lookbehind" (Lookbehind-SAM: k ascent steps of rho, an
        optimizer step of fast weights after each, then the slow weights move by lookbehind_alpha
        towards the fast ones; see :mod:`hf_sam.engine.lookbehind`) or "msam" (Momentum-SAM: one
        pass at w - rho v / ||v||, v the optimizer's momentum; k = 1).
    lookbehind_alpha: Lookbehind's alpha in (0, 1], or None for the adaptive per-tensor alpha.
    start_step: SAM late in training: optimizer steps before it are the stock Trainer's (one pass), SAM
        runs from it on; an integer step, or a float in [0, 1) as a fraction of the run's steps (rounded
        up, as ``warmup_steps``). 0: SAM from the first step.
    sync_ascent: under DDP, all-reduce the ascent gradients (one perturbation for all ranks).
    replay_rng: run every ascent and descent pass with the random state of the clean pass (the same
        dropout masks), so that the loss difference is the perturbation's alone.
    diagnostics: log the loss and gradient norm at every ascent point and the cosines between
        the ascent and descent gradients (costs two gradient copies and a few reductions).
    perturbed_weights: where the passes' perturbed weights live: "swap" (a second buffer the
        parameters point at, w never written: no restore copy), "copy" (the parameters themselves,
        after a snapshot) or "auto" (swap where it is safe; see :mod:`hf_sam.engine.moved_weights`).
    """

    ascent_steps: int = 1
    rho: float = 0.05
    ascent_rule: str = "normalized"
    step_mult: float = 1.0
    adaptive: bool = False
    adaptive_eta: float = 0.01
    descent: str = "last"
    sync_ascent: bool = False
    replay_rng: bool = False
    diagnostics: bool = False
    xsam_alpha: float | None = None
    xsam_alpha_max: float = 2.0
    xsam_rho_max: float | None = None
    method: str = "sam"
    lookbehind_alpha: float | None = 0.5
    gsam_alpha: float = 0.4
    wsam_gamma: float = 0.9
    wsam_decouple: bool = True
    direction: str = "gradient"
    friendly_sigma: float = 1.0
    friendly_lambda: float = 0.9
    every_n_steps: int = 1
    reuse_alpha: float = 0.0
    reuse_granularity: str = "global"
    rho_schedule: str = "constant"
    rho_min: float = 0.0
    perturbed_weights: str = "auto"
    start_step: float = 0

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
        for name in ("rho", "step_mult", "adaptive_eta"):
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
        if self.ascent_rule not in ASCENT_RULES:
            fail("ascent_rule", self.ascent_rule, f"allowed values are {', '.join(ASCENT_RULES)}")
        if self.descent not in DESCENT_RULES:
            fail("descent", self.descent, f"allowed values are {', '.join(DESCENT_RULES)}")
        if not self.step_mult > 0:
            fail("step_mult", self.step_mult, "it must be > 0")
        if self.adaptive_eta < 0:
            fail("adaptive_eta", self.adaptive_eta, "it must be >= 0")
        for name in ("adaptive", "sync_ascent", "replay_rng", "diagnostics", "wsam_decouple"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "it must be True or False")
        # Options that only mean something for another setting: refuse rather than ignore silently.
        if self.step_mult != 1.0 and self.ascent_rule != "projected":
            fail(
                "step_mult",
                self.step_mult,
                f"it is used only by {prefix}ascent_rule='projected' (got {self.ascent_rule!r}); "
                "leave it at 1.0 or switch the rule",
            )
        if self.adaptive_eta != 0.01 and not self.adaptive:
            fail(
                "adaptive_eta",
                self.adaptive_eta,
                f"it is used only by ASAM ({prefix}adaptive=True); leave it at 0.01 or turn ASAM on",
            )
        if k == 0 and self.descent in ("mean", "xsam"):
            fail("descent", self.descent, f"'{self.descent}' needs {prefix}ascent_steps >= 1")
        self._validate_xsam(fail, prefix)
        self._validate_start_step(fail, prefix)
        validate_family(self, fail, prefix)
        self._validate_method(fail, prefix)
        if k == 0 and self.adaptive:
            fail("adaptive", self.adaptive, f"ASAM needs {prefix}ascent_steps >= 1")

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
        if self.method not in METHODS:
            fail("method", self.method, f"allowed values are {', '.join(METHODS)}")
        alpha = self.lookbehind_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            fail("lookbehind_alpha", alpha, "it must be in (0, 1], or None for the adaptive alpha")
        if self.method != "lookbehind" and alpha != 0.5:
            fail("lookbehind_alpha", alpha, f"it is used only by {prefix}method='lookbehind'")
        if self.method == "sam":
            return
        if self.method == "msam":
            if self.ascent_steps != 1:
                fail("ascent_steps", self.ascent_steps, f"{prefix}method='msam' makes one pass: it needs 1")
            # MSAM's perturbation comes from the optimizer's momentum: no ascent pass, no descent choice
            for name, default in (
                ("ascent_rule", "normalized"), ("descent", "last"), ("step_mult", 1.0), ("direction", "gradient"),
                ("every_n_steps", 1), ("sync_ascent", False), ("replay_rng", False), ("diagnostics", False),
            ):  # fmt: skip
                if getattr(self, name) != default:
                    fail(name, getattr(self, name), f"{prefix}method='msam' has no ascent pass to apply it to")
            return
        if self.ascent_steps < 1:
            fail("method", self.method, f"'lookbehind' needs {prefix}ascent_steps >= 1")
        # Lookbehind has its own ascent (k steps of rho) and descent (optimizer steps on fast weights)
        for name, default in (
            ("ascent_rule", "normalized"), ("descent", "last"), ("adaptive", False), ("step_mult", 1.0),
            ("sync_ascent", False), ("diagnostics", False), ("direction", "gradient"), ("every_n_steps", 1),
        ):  # fmt: skip
            if getattr(self, name) != default:
                fail(name, getattr(self, name), f"{prefix}method='lookbehind' has its own ascent and descent")

    def _validate_xsam(self, fail, prefix: str) -> None:
        for name in ("xsam_alpha", "xsam_rho_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
                fail(name, value, "it must be a number or None")
        if not isinstance(self.xsam_alpha_max, (int, float)) or isinstance(self.xsam_alpha_max, bool):
            fail("xsam_alpha_max", self.xsam_alpha_max, "it must be a number")
        if self.descent != "xsam":
            for name, default in (("xsam_alpha", None), ("xsam_alpha_max", 2.0), ("xsam_rho_max", None)):
                if getattr(self, name) != default:
                    fail(name, getattr(self, name), f"it is used only by {prefix}descent='xsam'")
            return
        if self.xsam_alpha is not None and not 0 <= self.xsam_alpha < float("inf"):
            fail("xsam_alpha", self.xsam_alpha, "it must be >= 0 and finite (or None for the dynamic choice)")
        if not 0 < self.xsam_alpha_max < float("inf"):
            fail("xsam_alpha_max", self.xsam_alpha_max, "it must be > 0 and finite")
        if self.xsam_rho_max is not None and not 0 < self.xsam_rho_max < float("inf"):
            fail("xsam_rho_max", self.xsam_rho_max, "it must be > 0 and finite")

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
        """The keyword arguments of :class:`hf_sam.engine.MultiStepAscent` for this config."""
        kwargs = self.to_dict()
        kwargs.pop("sync_ascent")
        kwargs.pop("replay_rng")
        kwargs.pop("xsam_alpha_max")
        kwargs.pop("method")
        kwargs.pop("lookbehind_alpha")
        kwargs.pop("start_step")  # the trainer's: which steps are SAM steps
        for name in ("every_n_steps", "reuse_alpha", "reuse_granularity", "rho_schedule", "rho_min"):
            kwargs.pop(name)  # the trainer's (which steps are SAM steps, and their rho)
        if self.descent == "xsam":
            kwargs["xsam_alpha"] = 1.0 if self.xsam_alpha is None else float(self.xsam_alpha)  # chosen at step 1
        else:
            kwargs.pop("xsam_alpha")
            kwargs.pop("xsam_rho_max")
        kwargs["track_directions"] = kwargs.pop("diagnostics")
        return kwargs

    @property
    def step_size(self) -> float:
        """The length a of each ascent step, in the rule's norm."""
        return rules.step_size(self.ascent_rule, self.rho, max(self.ascent_steps, 1), self.step_mult)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
