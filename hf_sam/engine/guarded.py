"""Weight updates decided on the device: a 0-d flag skips them, and nothing is read back to the host.

A non-finite ascent gradient must leave the weights finite and untouched, yet asking the host whether
its norm is finite would drain a GPU's launch queue before every forward pass. The fused SGD kernel
takes a device flag (``found_inf``, the one GradScaler uses) and skips the whole update when it is
set, and it takes its learning rate as a device tensor: with ``maximize=True`` and no momentum or
weight decay it is exactly ``p += lr * g`` with both the size and the skip decided on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_F32_MAX = torch.finfo(torch.float32).max


def uniform(tensors: Sequence[Tensor]) -> bool:
    """All contiguous, on one device, of one dtype: what one fused call takes (check once, reuse)."""
    first = tensors[0]
    return all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in tensors)


def add_scaled_unless_(
    targets: Sequence[Tensor], sources: Sequence[Tensor], scale: Tensor, skip: Tensor, targets_uniform: bool = False
) -> None:
    """``targets += scale * sources`` unless the 0-d bool ``skip`` is set, in which case nothing is
    written (so non-finite ``sources`` never reach ``targets``). ``scale``: a 0-d float tensor.
    ``targets_uniform``: the caller knows :func:`uniform` holds for ``targets`` (the usual weights),
    so only the sources' layouts are checked (gradients share their parameter's dtype and device)."""
    found_inf = skip.to(torch.float32)  # the kernel reads the flag as a float
    if targets_uniform and all(s.is_contiguous() for s in sources):
        _fused_add(list(targets), list(sources), scale, found_inf)
        return
    groups, rest = _fusable(targets, sources)
    for t, s in rest:
        t.add_(torch.where(skip, torch.zeros((), dtype=t.dtype, device=t.device), s * scale.to(t.dtype)))
    for ts, ss in groups.values():
        _fused_add(ts, ss, scale, found_inf)


def _fusable(*lists: Sequence[Tensor]) -> tuple[dict, list[tuple[Tensor, ...]]]:
    """The fused kernel pairs elements by memory order (on the CPU it does not check layouts): the
    positions where every list's tensor is contiguous, of one dtype and device, grouped by (device,
    dtype) as one list per argument, and the other positions' tensors (rare: masked one by one)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
    rest: list[tuple[Tensor, ...]] = []
    for row in zip(*lists, strict=True):
        first = row[0]
        if all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in row):
            columns = groups.setdefault((first.device, first.dtype), tuple([] for _ in row))
            for column, t in zip(columns, row, strict=True):
                column.append(t)
        else:
            rest.append(row)
    return groups, rest


def _fused_add(targets: list[Tensor], sources: list[Tensor], scale: Tensor, found_inf: Tensor) -> None:
    """One fused call on contiguous pairs of one dtype and device."""
    device, dtype = targets[0].device, targets[0].dtype
    torch._fused_sgd_(
        targets,
        sources,
        [],
        weight_decay=0.0,
        momentum=0.0,
        lr=_learning_rate(scale, device, dtype),
        dampening=0.0,
        nesterov=False,
        maximize=True,  # p -= lr * (-g)
        is_first_step=False,
        found_inf=found_inf.to(device),
    )


def _learning_rate(scale: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The kernel's lr: read as a double on the CPU, as a float32 on accelerators."""
    return clamped(scale, dtype).to(device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)


def clamped(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """A step size for weights of ``dtype``: beyond float32 (a gradient norm below 1e-38) it is clamped so
    that it cannot overflow to inf (the step is then shorter, not inf times a tiny gradient)."""
    return scale if dtype == torch.float64 else scale.clamp(max=_F32_MAX)


def reset_where_(
    targets: Sequence[Tensor], sources: Sequence[Tensor], flag: Tensor, targets_uniform: bool = False
) -> None:
    """``targets <- sources`` if the 0-d bool ``flag`` is set, else unchanged, without a host read, and
    without touching memory when it is unset (the usual case: a drop is rare): two guarded adds that skip
    on the device flag, ``t - t`` (exactly 0 for finite ``targets``) and then ``0 + s`` (exactly ``s``)."""
    skip = ~flag
    device = targets[0].device
    add_scaled_unless_(
        targets, targets, torch.full((), -1.0, dtype=torch.float64, device=device), skip, targets_uniform
    )
    add_scaled_unless_(targets, sources, torch.ones((), dtype=torch.float64, device=device), skip, targets_uniform)


def copy_where_(targets: Sequence[Tensor], sources: Sequence[Tensor], flag: Tensor, scratch: Sequence[Tensor]) -> None:
    """``targets <- sources`` if the 0-d bool ``flag`` is set, else nothing is touched, exact also where
    ``targets`` hold inf or nan (which :func:`reset_where_`'s ``t - t`` would keep): the fused SGD kernel's
    first momentum step, ``buffer <- g``, with ``targets`` as its momentum buffers and ``sources`` as g.
    The kernel then writes its parameters, here ``scratch`` (tensors shaped like the targets):
    ``x - 0 * s``, which keeps every value of ``x`` but may flip the sign of a zero. Layouts the kernel
    cannot take are copied tensor by tensor with a mask (rare)."""
    run = (~flag).to(torch.float32)  # the kernel's found_inf: it skips when set
    groups, rest = _fusable(targets, sources, scratch)
    for t, s, _ in rest:
        t.copy_(torch.where(flag.to(t.device), s, t))
    for (device, _), (ts, ss, xs) in groups.items():
        torch._fused_sgd_(
            xs, ss, ts, weight_decay=0.0, momentum=1.0, lr=0.0, dampening=0.0, nesterov=False,
            maximize=False, is_first_step=True, found_inf=run.to(device),
        )  # fmt: skip


def replace_where_(targets: Sequence[Tensor], sources: Sequence[Tensor], flag: Tensor) -> None:
    """``targets <- sources`` if the 0-d bool ``flag`` is set, without a host read, also when
    ``targets`` hold non-finite values (where :func:`reset_where_`'s ``t - t`` would give nan): a kernel
    per tensor, for state updated once per step, not for the hot path."""
    for t, s in zip(targets, sources, strict=True):
        t.copy_(torch.where(flag.to(t.device), s, t))
