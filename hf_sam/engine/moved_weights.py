"""Where the weights go while a SAM step's passes run at a perturbed point, and how they come back.

Two ways, one contract (the weights after the step are w, bit for bit, whatever happened in between):

* ``swap``: the perturbed point is built in a second buffer per tensor, and the parameters are pointed at
  it (``p.data = buffer``) for the ascent and descent passes, then pointed back at their own storage,
  which nothing wrote in the meantime. There is no restore copy: restoring is bit-exact because w was
  never touched. A step writes the buffer in its first move (below), where the copy way costs a
  snapshot and a restore copy besides.
* ``copy``: the perturbed point is built in the parameters' own storage after a snapshot of w, which
  is copied back at the end. It is the way wherever a parameter's storage must not change: FSDP2's
  DTensor shards (views into FSDP's flat buffers), parameters that share storage with another tensor
  (the tie would break during the passes), DeepSpeed (it gathers and partitions ``p.data`` itself)
  and CUDA graphs (they record the parameters' addresses); :func:`choose_mode` decides.

The step's first move, where its direction is spent (the engine's ascent gradient), is on the CPU one
out-of-place ``w + s g`` into the buffer (swap: three passes, reading w and g; copy: from the snapshot
into the parameters, the same kernel, so both ways take bit-identical steps). A non-finite ascent
gradient must leave the point at w, decided on the device (:mod:`hf_sam.engine.guarded`), yet
``w + 0 * inf`` is nan: so the move is written unguarded and then overwritten with w by a kernel that
skips on the device flag (:func:`~hf_sam.engine.guarded.copy_where_`), touching no memory unless the
ascent dropped. Elsewhere, and for later moves and moves by a direction the caller still needs (MSAM's
momentum, a random start), the move adds in place with the guarded kernel, the swap copying w into the
buffer first (five passes, not three). On an accelerator this is deliberate: stock kernels have no
one-launch ``w + s g`` with s on the device (a tensor scale sends a foreach kernel down its path of one
launch per tensor), while the copy and the fused add are a few launches whatever the number of tensors;
on the CPU every foreach kernel runs tensor by tensor anyway. :attr:`MovedWeights.out_of_place` overrides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .guarded import add_scaled_unless_, clamped, copy_where_
from .tensors import ShardLayout

MODES = ("auto", "swap", "copy")
_FAST_DTYPES = (torch.float32, torch.float64)


def shares_storage(params: Sequence[Tensor]) -> bool:
    """Whether two of ``params`` share a storage (a tie that a buffer swap would break for the passes)."""
    seen: set[int] = set()
    for p in params:
        ptr = p.untyped_storage().data_ptr()
        if ptr in seen and p.numel():
            return True
        seen.add(ptr)
    return False


def choose_mode(mode: str, params: Sequence[Tensor], layout: ShardLayout) -> str:
    """``mode`` ("auto", "swap" or "copy") made concrete for these parameters: "auto" swaps unless a
    parameter is an FSDP2 shard or shares its storage; "swap" is refused where it cannot be safe."""
    if mode not in MODES:
        raise ValueError(f"perturbed_weights={mode!r} is invalid: allowed values are {', '.join(MODES)}.")
    unsafe = None
    if layout.sharded:
        unsafe = "FSDP2 shards and ZeRO partitions are views into their engine's own buffers"
    elif shares_storage(params):
        unsafe = "two parameters share a storage (a tie the swap would break during the passes)"
    if mode == "swap" and unsafe:
        raise ValueError(f"perturbed_weights='swap' cannot be used here: {unsafe}; use 'copy' or 'auto'.")
    if mode == "auto":
        return "copy" if unsafe else "swap"
    return mode


class MovedWeights:
    """Keeps w while the parameters sit at a perturbed point, and brings them back (see the module).

    ``weights`` are what the engine moves in place (the parameters, or their local shards), ``params``
    the parameters themselves. Between :meth:`begin` and :meth:`restore`, :attr:`backup` is w.
    """

    def __init__(self, params: Sequence[Tensor], weights: Sequence[Tensor], mode: str) -> None:
        self.params = list(params)
        self.mode = mode
        self._weights = list(weights)
        self._spare: list[Tensor] | None = None  # swap: the perturbed point; copy: the snapshot of w
        self._backup: list[Tensor] = []
        self._aliases: list[Tensor] = []
        self._where: list[int] = []  # the weights' addresses when the buffers were made
        self.out = False  # swap: the parameters point at the spare buffers
        self.moved = False  # the weights were written this step (a move or a shift)
        self.out_of_place: bool | None = None  # the first move out of place (see the module); None: on the CPU
        self._fast_dtypes = False  # all float32/float64, where the step size is not rounded to the weights' dtype

    @property
    def backup(self) -> list[Tensor]:
        """w during the step (the untouched storage under swap, the snapshot under copy)."""
        return self._backup

    @property
    def buffers(self) -> list[Tensor]:
        """The one extra copy of the weights (the swap's perturbed point, or the copy way's snapshot)."""
        return self._spare or []

    def begin(self, weights: Sequence[Tensor]) -> None:
        """Start a step: under copy, snapshot w; under swap, only remember where w lives."""
        self._weights = list(weights)
        self._prepare()
        self.moved = False
        if self.mode == "copy":
            torch._foreach_copy_(self._spare, self._weights)
            self._backup = self._spare
        else:
            self._backup = self._aliases

    def move_out(self) -> None:
        """Before a write in place to the weights of a step: under swap, give the buffers w and point the
        parameters at them (idempotent); under copy, nothing (the weights are moved where they are)."""
        self.moved = True
        if self.mode == "copy" or self.out:
            return
        torch._foreach_copy_(self._spare, self._backup)
        self._point_out()

    def move(
        self, idx: list[int], directions: list[Tensor], scale: Tensor, skip: Tensor, uniform: bool, spent: bool
    ) -> None:
        """``weights[j] += scale * directions`` for j in ``idx`` unless the 0-d bool ``skip`` is set (then
        nothing moves). ``spent``: the caller does not need ``directions`` after this call, so the step's
        first move can run out of place and use them as scratch (see the module); ``uniform``: the weights
        are what one fused kernel takes (:func:`~hf_sam.engine.guarded.uniform`)."""
        out_of_place = self._weights[0].device.type == "cpu" if self.out_of_place is None else self.out_of_place
        if self.moved or not spent or not idx or not (out_of_place and self._fast_dtypes):
            self.move_out()
            add_scaled_unless_([self._weights[j] for j in idx], directions, scale, skip, uniform)
            return
        self.moved = True
        backup = [self._backup[j] for j in idx]
        # the step size in the weights' dtype, as the fused kernel rounds it (and a 0-d w does not promote)
        by_dtype = {d: clamped(scale, d).to(d) for d in {w.dtype for w in backup}}
        steps = [by_dtype[w.dtype] for w in backup]
        if self.mode == "copy":  # the same kernel in place: w is the snapshot's value, bit for bit
            targets = [self._weights[j] for j in idx]
            torch._foreach_addcmul_(targets, directions, steps)
        else:
            # the kernel writes new tensors (its out= form computes them and copies); the last step's are
            # let go first, so that only one extra copy of the weights is ever held
            for j in idx:
                self._spare[j] = None
            targets = torch._foreach_addcmul(backup, directions, steps)
            for j, t in zip(idx, targets, strict=True):
                self._spare[j] = t
        copy_where_(targets, backup, skip, directions)  # a dropped or zero ascent: back to w
        if self.mode == "swap":
            rest = sorted(set(range(len(self._weights))) - set(idx))  # no gradient this pass: at w
            if rest:
                torch._foreach_copy_([self._spare[j] for j in rest], [self._backup[j] for j in rest])
            self._point_out()

    def _point_out(self) -> None:
        for p, spare in zip(self.params, self._spare, strict=True):
            p.data = spare
        self.out = True

    def restore(self) -> None:
        """The weights back at w, bit for bit: the parameters point at their storage again (swap), or
        the snapshot is copied back (copy)."""
        if self.mode == "copy":
            if self._backup:
                torch._foreach_copy_(self._weights, self._backup)
        elif self.out:
            for p, original in zip(self.params, self._backup, strict=True):
                p.data = original
            self.out = False
        self._backup = []
        self.moved = False

    def _prepare(self) -> None:
        """The spare buffers and the aliases of w, made again only when the weights' storage moved (the
        first step, or the model was moved or cast since): a check of addresses, no operator, per step."""
        where = [w.data_ptr() for w in self._weights]
        if where == self._where:
            return
        self._spare = [torch.empty_like(w, memory_format=torch.preserve_format) for w in self._weights]
        self._aliases = [w.data for w in self._weights]  # views of w's storage; swap never writes them
        self._fast_dtypes = all(w.dtype in _FAST_DTYPES for w in self._weights)
        self._where = where
