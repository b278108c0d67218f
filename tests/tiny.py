"""Tiny hand-written models and data for the tests (no hub, no package code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """x -> tanh(fc1 x) [-> dropout] [-> BatchNorm] -> fc2 -> cross-entropy.

    ``poison`` maps a forward-call index (1-based) to a factor multiplied into the loss
    (NaN or inf to inject a non-finite gradient); ``fail_on`` maps a call index to "forward"
    or "backward" to raise there.
    """

    def __init__(self, d_in=5, hidden=7, classes=3, batchnorm=False, dtype=torch.float64, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.bn = nn.BatchNorm1d(hidden, dtype=dtype) if batchnorm else None
        self.fc2 = nn.Linear(hidden, classes, dtype=dtype)
        self.calls = 0
        self.poison: dict[int, float] = {}
        self.fail_on: dict[int, str] = {}

    def forward(self, x, labels=None):
        self.calls += 1
        if self.fail_on.get(self.calls) == "forward":
            raise RuntimeError(f"injected failure in forward call {self.calls}")
        if self.fail_on.get(self.calls) == "interrupt":
            raise KeyboardInterrupt
        h = torch.tanh(self.fc1(x))
        if self.dropout is not None:
            h = self.dropout(h)
        if self.bn is not None:
            h = self.bn(h)
        logits = self.fc2(h)
        out = {"logits": logits}
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            if self.calls in self.poison:
                loss = loss * self.poison[self.calls]
            if self.fail_on.get(self.calls) == "backward":
                loss = _FailInBackward.apply(loss)
            out["loss"] = loss
        return out


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("injected failure in backward")


def make_data(n=12, d_in=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def batch_of(rows):
    return torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows])
