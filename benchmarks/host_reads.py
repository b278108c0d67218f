"""Counting the host's reads of tensor values, the CPU's stand-in for CUDA's sync debug mode.

On the CPU a read costs nothing, so it is counted instead: every ``item()``, ``bool()``, ``float()`` or
``int()`` of a tensor reaches aten as ``_local_scalar_dense`` (seen by a dispatch mode), and ``tolist()``
and ``numpy()`` are wrapped. Used by tests/engine/test_no_host_sync.py and by the dry run of
benchmarks/gpu_sync_check.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ_OPS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero"}


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host while active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in _READ_OPS:
            self.reads.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_host_reads():
    counter = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name):
        def read(self, *args, **kwargs):
            counter.reads.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
