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
        self._intact = torch.ones((), dtype=torch.bool, device=device)  # no non-finite norm so far
        self._moved = torch.zeros((), dtype=torch.bool, device=device)
        self.zero = torch.zeros((), dtype=torch.bool, device=device)
        self.grad_norms: list[Tensor] = []

    def observe(self, norm: Tensor) -> Tensor:
        """Take in one ascent step's gradient norm (>= 0, inf or nan); returns the 0-d flag "move
        this step". A handful of scalar kernels, no host read."""
        self.grad_norms.append(norm)
        self._intact = self._intact & (norm < math.inf)  # false for inf and nan; sticky for later steps
        moving = self._intact & (norm > 0)
        self._moved = self._moved | moving
        self.zero = self.zero | (norm == 0)
        return moving

    @property
    def intact(self) -> Tensor:
        return self._intact

    @property
    def dropped(self) -> Tensor:
        return ~self._intact

    @property
    def moved(self) -> Tensor:
        return self._moved & self._intact
