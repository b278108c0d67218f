"""How the SAM passes meet the gradient all-reduce of the launch mode (single process, DDP).

Each pass of a SAM step runs under one of two contexts:

- the ascent context, for the clean pass and the ascent passes: per-device perturbation (no
  all-reduce, forward included, since DDP arms its reducer in the forward) or, with
  ``sync_ascent``, an all-reduced ascent gradient even inside the Trainer's ``no_sync``;
- the descent context, nested inside the ascent one: the gradient sync the Trainer chose for this
  micro-batch (off for all but the last micro-batch of a step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def _ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps DDP
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


@contextlib.contextmanager
def _ddp_sync(ddp: nn.parallel.DistributedDataParallel | None, enabled: bool) -> Iterator[None]:
    if ddp is None:
        yield
        return
    previous = ddp.require_backward_grad_sync
    ddp.require_backward_grad_sync = enabled
    try:
        yield
    finally:
        ddp.require_backward_grad_sync = previous


class GradientSync:
    """The ascent and descent contexts of one micro-batch on a (possibly DDP-wrapped) model."""

    def __init__(self, model: nn.Module, sync_ascent: bool) -> None:
        self._ddp = _ddp_of(model)
        self._sync_ascent = sync_ascent
        # what the Trainer chose for this micro-batch, read before the ascent context changes it
        self._descent_sync = self._ddp.require_backward_grad_sync if self._ddp is not None else True

    def ascent(self) -> contextlib.AbstractContextManager:
        return _ddp_sync(self._ddp, self._sync_ascent)

    def descent(self) -> contextlib.AbstractContextManager:
        return _ddp_sync(self._ddp, self._descent_sync)
