"""The ascent's global gradient norm, on the device, in the cheapest precision that is still exact.

Float32 squares overflow beyond ~1e19 and fade into denormals below ~1e-19, so a norm outside
[1e-10, 1e18] taken in float32 may be wrong; a float64 accumulation is right for any finite values
but costs about five times as much on a CPU (it converts every element). Which one to use cannot be
asked per step without a host read, so it is reviewed now and then, where a read costs nothing
extra (after the first step, and at the Trainer's logging steps): float64 until the norms are seen
to stay in the safe range, float32 while they do, float64 again once one has not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .tensors import ShardLayout, global_norm

SAFE_RANGE = (1e-10, 1e18)
_EXACT_SQUARES = (torch.float32, torch.float64)


class GradientNorm:
    """Takes global norms on the device and remembers, on the device, whether all stayed in range."""

    def __init__(self, tensors: Sequence[Tensor], device: torch.device) -> None:
        self.exact = True  # float64 until a review has seen the norms in range
        # float32 norms of 16-bit gradients: accumulate in float32, not in the gradients' dtype
        self._fast_dtype = None if all(t.dtype in _EXACT_SQUARES for t in tensors) else torch.float32
        self._device = device
        self._seen: list[Tensor] = []  # the norms since the last review (0-d tensors, no kernel to keep)
        self._bounds: Tensor | None = None  # [min, max] of the norms folded out of _seen

    def __call__(self, grads: list[Tensor], layout: ShardLayout, flags: list[bool] | None) -> Tensor:
        norm = global_norm(grads, layout, flags, dtype=torch.float64 if self.exact else self._fast_dtype)
        norm = norm.to(self._device)
        self._seen.append(norm)
        if len(self._seen) >= 1024:  # a loop that never reviews: keep only the bounds
            self._fold()
        return norm

    def _fold(self) -> None:
        norms = torch.stack(self._seen if self._bounds is None else [*self._bounds, *self._seen])
        # a nan propagates through both, and fails the review
        self._bounds = torch.stack([norms.min(), norms.max()])
        self._seen = []

    def review(self) -> bool:
        """One host read: float32 norms from now on if every norm since the last review was in the
        safe range, float64 if not. Returns whether the norms are now float64."""
        if self._seen or self._bounds is not None:
            self._fold()
            low, high = SAFE_RANGE
            smallest, largest = self._bounds.tolist()
            self.exact = not (low <= smallest and largest <= high)
        self._bounds = None
        return self.exact
