"""SAM under DeepSpeed ZeRO (stages 0-3): the passes backend for an engine that owns backward, the
gradient partitions and the optimizer step.

DeepSpeed's engine steps the optimizer inside accelerate's ``backward`` and keeps gradients in its own
partitions, so each SAM pass is driven here instead (checked on DeepSpeed 0.19.8):

- every pass runs ``engine.backward(loss)`` at a gradient-accumulation boundary (so that the engine
  reduces the gradient over all ranks now; ZeRO-2 keeps non-boundary gradients in a private buffer)
  and never ``engine.step()``, except after the descent;
- the SAM engine works on this rank's parts only (:mod:`.partitions`): the ascent
  gradient is the rank's partition of the all-ranks gradient the boundary backward reduced (the ascent is
  synchronized), the norms are summed over the ranks, the engine's buffers are cleared with
  ``engine.optimizer.zero_grad()`` so that no ascent gradient reaches the step, and after each move the
  forward's parameters are refreshed as ZeRO refreshes them after its own step;
- after the descent backward the weights are restored bit for bit, a descent other than SAM's own (or
  accumulation) writes the rank's part of its gradient back into the partition, and only then does
  ``engine.step()`` run;
- with gradient accumulation, each micro-batch gets its own perturbation from its all-ranks gradient (every
  pass is reduced at once, as with one micro-batch); the descent gradients of the micro-batches before the
  step's last wait in :class:`HeldDescent` (the engine's buffers are cleared for the next ascent), and the
  last one's descent adds them before writing the sum back and stepping. The loss comes divided by the
  accumulation steps from the Trainer (``scale_wrt_gas=False``, as the Trainer's own backward passes).

What SAM holds per rank: its snapshot of w, the gradients it reads and, under accumulation, the held
descent sum, each the size of the rank's partition (ZeRO-0: of the whole model, which every rank holds).
What each micro-batch costs in communication: k + 1 backward reductions at a boundary (DeepSpeed's own,
one per pass), one scalar all-reduce per ascent step (the norm), and under ZeRO-1/2 k + 1 all-gathers of
the weights (after k - 1 ascent steps, before the descent and at the restore: as many as k + 1 optimizer
steps); under ZeRO-3 each pass gathers the parameters for its forward and backward anyway, and a refresh
re-gathers only the persistent ones.

Mixed precision is DeepSpeed's ``torch_autocast`` (:mod:`.precision`); 16-bit parameter storage is
refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...engine.ascent import MultiStepAscent
from ..gradient_backend import Backward
from .partitions import ReplicatedParts, ZeroParts, zero_parts


def zero_stage(trainer: Any) -> int:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


class HeldDescent:
    """The descent gradients of a step's micro-batches before its last, summed (this rank's parts), while
    the engine's buffers serve the next micro-batch's ascent. Lives on the trainer across micro-batches."""

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


def _added(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else (a if b is None else a + b)


class DeepSpeedBackend:
    """The passes of one SAM micro-batch on a DeepSpeed engine (see the module); the SAM engine works on
    this rank's parts (:mod:`.partitions`)."""

    def __init__(
        self,
        ds_engine: Any,
        parts: ZeroParts,
        rewrites: bool,
        held: HeldDescent | None = None,
        last_micro_batch: bool = True,
    ) -> None:
        self.ds_engine = ds_engine
        self.zero = parts  # this rank's parts (.partitions)
        self.rewrites = rewrites  # the descent changes g_s (mean): write the final gradient back
        self.held_descent = held if held is not None else HeldDescent()
        self.last_micro_batch = last_micro_batch  # the step's last: add the held descents and step
        self._grads: list[torch.Tensor | None] = []
        self._held: list[torch.Tensor | None] = []
        self._ascents = 0
        self._restored = False

    def _backward_at_boundary(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """The engine's backward, reduced over all ranks now, without a step; this rank's gradient parts."""
        self.ds_engine.set_gradient_accumulation_boundary(True)
        self.ds_engine.backward(loss, scale_wrt_gas=False)  # the Trainer divided by the accumulation steps
        return self.zero.read_grads()

    def _set_grads(self, grads: list[torch.Tensor | None]) -> None:
        for part, g in zip(self.zero.parts, grads, strict=True):
            part.grad = g

    def begin(self, engine: MultiStepAscent) -> None:
        self.zero.check()
        engine.begin()

    def ascent_backward(self, loss: torch.Tensor, backward: Backward) -> None:
        self._grads = self._backward_at_boundary(loss)
        self.ds_engine.optimizer.zero_grad()  # the ascent gradient must not reach the step

    def ascend(self, engine: MultiStepAscent) -> None:
        self._set_grads(self._grads)
        engine.ascend()
        self._grads = []
        self._ascents += 1
        if self._ascents < engine.ascent_steps:  # after the last, begin_descent refreshes (it may move to w)
            self.zero.refresh()

    def begin_descent(self, engine: MultiStepAscent) -> float | torch.Tensor:
        factor = engine.begin_descent()
        self.zero.refresh()
        # what the descent folded into the grads (mean's sum) waits aside: the engine's backward fills its own
        self._held = [part.grad for part in self.zero.parts]
        self._set_grads([None] * len(self._held))
        return factor

    def descent_backward(self, loss: torch.Tensor, backward: Backward) -> None:
        self._grads = self._backward_at_boundary(loss)

    def end_descent(self, engine: MultiStepAscent) -> None:
        """The descent gradient as autograd would have added it, the descent's last word, the weights back
        at w, the final gradient in the engine's partitions, then the optimizer step."""
        self._set_grads([_added(held, g) for held, g in zip(self._held, self._grads, strict=True)])
        engine.end_descent()
        final = [part.grad for part in self.zero.parts]
        self.restore(engine)  # before the step: ZeRO-0 steps the parameters themselves
        self._set_grads([None] * len(final))
        self._grads, self._held = [], []
        if not self.last_micro_batch:  # its descent waits; the buffers serve the next micro-batch's ascent
            self.held_descent.add(final)
            self.ds_engine.optimizer.zero_grad()
            return
        earlier = self.held_descent.take()
        if earlier is not None:
            final = [_added(g, e) for g, e in zip(final, earlier, strict=True)]
        if self.rewrites or isinstance(self.zero, ReplicatedParts) or earlier is not None:
            self.zero.write_grads(final)
        self.ds_engine.step()

    def restore(self, engine: MultiStepAscent) -> None:
        """The weights back at w, on every rank (once per micro-batch: also called from a ``finally``)."""
        if not self._restored:
            self._restored = True
            engine.restore()
            self.zero.refresh()


def sam_engine_tensors(trainer: Any, model: Any) -> tuple[list[torch.nn.Parameter], dict]:
    """What the SAM engine is built on under DeepSpeed: this rank's parts of the trainable parameters,
    and the engine's ``partition_group``. The parts live in the run's state (``trainer.sam_run``) for the passes."""
    engine = trainer.accelerator.deepspeed_engine_wrapped.engine
    trainer.sam_run.zero_parts = parts = zero_parts(engine, list(model.parameters()), zero_stage(trainer))
    return parts.parts, {"partition_group": parts.group}


def deepspeed_backend(trainer: Any, engine: MultiStepAscent) -> DeepSpeedBackend:
    """The backend of one micro-batch under DeepSpeed; the held descents live in the run's state across its
    micro-batches."""
    held = trainer.sam_run.held_descent
    if held is None:
        held = trainer.sam_run.held_descent = HeldDescent()
    return DeepSpeedBackend(
        trainer.accelerator.deepspeed_engine_wrapped.engine,
        trainer.sam_run.zero_parts,
        rewrites=trainer.sam_config.descent != "last",
        held=held,
        last_micro_batch=trainer.accelerator.sync_gradients,  # the micro-batch the optimizer steps after
    )


def stock_pass(trainer: Any, stock: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The stock training step under DeepSpeed (SAM every n steps' one-pass steps), with the accumulation
    boundary accelerate means: SAM's passes force it to True, and older accelerate releases (1.3 among them)
    let DeepSpeed's own count decide, so a one-pass micro-batch would be taken for a boundary and ZeRO-1/2
    would overwrite the gradient accumulated so far."""

    def run() -> torch.Tensor:
        engine = trainer.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(trainer.accelerator.sync_gradients)
        return stock()

    return run
