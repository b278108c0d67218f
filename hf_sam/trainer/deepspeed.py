"""SAM under DeepSpeed ZeRO (stages 0-3): the passes backend for an engine that owns backward, the
gradient partitions and the optimizer step.

DeepSpeed's engine steps the optimizer inside accelerate's ``backward`` and keeps gradients in its own
partitions, so each SAM pass is driven here instead (checked on DeepSpeed 0.19.8):

- every pass runs ``engine.backward(loss)`` at a gradient-accumulation boundary (so that the engine
  reduces the gradient over all ranks now; ZeRO-2 keeps non-boundary gradients in a private buffer)
  and never ``engine.step()``, except after the descent;
- the ascent gradient is read with ``deepspeed.utils.safe_get_full_grad`` on every rank (the full,
  all-ranks gradient: the ascent is synchronized) and the engine's buffers are cleared with
  ``engine.optimizer.zero_grad()``;
- the SAM engine perturbs the parameters the forward uses (under ZeRO-3 inside
  ``deepspeed.zero.GatheredParameters``, which writes the change back to every rank's partition); the
  fp32 master weights of ZeRO-1/2/3 are never written;
- after the descent backward the weights are restored bit for bit, a descent other than SAM's own
  writes its gradient back with ``safe_set_full_grad``, and only then does ``engine.step()`` run;
- with gradient accumulation, each micro-batch gets its own perturbation from its all-ranks gradient (every
  pass is reduced at once, as with one micro-batch); the descent gradients of the micro-batches before the
  step's last wait in :class:`HeldDescent` (the engine's buffers are cleared for the next ascent), and the
  last one's descent adds them before writing the sum back and stepping. The loss comes divided by the
  accumulation steps from the Trainer (``scale_wrt_gas=False``, as the Trainer's own backward passes).

What this gathers, per rank and per pass: the full gradient (``safe_get_full_grad``; under ZeRO-1/2
one all-reduce of each parameter's size), and under ZeRO-3 the full parameters for the SAM update;
SAM's snapshot is one full fp32 copy of the trainable weights on every rank, and under accumulation the
held descent sum one full fp32 gradient.

Mixed precision is DeepSpeed's ``torch_autocast`` (``deepspeed_precision.py``); 16-bit parameter storage is
refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..engine.ascent import MultiStepAscent
from .deepspeed_precision import check_precision, map_bf16_onto_autocast
from .passes import Backward


def zero_stage(trainer: Any) -> int:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def check_deepspeed(trainer: Any) -> None:
    """What SAM under DeepSpeed can make exact; the rest refused before training, naming the flag."""
    config = trainer.sam_config
    ds_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    if not config.sync_ascent:
        raise ValueError(
            "SAMTrainer under DeepSpeed needs --sam_sync_ascent true: ZeRO reduces every backward's gradient over "
            "all ranks (it cannot skip the sync), so the ascent is the all-ranks gradient, one perturbation for "
            "all ranks, as --sam_sync_ascent gives under DDP."
        )
    map_bf16_onto_autocast(trainer)
    check_precision(trainer)
    zero = ds_config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", None):
            raise ValueError(f"SAMTrainer under DeepSpeed does not support ZeRO's {key} (not proven exact).")
    if config.descent == "wsam" and config.wsam_decouple:
        raise ValueError(
            "sam_descent='wsam' with sam_wsam_decouple=true is not supported under DeepSpeed: its update after the "
            "optimizer step would move the module's parameters, while ZeRO steps its own fp32 partitions and "
            "writes them back over the parameters. Use --sam_wsam_decouple false (the coupled WSAM)."
        )
    if config.descent == "xsam" and config.xsam_alpha is None:
        raise ValueError(
            "sam_descent='xsam' with the dynamic alpha (sam_xsam_alpha unset) is not supported under DeepSpeed: "
            "choosing alpha evaluates the loss at weights outside the SAM passes, which ZeRO does not gather for "
            "it. Set a fixed --sam_xsam_alpha (for example 0.5)."
        )
    if config.every_n_steps > 1 and config.reuse_alpha > 0:
        raise ValueError(
            "sam_reuse_alpha > 0 (LookSAM) is not supported under DeepSpeed yet: its cheap steps add the reused "
            "term to the accumulated gradient, which ZeRO keeps in its own partitions. --sam_every_n_steps without "
            "reuse runs (its cheap steps are the stock step)."
        )
    # every rank holds the full all-ranks gradients and weights during a SAM update (DeepSpeedPasses), so the
    # descents that rewrite g_s (XSAM with a fixed alpha too), F-SAM's direction and the rho schedule run as
    # in one process
    for name, value, allowed in (
        ("sam_method", config.method, ("sam",)),
        ("sam_descent", config.descent, ("last", "mean", "gsam", "wsam", "xsam")),
        ("sam_direction", config.direction, ("gradient", "friendly")),
        ("sam_rho_schedule", config.rho_schedule, ("constant", "lr")),
    ):
        if value not in allowed:
            raise ValueError(
                f"{name}={value!r} is not supported under DeepSpeed yet (allowed: {', '.join(map(repr, allowed))}): "
                "its exact rule under ZeRO's partitioned gradients is not proven."
            )


def _padded(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 gradient flattened and zero-padded to whole partitions: DeepSpeed 0.19.8's
    ``set_fp32_grad_for_param`` takes the last rank's partition with its padding from the value it is
    given, so an unpadded value is too short on that rank."""
    import torch.distributed as dist

    size = param.ds_tensor.numel() * dist.get_world_size(group=param.ds_process_group)
    flat = torch.zeros(size, dtype=full.dtype, device=full.device)
    flat[: full.numel()] = full.reshape(-1)
    return flat


