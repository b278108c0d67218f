"""Loss landscapes: 1-D and 2-D surfaces along filter-normalized random directions (Li et al.
2018) and the 1-D line along the ascent (normalized gradient) direction.

Directions are drawn from a seeded generator, so models of the same architecture get the same
raw directions; filter normalization then scales them to each model's own weights. The
weights are restored exactly afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .sharpness import LossFn, _gradient, evaluation_mode, trainable


def filter_normalized_direction(model: nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """A random direction with each filter (row/out-channel) scaled to the norm of the same filter
    of the weights; 1-D parameters (biases, norm layers) get zero, as in Li et al."""
    generator = torch.Generator().manual_seed(seed)
    direction = []
    for p in trainable(model):
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().reshape(p.shape[0], -1)
            flat = d.reshape(p.shape[0], -1)
            flat.mul_(w.norm(dim=1, keepdim=True) / flat.norm(dim=1, keepdim=True).clamp_min(1e-12))
        direction.append(d)
    return direction


def ascent_direction(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The unit gradient direction g/||g|| at the current weights (SAM's first ascent step)."""
    with evaluation_mode(model):
        grads = [g.detach() for g in _gradient(model, loss_fn, batches, create_graph=False)]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return [g / max(norm, 1e-30) for g in grads]


def _losses_at(model, loss_fn, batches, directions, coords: np.ndarray, saved) -> np.ndarray:
    params = trainable(model)
    out = np.empty(len(coords))
    with torch.no_grad():
        for row, c in enumerate(coords):
            for j, p in enumerate(params):
                p.copy_(saved[j])
                for coef, d in zip(c, directions, strict=True):
                    if coef:
                        p.add_(d[j], alpha=float(coef))
            out[row] = sum(float(loss_fn(model, b)) for b in batches) / len(batches)
    return out


def loss_line(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], direction: list[torch.Tensor], alphas: Sequence[float]
) -> np.ndarray:
    """L(w + a d) for each a in ``alphas``."""
    with evaluation_mode(model) as saved:
        coords = np.asarray(alphas, dtype=float)[:, None]
        return _losses_at(model, loss_fn, batches, [direction], coords, saved)


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    directions: tuple[list[torch.Tensor], list[torch.Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float],
) -> np.ndarray:
    """L(w + a d1 + b d2) on the grid alphas x betas (shape len(alphas), len(betas))."""
    with evaluation_mode(model) as saved:
        grid = np.array([(a, b) for a in alphas for b in betas], dtype=float)
        values = _losses_at(model, loss_fn, batches, list(directions), grid, saved)
    return values.reshape(len(alphas), len(betas))
