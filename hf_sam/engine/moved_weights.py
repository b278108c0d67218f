"""Where the weights go while a SAM step's passes run at a perturbed point, and how they come back.

Two ways, one contract (the weights after the step are w, bit for bit, whatever happened in between):

* ``swap``: the perturbed point is built in a second buffer per tensor, and the parameters are pointed at
  it (``p.data = buffer``) for the ascent and descent passes, then pointed back at their own storage,
  which nothing wrote in the meantime. There is no restore copy: restoring is bit-exact because w was
  never touched. A step costs one copy of w into the buffer (the first move; see :meth:`MovedWeights.move_out`)
  where the copy way costs a snapshot and a restore copy.
* ``copy``: the perturbed point is built in the parameters' own storage after a snapshot of w, which
  is copied back at the end. It is the way wherever a parameter's storage must not change: FSDP2's
  DTensor shards (views into FSDP's flat buffers), parameters that share storage with another tensor
  (the tie would break during the passes), DeepSpeed (it gathers and partitions ``p.data`` itself)
  and CUDA graphs (they record the parameters' addresses); :func:`choose_mode` decides.

Why the first move is a copy plus an in-place add, not one out-of-place ``w + s g``: a non-finite ascent
gradient must leave the point at w (the descent is then at w), and that is decided on the device
(:mod:`hf_sam.engine.guarded`). An out-of-place add reads g even when its step size is 0, and 0 * inf is
nan; the only stock kernel that skips on a device flag (the fused SGD step) works in place. So the
buffer gets w first (two passes) and the guarded add writes into it (three), against the copy way's
snapshot (two), add (three) and restore (two).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .tensors import ShardLayout

MODES = ("auto", "swap", "copy")


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
        unsafe = "FSDP2 shards are views into FSDP's own buffers"
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
    the parameters themselves. Between :meth:`begin` and :meth:`restore`, :attr:`originals` is w.
    """

    def __init__(self, params: Sequence[Tensor], weights: Sequence[Tensor], mode: str) -> None:
        self.params = list(params)
        self.mode = mode
        self._weights = list(weights)
        self._spare: list[Tensor] | None = None  # swap: the perturbed point; copy: the snapshot of w
        self._originals: list[Tensor] = []
        self._aliases: list[Tensor] = []
        self._where: list[int] = []  # the weights' addresses when the buffers were made
        self.out = False  # swap: the parameters point at the spare buffers

    @property
    def originals(self) -> list[Tensor]:
        """w during the step (the untouched storage under swap, the snapshot under copy)."""
        return self._originals

    @property
    def buffers(self) -> list[Tensor]:
        """The one extra copy of the weights (the swap's perturbed point, or the copy way's snapshot)."""
        return self._spare or []

    def begin(self, weights: Sequence[Tensor]) -> None:
        """Start a step: under copy, snapshot w; under swap, only remember where w lives."""
        self._weights = list(weights)
        self._prepare()
        if self.mode == "copy":
            torch._foreach_copy_(self._spare, self._weights)
            self._originals = self._spare
        else:
            self._originals = self._aliases

    def move_out(self) -> None:
        """Before the first write to the weights of a step: under swap, give the buffers w and point the
        parameters at them (idempotent); under copy, nothing (the weights are moved where they are)."""
        if self.mode == "copy" or self.out:
            return
        torch._foreach_copy_(self._spare, self._originals)
        for p, spare in zip(self.params, self._spare, strict=True):
            p.data = spare
        self.out = True

    def restore(self) -> None:
        """The weights back at w, bit for bit: the parameters point at their storage again (swap), or
        the snapshot is copied back (copy)."""
        if self.mode == "copy":
            if self._originals:
                torch._foreach_copy_(self._weights, self._originals)
        elif self.out:
            for p, original in zip(self.params, self._originals, strict=True):
                p.data = original
            self.out = False
        self._originals = []

    def _prepare(self) -> None:
        """The spare buffers and the aliases of w, made again only when the weights' storage moved (the
        first step, or the model was moved or cast since): a check of addresses, no operator, per step."""
        where = [w.data_ptr() for w in self._weights]
        if where == self._where:
            return
        self._spare = [torch.empty_like(w, memory_format=torch.preserve_format) for w in self._weights]
        self._aliases = [w.data for w in self._weights]  # views of w's storage; swap never writes them
        self._where = where
