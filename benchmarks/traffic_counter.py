"""Counting the bytes SAM's own operators read and write (a TorchDispatchMode), for benchmarks/traffic.py and
benchmarks/own_time.py: an operator reads its tensor arguments and writes its outputs, or, when it works in
place, the arguments it mutates."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# operators that overwrite their destination without reading it, and the fused SGD kernel, whose schema marks
# its gradients mutable though it writes only its parameters and momentum buffers (the gradients only when
# given a grad_scale, which SAM never passes)
WRITE_ONLY = {"aten::copy_", "aten::_foreach_copy_", "aten::zero_", "aten::_foreach_zero_", "aten::fill_"}
FUSED_SGD = "aten::_fused_sgd_"


def _arguments(func, args, kwargs) -> list:
    """(schema argument, value) of every argument given."""
    schema = func._schema
    positional = list(zip(schema.arguments, args, strict=False))
    return positional + [(a, kwargs[a.name]) for a in schema.arguments[len(args) :] if a.name in kwargs]


def _mutated(func, args, kwargs) -> list:
    """The tensors an operator writes in place or into ``out=``, from its schema (``Tensor(a!)`` arguments)."""
    pairs = _arguments(func, args, kwargs)
    if func._schema.name == FUSED_SGD:
        return [v for a, v in pairs if a.name in ("self", "momentum_buffer_list")]
    return [v for a, v in pairs if a.alias_info is not None and a.alias_info.is_write]


def _read(func, args, kwargs) -> list:
    """The tensors an operator reads: its arguments but the ``out=`` destinations."""
    return [v for a, v in _arguments(func, args, kwargs) if not a.is_out]


def _skipped(func, kwargs) -> bool:
    """A fused optimizer kernel whose ``found_inf`` flag is set (SAM's guarded updates, when they skip)."""
    flag = kwargs.get("found_inf")
    return func._schema.name == FUSED_SGD and flag is not None and bool(flag)


class TrafficCounter(TorchDispatchMode):
    """Bytes read and written by every aten operator dispatched inside it, and the operators' count: an
    operator reads its tensor arguments (but the destination of a plain overwrite) and writes what it
    mutates in place, or else its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _skipped(func, kwargs):  # a guarded kernel told to skip returns before touching memory
            self.ops += 1
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        written = tree_flatten(_mutated(func, args, kwargs))[0]
        read = _bytes(tree_flatten(_read(func, args, kwargs))[0])
        if func._schema.name in WRITE_ONLY:
            read -= _bytes(written)
        self.read += read
        self.written += _bytes(written) if written else _bytes(tree_flatten(out)[0])
        self.ops += 1
        return out
