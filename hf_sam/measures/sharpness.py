"""Sharpness measures after training, usable on any model: worst-case loss in the rho-ball
(m-sharpness), the top Hessian eigenvalue and the Hessian trace.

Every measure takes ``loss_fn(model, batch) -> scalar loss`` and an iterable of batches, runs
the model in eval mode (no dropout; BatchNorm uses its running statistics), uses a seeded
generator, and leaves the weights exactly as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.ascent import MultiStepAscent
from ..engine.rules import ProjectedRule

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss of a transformers model (or any module returning an object/dict with ``loss``)."""
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Eval mode and a saved copy of the trainable weights, both restored on exit (errors included)."""
    was_training = model.training
    params = trainable(model)
    saved = [p.detach().clone() for p in params]
    model.eval()
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None
        model.train(was_training)


@dataclass
class WorstCaseLoss:
    """m-sharpness: the mean over batches of max_{||d|| <= rho} L_B(w + d) - L_B(w)."""

    clean_loss: float
    worst_loss: float
    sharpness: float


def worst_case_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    rho: float,
    steps: int = 10,
    restarts: int = 2,
    step_mult: float = 0.5,
    seed: int = 0,
) -> WorstCaseLoss:
    """Worst loss in the rho-ball per batch (its size is m) by projected gradient ascent.

    The first start is at w, the others at random points of the ball; the best of them counts.
    """
    generator = torch.Generator().manual_seed(seed)
    clean_total, worst_total = 0.0, 0.0
    with evaluation_mode(model):
        params = trainable(model)
        engine = MultiStepAscent(params, ascent_steps=steps, rho=rho, ascent_rule=ProjectedRule(step_mult))
        for batch in batches:
            with torch.no_grad():
                clean = float(loss_fn(model, batch))
            worst = clean
            for restart in range(restarts):
                engine.begin()
                try:
                    if restart:
                        engine.shift(_random_offsets(params, rho, generator))
                    for _ in range(steps):
                        loss = loss_fn(model, batch)
                        worst = max(worst, float(loss.detach()))
                        loss.backward()
                        if not engine.ascend():
                            break
                    with torch.no_grad():
                        worst = max(worst, float(loss_fn(model, batch)))
                finally:
                    for p in params:
                        p.grad = None
                    engine.restore()
            clean_total += clean
            worst_total += worst
    n = len(batches)
    return WorstCaseLoss(clean_total / n, worst_total / n, (worst_total - clean_total) / n)


@torch.no_grad()
def _random_offsets(params: list[torch.Tensor], rho: float, generator: torch.Generator) -> list[torch.Tensor]:
    """A random point of the rho-ball, as one offset per tensor."""
    noise = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    norm = math.sqrt(sum(float((v**2).sum()) for v in noise))
    radius = rho * float(torch.rand((), generator=generator))
    return [(v * (radius / max(norm, 1e-30))).to(p) for p, v in zip(params, noise, strict=True)]


def _gradient(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], create_graph: bool) -> list[torch.Tensor]:
    params = trainable(model)
    total = None
    for batch in batches:
        loss = loss_fn(model, batch) / len(batches)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        total = grads if total is None else [t + g for t, g in zip(total, grads, strict=True)]
    return total


def _math_attention() -> contextlib.AbstractContextManager:
    """Fused attention kernels have no double backward; the math kernel does."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def hessian_vector_product(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], vector: list[torch.Tensor]
) -> list[torch.Tensor]:
    """H v of the mean loss over ``batches``, by double backward (Pearlmutter)."""
    with _math_attention():
        return _hessian_vector_product(model, loss_fn, batches, vector)


def _hessian_vector_product(model, loss_fn, batches, vector):
    params = trainable(model)
    out = None
    for batch in batches:
        loss = loss_fn(model, batch) / len(batches)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g is not None]
        dot = sum((g * v).sum() for g, v in pairs)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv, strict=True)]
        out = hv if out is None else [o + h for o, h in zip(out, hv, strict=True)]
    return out


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


@dataclass
class EigenResult:
    """The largest algebraic Hessian eigenvalue (Lanczos), its residual and whether it converged."""

    eigenvalue: float
    iterations: int
    converged: bool
    residual: float = 0.0


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    max_iterations: int = 50,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> EigenResult:
    """Lanczos on Hessian-vector products with full reorthogonalization.

    Returns the largest *algebraic* eigenvalue (power iteration would return the one of largest
    magnitude, which is negative where a negative curvature dominates). Converged when the Ritz
    residual |beta_m s_m| is below ``tolerance`` times |lambda| (or the Krylov space is exhausted).
    """
    generator = torch.Generator().manual_seed(seed)
    with evaluation_mode(model):
        params = trainable(model)
        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]

        def hvp(flat: torch.Tensor) -> torch.Tensor:
            pieces = [c.reshape(s).to(p) for c, s, p in zip(flat.split(sizes), shapes, params, strict=True)]
            out = hessian_vector_product(model, loss_fn, batches, pieces)
            return torch.cat([o.double().reshape(-1) for o in out])

        v = torch.randn(sum(sizes), generator=generator, dtype=torch.float64)
        basis = [v / torch.linalg.norm(v)]
        alphas: list[float] = []
        betas: list[float] = []
        theta, residual = 0.0, math.inf
        for iteration in range(1, min(max_iterations, len(v)) + 1):
            w = hvp(basis[-1])
            alphas.append(float(w @ basis[-1]))
            stacked = torch.stack(basis)
            for _ in range(2):  # full reorthogonalization, twice for numerical safety
                w = w - stacked.T @ (stacked @ w)
            beta = float(torch.linalg.norm(w))
            tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
            values, vectors = torch.linalg.eigh(tri)
            theta = float(values[-1])
            residual = abs(beta * float(vectors[-1, -1]))
            scale = max(abs(theta), 1e-12)
            if residual <= tolerance * scale or beta <= 1e-12 * scale:
                return EigenResult(theta, iteration, True, residual)
            betas.append(beta)
            basis.append(w / beta)
    return EigenResult(theta, len(alphas), False, residual)


@dataclass
class TraceResult:
    """Hutchinson estimate of the Hessian trace, with its standard error."""

    trace: float
    stderr: float
    samples: int


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    samples: int = 20,
    seed: int = 0,
) -> TraceResult:
    """tr(H) ~ mean of z^T H z over Rademacher vectors z."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    with evaluation_mode(model):
        params = trainable(model)
        for _ in range(samples):
            z = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            values.append(_dot(hessian_vector_product(model, loss_fn, batches, z), z))
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / max(len(values) - 1, 1)
    return TraceResult(mean, math.sqrt(var / len(values)), len(values))


def batches_from(
    dataset: Any, collate: Callable, batch_size: int, limit: int | None = None, device: torch.device | str = "cpu"
) -> list[Any]:
    """A fixed list of collated batches (the first ``limit`` examples) on ``device``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out = []
    for start in range(0, n, batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, n))]
        batch = collate(rows)
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out
