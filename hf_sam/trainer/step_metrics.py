"""The ``sam/*`` metrics: declared once in :data:`METRICS` (how each combines over a logging window's micro-batches
and over the ranks), kept per micro-batch as the device tensors they are, summed and read once per logging step (no
kernel runs for them inside a step). SAM's step, Lookbehind and MSAM record through the same object."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..engine.ascent import MultiStepAscent
from ..engine.ascent_record import AscentRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """A ``sam/*`` metric. ``name``: its key, or the prefix of a numbered family (ending in "_"). ``per``: "step"
    (summed over a step's micro-batches, then averaged over the SAM steps: a loss, as the Trainer reports "loss") or
    "micro-batch" (averaged over the micro-batches). ``ranks``: "mean" (every rank has it: averaged over the
    ranks) or "local" (this rank's; it may be missing on another)."""

    name: str
    per: str
    ranks: str
    meaning: str


METRICS = (
    Metric("sam/loss_clean", "step", "mean", "the loss at w"),
    Metric("sam/loss_perturbed", "step", "mean", "the loss at w + d_k (sam/sharpness is the difference)"),
    Metric("sam/grad_norm", "micro-batch", "mean", "||g|| of the clean gradient (unscaled under fp16)"),
    Metric("sam/perturbation_norm", "micro-batch", "mean", "||d_k|| in the rule's norm (MSAM: rho)"),
    Metric("sam/xsam_alpha", "micro-batch", "local", "XSAM's alpha"),
    Metric("sam/xsam_angle", "micro-batch", "local", "XSAM: the angle between d_k and g_k, in degrees"),
    Metric("sam/lookbehind_alpha", "micro-batch", "local", "Lookbehind: the slow weights' step"),
    Metric("sam/ascent_loss_", "step", "local", "diagnostics: the loss at w + d_i"),
    Metric("sam/ascent_grad_norm_", "micro-batch", "local", "diagnostics: ||g_i||"),
    Metric("sam/cos_successive", "micro-batch", "local", "diagnostics: cos(g_i, g_i+1), mean over i"),
    Metric("sam/cos_first_descent", "micro-batch", "local", "diagnostics: cos(g_1, the descent gradient)"),
    Metric("sam/perturbation_fidelity", "micro-batch", "local", "autocast: what the kernels see of d_k"),
    Metric("sam/perturbation_fidelity_norm_ratio", "micro-batch", "local", "autocast: their ||d|| / ||d_k||"),
)


# what read() derives from the recorded values, for the docs' table
DERIVED = (
    ("sam/sharpness", "sam/loss_perturbed - sam/loss_clean"),
    ("sam/passes", "forward+backward passes per optimizer step: k + 1 per micro-batch for SAM, fewer for LookSAM, "
     "MSAM and the steps before sam_start_step"),
    ("sam/skipped_ascents", "total ascents dropped for a non-finite gradient norm (SAM's step)"),
    ("sam/zero_gradient_ascents", "total ascents with a zero gradient (SAM's step)"),
)  # fmt: skip


def declared(key: str) -> Metric:
    """The declaration of ``key``; a metric no one declared is an error, not a silent per-rank value."""
    for metric in METRICS:
        if key == metric.name or (metric.name.endswith("_") and key.startswith(metric.name) and key[-1].isdigit()):
            return metric
    raise KeyError(f"{key!r} is not declared in hf_sam.trainer.step_metrics.METRICS")


def _unscaled(norm: float, loss_scale: torch.Tensor | None) -> float | torch.Tensor:
    """A gradient norm of loss-scaled (fp16) gradients, unscaled for the logs without a host sync."""
    return norm if loss_scale is None else norm / loss_scale.double()


class SAMStepMetrics:
    """Accumulates what each SAM micro-batch measured until the next logging step, on the device."""

    def __init__(self, diagnostics: bool) -> None:
        self.diagnostics = diagnostics
        self._skipped: torch.Tensor | int = 0  # totals over the whole run, summed on the device
        self._zero_gradient: torch.Tensor | int = 0
        self._pending: list[AscentRecord] = []  # records not yet added to the totals
        self._skipped_warned = 0
        self._passes = 0  # forward+backward passes since the last log
        self._passes_since: int | None = None  # the optimizer step they were counted from
        self._recorded = False  # SAM's step recorded an ascent (Lookbehind and MSAM add their own values only)
        self._reset()

    def count_passes(self, passes: int, global_step: int) -> None:
        """A micro-batch made ``passes`` forward+backward passes (at optimizer step ``global_step``)."""
        if self._passes_since is None:
            self._passes_since = global_step
        self._passes += passes

    def read_passes(self, global_step: int) -> dict[str, float]:
        """``sam/passes``: forward+backward passes per optimizer step since the last call (and reset)."""
        if self._passes_since is None:
            return {}
        steps = max(global_step - self._passes_since, 1)
        out = {"sam/passes": self._passes / steps}
        self._passes, self._passes_since = 0, global_step
        return out

    @property
    def skipped_ascents(self) -> int:
        self._fold()
        return int(self._skipped)  # reads the device

    @property
    def zero_gradient_ascents(self) -> int:
        self._fold()
        return int(self._zero_gradient)

    def _fold(self) -> None:
        """Add the pending records to the totals: their kernels run here, not in every step."""
        if not self._pending:
            return
        records, self._pending = self._pending, []
        self._sum_values()
        self._skipped = self._skipped + torch.stack([r.dropped for r in records]).sum()
        self._zero_gradient = self._zero_gradient + torch.stack([r.zero & ~r.moved for r in records]).sum()

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._values: dict[str, list[torch.Tensor | float]] = {}  # per micro-batch, not yet in the sums
        self._counts: dict[str, int] = {}
        self._micro_batches = 0
        self._sam_steps: set[int] = set()  # the optimizer steps whose micro-batches SAM recorded

    def record(
        self,
        engine: MultiStepAscent,
        clean: torch.Tensor,
        perturbed: torch.Tensor,
        pass_losses: list[torch.Tensor],
        loss_scale: torch.Tensor | None,
        global_step: int,
        measured: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """One micro-batch's values; ``measured``: what a probe measured at the perturbed point (diagnostics)."""
        ascent = engine.record
        values = {
            "sam/loss_clean": clean.detach(),
            "sam/loss_perturbed": perturbed.detach(),
            "sam/grad_norm": _unscaled(ascent.grad_norms[0] if ascent.grad_norms else 0.0, loss_scale),
            "sam/perturbation_norm": 0.0 if engine.perturbation_norm is None else engine.perturbation_norm,
        }
        if engine.xsam_alpha is not None and engine.xsam_angle is not None:  # XSAM
            values["sam/xsam_alpha"] = engine.xsam_alpha
            values["sam/xsam_angle"] = engine.xsam_angle
        if self.diagnostics:
            values.update(self._diagnostic_values(engine, perturbed, pass_losses, loss_scale))
            values.update(measured or {})
        self.add(values, global_step)
        self._recorded = True
        self._pending.append(ascent)
        if len(self._pending) >= 1024:  # logging steps far apart: keep the memory bounded
            self._fold()

    def add(self, values: dict[str, object], global_step: int) -> None:
        """One micro-batch's declared values (a whole-step method's own: Lookbehind's alpha, MSAM's norm)."""
        for key, value in values.items():
            declared(key)
            self._values.setdefault(key, []).append(value)
            self._counts[key] = self._counts.get(key, 0) + 1
        self._micro_batches += 1
        self._sam_steps.add(global_step)

    def _sum_values(self) -> None:
        """Add the values kept since the last sum to the sums: one stack and sum per metric."""
        for key, kept in self._values.items():
            device = next((v.device for v in kept if isinstance(v, torch.Tensor)), torch.device("cpu"))
            parts = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in kept]
            total = torch.stack(parts).sum()
            self._sums[key] = self._sums.get(key, 0.0) + total
        self._values = {}

    @staticmethod
    def _diagnostic_values(
        engine: MultiStepAscent, perturbed: torch.Tensor, pass_losses: list[torch.Tensor], scale
    ) -> dict[str, object]:
        """Loss at each ascent point d_i, gradient norm at each step, and the direction cosines."""
        values: dict[str, object] = {}
        # losses[i] = L(w + d_i) (L(w) after a dropped or zero ascent: the weights did not move)
        for i, loss in enumerate([*pass_losses[1:], perturbed]):
            values[f"sam/ascent_loss_{i + 1}"] = loss.double()
        values["sam/ascent_loss_0"] = pass_losses[0].double()
        for i, norm in enumerate(engine.record.grad_norms):
            values[f"sam/ascent_grad_norm_{i + 1}"] = _unscaled(norm, scale)
        if engine.successive_cosines:
            values["sam/cos_successive"] = torch.stack(engine.successive_cosines).mean()
        if engine.descent_cosine is not None:
            values["sam/cos_first_descent"] = engine.descent_cosine
        return values

    def read(self, global_step: int, accelerator) -> dict[str, float]:
        """The metrics averaged since the last call (and reset); losses as the Trainer reports "loss".

        Losses are averaged over the optimizer steps SAM ran in (with ``sam_every_n_steps`` > 1, not every
        step of the logging window has them)."""
        steps = max(len(self._sam_steps), 1)
        n = self._micro_batches
        out: dict[str, float] = {}
        self._sum_values()
        if n:
            # the ranks-"mean" keys first, in one order on every rank, for one all-reduce
            keys = sorted(self._sums, key=lambda key: (declared(key).ranks != "mean", key))
            vec = torch.stack([torch.as_tensor(self._sums[key], dtype=torch.float64).reshape(()).cpu() for key in keys])
            if accelerator.num_processes > 1:
                shared = sum(declared(key).ranks == "mean" for key in keys)
                reduced = accelerator.reduce(vec[:shared].to(accelerator.device), reduction="mean").cpu()
                vec = torch.cat([reduced, vec[shared:]])
            for key, total in zip(keys, vec.tolist(), strict=True):
                if declared(key).per == "step":  # summed over a step's micro-batches, averaged over the SAM steps
                    out[key] = total / steps * n / self._counts[key]
                else:
                    out[key] = total / self._counts[key]
            if "sam/loss_perturbed" in out:
                out["sam/sharpness"] = out["sam/loss_perturbed"] - out["sam/loss_clean"]
        out.update(self.read_passes(global_step))
        if not self._recorded:  # a whole-step method: no ascent of the engine's to count
            self._reset()
            return out
        skipped = self.skipped_ascents
        if skipped > self._skipped_warned:
            logger.warning(
                "SAM: %d ascent(s) dropped up to step %d: non-finite gradient norm; those steps descended "
                "at the unperturbed weights.",
                skipped - self._skipped_warned,
                global_step,
            )
            self._skipped_warned = skipped
        out["sam/skipped_ascents"] = float(skipped)
        out["sam/zero_gradient_ascents"] = float(self.zero_gradient_ascents)
        self._reset()
        return out
