"""What SAM's own code allocates, seen op by op: the largest new tensor any operator creates while SAM's
calls run (the engine's moves, its snapshot and restore, the gradients it reads and writes back).

A ``TorchDispatchMode`` sees every aten operator, including the buffers a collective is handed
(``torch.empty`` before an all-gather): a full-size copy of a parameter, gathered or cloned, shows up as
an output bigger than the rank's part of it. Outputs that alias an input (views, in-place ops) are not
new memory and are not counted; a DTensor output counts its local tensor. Work that is not SAM's (the
forward, backward and optimizer step of the stock loop) runs with the tracker paused.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


def _storage(t: torch.Tensor) -> int | None:
    """Where a tensor's memory starts; None where the storage cannot be read (a collective's pending output):
    such an output counts as new."""
    try:
        return _local(t).untyped_storage().data_ptr()
    except RuntimeError:
        return None


class Allocations(TorchDispatchMode):
    """Records the largest new tensor (elements) created by an operator while active and not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.paused = 0
        self.depth = 0  # a tracked method calling another: the mode is entered once

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)} - {None}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _local(t).numel() and _storage(t) not in inputs:
                self.largest = max(self.largest, _local(t).numel())
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def track_methods(obj, names, tracker: Allocations) -> None:
    """Run ``obj``'s methods ``names`` (a class or an instance) with the tracker on."""
    for name in names:
        method = getattr(obj, name)

        @functools.wraps(method)
        def tracked(*args, __method=method, **kwargs):
            if tracker.depth:
                return __method(*args, **kwargs)
            tracker.depth += 1
            try:
                with tracker:
                    return __method(*args, **kwargs)
            finally:
                tracker.depth -= 1

        setattr(obj, name, tracked)


def pause_methods(obj, names, tracker: Allocations) -> None:
    """Run ``obj``'s methods ``names`` with the tracker paused (work that is not SAM's)."""
    for name in names:
        method = getattr(obj, name)

        @functools.wraps(method)
        def paused(*args, __method=method, **kwargs):
            with tracker.pause():
                return __method(*args, **kwargs)

        setattr(obj, name, paused)
