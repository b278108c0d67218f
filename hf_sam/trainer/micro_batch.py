"""One SAM micro-batch, run from inside the Trainer's own ``training_step``.

The subclass's ``training_step`` chain runs once per micro-batch with all its contexts (TRL's
activation offloading, for example) and makes the clean pass itself: its own ``compute_loss``, with
its side effects, then ``accelerator.backward(loss)``. That one backward call is where the SAM step
takes over: it backpropagates the clean loss as the first ascent gradient, runs the remaining ascent
passes and the descent pass with the most derived ``compute_loss``, and returns. The extra passes'
side effects on the trainer (TRL's metrics and token counts) are rolled back, so that they happen
once per micro-batch, from the clean pass, as without SAM.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..engine.ascent import MultiStepAscent
from .gradient_backend import AutogradBackend, GradientBackend
from .launch import GradientSync


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: list[nn.Module]) -> Iterator[None]:
    """Run forward passes that use batch statistics but leave running statistics untouched.

    With ``track_running_stats=False`` a training-mode BatchNorm normalizes with the batch
    statistics exactly as before but neither updates running_mean/var nor counts the batch.
    """
    changed = [m for m in modules if m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def rolled_back(owner: object, names: tuple[str, ...]) -> Iterator[None]:
    """Undo what the code inside does to ``owner``'s attributes ``names`` (those it has)."""
    saved = {name: copy.deepcopy(getattr(owner, name)) for name in names if hasattr(owner, name)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


class RandomState:
    """The CPU and current-device random state, to replay the clean pass's dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self._cpu = torch.get_rng_state()
        self._gpu = torch.cuda.get_rng_state(device) if self._cuda else None
        self.device = device

    def apply(self) -> None:
        torch.set_rng_state(self._cpu)
        if self._cuda:
            torch.cuda.set_rng_state(self._gpu, self.device)


class SAMMicroBatch:
    """The SAM passes of one micro-batch, driven by the first ``accelerator.backward`` call.

    ``run_pass(inputs, factor, backward)`` makes one forward+backward pass the way the stock
    step does it (its own copy of the inputs, the accumulation division) and returns the
    loss; it is the trainer's, so the most derived ``compute_loss`` is used.
    """

    def __init__(
        self,
        engine: MultiStepAscent,
        sync: GradientSync,
        batchnorms: list[nn.Module],
        run_pass: Callable[..., torch.Tensor],
        inputs: dict[str, Any],
        side_effects: Callable[[], contextlib.AbstractContextManager],
        rng: RandomState | None,
        loss_at: Callable[[], torch.Tensor] | None = None,
        alphas: list[float] | None = None,
        backend: GradientBackend | None = None,
        at_perturbed: Callable[[MultiStepAscent], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.engine = engine
        self.sync = sync
        self.batchnorms = batchnorms
        self.run_pass = run_pass
        self.inputs = inputs
        self.side_effects = side_effects
        self.rng = rng
        self.loss_at = loss_at  # XSAM's dynamic alpha: the loss of a forward pass at the current weights
        self.alphas = alphas
        self.backend = backend or AutogradBackend()  # where the gradients are (DeepSpeed: its own backend)
        self.at_perturbed = at_perturbed  # a measurement at w + d_k (sam/perturbation_fidelity)
        self.measured: dict[str, torch.Tensor] = {}
        self.ran = False
        self.clean: torch.Tensor | None = None
        self.perturbed: torch.Tensor | None = None
        self.pass_losses: list[torch.Tensor] = []

    @contextlib.contextmanager
    def driving(self, accelerator: Any) -> Iterator[None]:
        """Take over the first ``accelerator.backward`` call made inside (the clean pass's)."""
        original = accelerator.backward
        patched_before = vars(accelerator).get("backward")

        def put_back() -> None:
            if patched_before is None:
                vars(accelerator).pop("backward", None)  # the class's method again
            else:
                accelerator.backward = patched_before

        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            put_back()  # every later call, ours included, is a plain one
            self._run(loss, lambda value: original(value, **kwargs))

        accelerator.backward = backward
        try:
            with self.sync.ascent():  # the clean forward too: DDP arms its reducer in the forward
                yield
        finally:
            put_back()

    def _run(self, clean: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> None:
        engine, backend = self.engine, self.backend
        ascent_backward = lambda loss: backend.ascent_backward(loss, backward)  # noqa: E731
        backend.begin(engine)
        self.ran = True
        ascent_backward(clean)  # the first ascent gradient, at w
        self.clean = clean.detach()
        self.pass_losses = [self.clean]
        after_clean = RandomState(self.rng.device) if self.rng is not None else None
        with self.side_effects(), frozen_batchnorm_stats(self.batchnorms):
            try:
                backend.ascend(engine)
                # all k passes: a dropped ascent is known on the device only; its remaining steps do not move
                for _ in range(engine.ascent_steps - 1):
                    self._replay()
                    self.pass_losses.append(self.run_pass(self.inputs, 1.0, ascent_backward))
                    backend.ascend(engine)
                factor = backend.begin_descent(engine)
                if self.at_perturbed is not None:
                    self.measured = self.at_perturbed(engine)
                self._replay()
                with self.sync.descent():
                    self.perturbed = self.run_pass(
                        self.inputs, factor, lambda loss: backend.descent_backward(loss, backward)
                    )
                if self.loss_at is not None:
                    engine.choose_xsam_alpha(self._replayed(self.loss_at), self.alphas)
                backend.end_descent(engine)
            finally:
                if after_clean is not None:  # the run goes on as if only the clean pass had drawn
                    after_clean.apply()

    def _replayed(self, loss_at: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            self._replay()
            return loss_at()

        return run

    def _replay(self) -> None:
        if self.rng is not None:
            self.rng.apply()
