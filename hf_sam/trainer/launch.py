"""How the SAM passes meet the gradient all-reduce of the launch mode (single process, DDP, FSDP2).

Each pass of a SAM step runs under one of two contexts:

- the ascent context, for the clean pass and the ascent passes: per-device perturbation (no
  all-reduce, forward included, since DDP arms its reducer in the forward) or, with
  ``sync_ascent``, an all-reduced ascent gradient even inside the Trainer's ``no_sync``;
- the descent context, nested inside the ascent one: the gradient sync the Trainer chose for this
  micro-batch (off for all but the last micro-batch of a step).

Under FSDP2 (always with ``sync_ascent``) every pass of every micro-batch reduce-scatters at once, also inside
the Trainer's ``no_sync``: FSDP2 would keep a non-final micro-batch's gradients unsharded and add them into
the next synchronized backward, which would be an ascent pass. Each micro-batch's descent gradient is then
added into the sharded ``p.grad`` as it comes, and the SAM engine sets the sum aside during the ascent.
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


def _fsdp2_of(model: nn.Module) -> nn.Module | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2's public API
        return None
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, FSDPModule) else None


@contextlib.contextmanager
def _fsdp2_sync(module: nn.Module) -> Iterator[None]:
    """Reduce-scatter every backward inside. Not set back: the Trainer's ``no_sync`` (accelerate) sets the
    sync on again when the micro-batch ends, and nothing else runs a backward inside it."""
    module.set_requires_gradient_sync(True)
    yield


class GradientSync:
    """The ascent and descent contexts of one micro-batch on a (possibly DDP-wrapped) model."""

    def __init__(self, model: nn.Module, sync_ascent: bool) -> None:
        self._ddp = _ddp_of(model)
        self._fsdp2 = _fsdp2_of(model) if self._ddp is None else None
        self._sync_ascent = sync_ascent
        # what the Trainer chose for this micro-batch, read before the ascent context changes it
        self._descent_sync = self._ddp.require_backward_grad_sync if self._ddp is not None else True

    def ascent(self) -> contextlib.AbstractContextManager:
        if self._fsdp2 is not None:
            return _fsdp2_sync(self._fsdp2)
        return _ddp_sync(self._ddp, self._sync_ascent)

    def descent(self) -> contextlib.AbstractContextManager:
        if self._fsdp2 is not None:
            return _fsdp2_sync(self._fsdp2)
        return _ddp_sync(self._ddp, self._descent_sync)