class HeldDescent:
    """The descent gradients of a step's micro-batches before its last, summed (full tensors), while the
    engine's buffers serve the next micro-batch's ascent. Lives on the trainer across micro-batches."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor | None] | None = None

    def add(self, grads: list[torch.Tensor | None]) -> None:
        if self.grads is None:
            self.grads = [None if g is None else g.clone() for g in grads]
            return
        for j, g in enumerate(grads):
            if g is not None:
                held = self.grads[j]
                self.grads[j] = g.clone() if held is None else held.add_(g)

    def take(self) -> list[torch.Tensor | None] | None:
        grads, self.grads = self.grads, None
        return grads


class DeepSpeedPasses:
    """The passes of one SAM micro-batch on a DeepSpeed engine (see the module)."""

    def __init__(
        self,
        ds_engine: Any,
        params: list[torch.nn.Parameter],
        stage: int,
        rewrites: bool,
        held: HeldDescent | None = None,
        last_micro_batch: bool = True,
    ) -> None:
        self.ds_engine = ds_engine
        self.params = params
        self.stage = stage
        self.rewrites = rewrites  # the descent changes g_s (mean): write the final gradient back
        self.held_descent = held if held is not None else HeldDescent()
        self.last_micro_batch = last_micro_batch  # the step's last: add the held descents and step
        self._grads: list[torch.Tensor | None] = []
        self._held: list[torch.Tensor | None] = []

    def _gathered(self, modify: bool) -> contextlib.AbstractContextManager:
        """ZeRO-3: the full parameters inside (written back to every partition when ``modify``)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=0 if modify else None)

    def _backward_at_boundary(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """The engine's backward, reduced over all ranks now, without a step; the full gradients."""
        from deepspeed.utils import safe_get_full_grad

        self.ds_engine.set_gradient_accumulation_boundary(True)
        self.ds_engine.backward(loss, scale_wrt_gas=False)  # the Trainer divided by the accumulation steps
        grads = [safe_get_full_grad(p) for p in self.params]  # collective: every rank calls it
        return [None if g is None else g.detach().clone() for g in grads]

    def begin(self, engine: MultiStepAscent) -> None:
        with self._gathered(modify=False):
            engine.begin()

    def ascent_backward(self, loss: torch.Tensor, backward: Backward) -> None:
        self._grads = self._backward_at_boundary(loss)
        self.ds_engine.optimizer.zero_grad()  # the ascent gradient must not reach the step

    def ascend(self, engine: MultiStepAscent) -> None:
        with self._gathered(modify=True):
            for p, g in zip(self.params, self._grads, strict=True):
                p.grad = g
            engine.ascend()
        self._grads = []

    def begin_descent(self, engine: MultiStepAscent) -> float | torch.Tensor:
        with self._gathered(modify=True):
            factor = engine.begin_descent()
            # what the descent folded into p.grad (mean's sum) waits aside: the engine's backward fills its own buffers
            self._held = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
        return factor

    def descent_backward(self, loss: torch.Tensor, backward: Backward) -> None:
        self._grads = self._backward_at_boundary(loss)

    def end_descent(self, engine: MultiStepAscent) -> None:
        """The descent gradient as autograd would have added it, the descent's last word, the weights back
        at w, the final gradient in the engine's partitions, then the optimizer step."""
        from deepspeed.utils import safe_set_full_grad

        with self._gathered(modify=True):
            for p, held, g in zip(self.params, self._held, self._grads, strict=True):
                p.grad = g if held is None else (held if g is None else held + g)
            engine.end_descent()
            final = [p.grad for p in self.params]
            engine.restore()  # before the step: ZeRO-0 steps the parameters themselves
            for p in self.params:
                p.grad = None
        if not self.last_micro_batch:  # its descent waits; the buffers serve the next micro-batch's ascent
            self.held_descent.add(final)
            self.ds_engine.optimizer.zero_grad()
            self._grads, self._held = [], []
            return
        earlier = self.held_descent.take()
        if earlier is not None:
            final = [e if g is None else (g if e is None else g + e) for g, e in zip(final, earlier, strict=True)]
        if self.rewrites or self.stage == 0 or earlier is not None:
            for p, g in zip(self.params, final, strict=True):
                if g is None:
                    continue
                if self.stage == 0:
                    p.grad = g  # ZeRO-0 keeps the (all-reduced) gradient in p.grad
                elif self.stage == 3:
                    safe_set_full_grad(p, _padded(p, g))
                else:
                    safe_set_full_grad(p, g)
        self._grads, self._held = [], []
        self.ds_engine.step()

    def restore(self, engine: MultiStepAscent) -> None:
        with self._gathered(modify=True):
            engine.restore()


def deepspeed_passes(trainer: Any, engine: MultiStepAscent) -> DeepSpeedPasses:
    """The backend of one micro-batch under DeepSpeed; the held descents live on the trainer across its
    micro-batches."""
    held = getattr(trainer, "_sam_held_descent", None)
    if held is None:
        held = trainer._sam_held_descent = HeldDescent()
    return DeepSpeedPasses(
        trainer.accelerator.deepspeed_engine_wrapped.engine,
        engine.params,
        zero_stage(trainer),
        rewrites=trainer.sam_config.descent != "last",
        held=held,
        last_micro_batch=trainer.accelerator.sync_gradients,  # the micro-batch the optimizer steps after
    )


def stock_pass(trainer: Any, stock: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The stock training step under DeepSpeed (SAM every n steps' cheap steps), with the accumulation
    boundary accelerate means: SAM's passes force it to True, and older accelerate releases (1.3 among them)
    let DeepSpeed's own count decide, so a cheap micro-batch would be taken for a boundary and ZeRO-1/2
    would overwrite the gradient accumulated so far."""

    def run() -> torch.Tensor:
        engine = trainer.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(trainer.accelerator.sync_gradients)
        return stock()

    return run
