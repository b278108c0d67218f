"""What one step's ascent did, kept as device tensors: the engine never reads them back itself.

The Trainer sums them on the device and reads them once per logging step; a plain loop may read
them whenever it likes (each read of a GPU tensor waits for the queued work).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class AscentRecord:
    """The device flags and norms of one training step's ascent.

    ``dropped``: a non-finite gradient norm dropped the perturbation (the descent is at w);
    ``moved``: some ascent step moved the weights (and none dropped them);
    ``zero``: some ascent step met a zero gradient and did not move;
    ``grad_norms``: one 0-d float64 tensor per ascent step, in the rule's norm.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._intact: Tensor | None = None  # no non-finite norm so far (None: no step yet)
        self._moves: list[Tensor] = []
        self.shifted = False  # the weights were moved by something else than an ascent step (a random start)
        self.grad_norms: list[Tensor] = []

    def observe(self, norm: Tensor) -> Tensor:
        """Take in one ascent step's gradient norm (>= 0, inf or nan); returns the 0-d flag "move
        this step". A few scalar kernels, no host read; the summaries below are formed when asked."""
        self.grad_norms.append(norm)
        finite = norm < math.inf  # false for inf and nan
        self._intact = finite if self._intact is None else self._intact & finite  # sticky for later steps
        moving = self._intact & (norm > 0)
        self._moves.append(moving)
        return moving

    @property
    def intact(self) -> Tensor:
        return torch.ones((), dtype=torch.bool, device=self._device) if self._intact is None else self._intact

    @property
    def dropped(self) -> Tensor:
        return ~self.intact

    @property
    def moved(self) -> Tensor:
        if self.shifted:
            return self.intact.clone()
        if len(self._moves) == 1:  # its own step's flag already includes the (final) intact one
            return self._moves[0]
        if not self._moves:
            return torch.zeros((), dtype=torch.bool, device=self._device)
        return torch.stack(self._moves).any() & self._intact

    @property
    def zero(self) -> Tensor:
        if not self.grad_norms:
            return torch.zeros((), dtype=torch.bool, device=self._device)
        return (torch.stack(self.grad_norms) == 0).any()
