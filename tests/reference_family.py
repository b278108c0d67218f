"""A float64 reference for the SAM family (GSAM, WSAM, F-SAM, every-n/LookSAM, MSAM, rho schedule).

Written from the formulas alone, with no hf_sam code, so the package can be checked against a second
implementation: one flat weight vector, the hand-written TinyNet of ``reference_sam``, torch's SGD and
AdamW (weight decay 0) re-done by hand, and a plain Python loop over optimizer steps and micro-batches.
"""

from __future__ import annotations

import math

import torch

from .reference_sam import NAMES, grad_at

DEFAULTS = {
    "k": 1,
    "rho": 0.05,
    "rule": "normalized",
    "step_mult": 1.0,
    "adaptive": False,
    "eta": 0.01,
    "descent": "last",
    "gsam_alpha": 0.4,
    "wsam_gamma": 0.9,
    "wsam_decouple": True,
    "direction": "gradient",
    "sigma": 1.0,
    "lam": 0.9,
    "every_n": 1,
    "reuse_alpha": 0.0,
    "granularity": "global",
    "method": "sam",
    "rho_schedule": None,
}


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(v)


def _slices(shapes: dict) -> list[slice]:
    """Each parameter tensor's slice of the flat vector, NAMES in order (for granularity "tensor")."""
    out, i = [], 0
    for n in NAMES:
        size = math.prod(shapes[n])
        out.append(slice(i, i + size))
        i += size
    return out


def sam_step_count(n_steps: int, every_n: int) -> int:
    """How many of the optimizer steps 0..n_steps-1 are full SAM steps (those with t % every_n == 0)."""
    return sum(1 for t in range(n_steps) if t % every_n == 0)


class _Optimizer:
    """torch.optim.SGD / AdamW with weight decay 0, on one flat vector; ``momentum`` is what MSAM reads."""

    def __init__(self, opt: dict):
        self.opt = opt
        self.t = 0
        self.buf = None  # SGD momentum buffer
        self.m = None  # AdamW first moment
        self.v = None  # AdamW second moment

    def lr(self, t: int) -> float:
        return float(self.opt["lrs"][t]) if self.opt.get("lrs") is not None else float(self.opt["lr"])

    def momentum(self) -> torch.Tensor | None:
        """SGD: the buffer; AdamW: the first moment, not bias-corrected; None before it exists."""
        return self.buf if self.opt["name"] == "sgd" else self.m

    def step(self, w: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        self.t += 1
        name = self.opt["name"]
        if name == "sgd":
            mu = float(self.opt.get("momentum", 0.0))
            if mu == 0:
                return w - lr * g
            self.buf = g.clone() if self.buf is None else mu * self.buf + g
            return w - lr * self.buf
        if name == "adamw":
            b1, b2 = self.opt["betas"]
            eps = self.opt.get("eps", 1e-8)
            if self.m is None:
                self.m, self.v = torch.zeros_like(w), torch.zeros_like(w)
            self.m = b1 * self.m + (1 - b1) * g
            self.v = b2 * self.v + (1 - b2) * g * g
            mhat = self.m / (1 - b1**self.t)
            vhat = self.v / (1 - b2**self.t)
            return w - lr * mhat / (torch.sqrt(vhat) + eps)
        raise ValueError(f"unknown optimizer {name!r}")


def _rho_at(cfg: dict, lr_t: float) -> float:
    """rho of a step: linear in the step's learning rate between (lr_min, rho_min) and (lr_max, rho)."""
    rho = float(cfg["rho"])
    if cfg["rho_schedule"] is None:
        return rho
    rho_min, lr_min, lr_max = cfg["rho_schedule"]
    if lr_max <= lr_min:
        return rho
    return rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)


def _scale(w: torch.Tensor, cfg: dict) -> torch.Tensor:
    """T = |w| + eta (adaptive) or 1."""
    return w.abs() + cfg["eta"] if cfg["adaptive"] else torch.ones_like(w)


def _ascent(w, shapes, x, y, n_micro, cfg, rho, fsam_m):
    """One micro-batch's (g, g_s): the clean gradient g_1 at w and the gradient at w + d_k."""
    grad = lambda v: grad_at(v, shapes, x, y) / n_micro
    k = int(cfg["k"])
    if k == 0:
        g = grad(w)
        return g, g
    t = _scale(w, cfg)
    a = {"normalized": rho / k, "projected": rho * cfg["step_mult"], "accumulated": rho}[cfg["rule"]]
    d = torch.zeros_like(w)
    clean = None
    for _ in range(k):
        g_i = grad(w + d)
        clean = g_i if clean is None else clean
        direction = g_i
        if cfg["direction"] == "friendly" and fsam_m is not None:
            direction = g_i - cfg["sigma"] * fsam_m
        u = t * direction
        d = d + a * t * u / _norm(u)
        if cfg["rule"] == "projected":
            size = _norm(d / t)
            if size > rho:
                d = d * (rho / size)
    return clean, grad(w + d)


def _contribution(g: torch.Tensor, g_s: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What one micro-batch adds to the optimizer's gradient, and (WSAM decoupled) to S."""
    descent = cfg["descent"]
    if descent == "last":
        return g_s, None
    if descent == "gsam":
        ss = g_s @ g_s
        coef = (g @ g_s) / ss if ss > 0 else torch.zeros((), dtype=g.dtype)
        return g_s - cfg["gsam_alpha"] * (g - coef * g_s), None
    if descent == "wsam":
        if cfg["wsam_decouple"]:
            return g, g_s - g
        gamma = cfg["wsam_gamma"]
        return g + gamma / (1 - gamma) * (g_s - g), None
    raise ValueError(f"unknown descent {descent!r}")


def _reject_unspecified(cfg: dict) -> None:
    """Refuse the combinations the formulas do not define, rather than silently pick a meaning."""
    if cfg["method"] not in ("sam", "msam"):
        raise ValueError(f"unknown method {cfg['method']!r}")
    if cfg["method"] == "msam":
        plain = cfg["k"] == 1 and cfg["descent"] == "last" and cfg["direction"] == "gradient"
        if not plain or cfg["every_n"] != 1:
            raise ValueError("msam is defined here only for k=1, descent 'last', direction 'gradient', every_n=1")
    if cfg["every_n"] > 1 and (cfg["descent"] != "last" or cfg["direction"] != "gradient"):
        raise ValueError("every_n > 1 is defined here only with descent 'last' and direction 'gradient'")
    if cfg["granularity"] not in ("global", "tensor"):
        raise ValueError(f"unknown granularity {cfg['granularity']!r}")


def _reuse_direction(g_c: torch.Tensor, g_s: torch.Tensor, slices: list[slice] | None) -> torch.Tensor:
    """LookSAM's g_v: the part of G_s orthogonal to G_c (per tensor slice when ``slices`` is given)."""
    parts = [slice(None)] if slices is None else slices
    g_v = torch.zeros_like(g_s)
    for s in parts:
        c, gs = g_c[s], g_s[s]
        cc = c @ c
        g_v[s] = gs - ((c @ gs) / cc) * c if cc > 0 else gs
    return g_v


def _add_reuse(g_total: torch.Tensor, g_v: torch.Tensor, alpha: float, slices: list[slice] | None) -> torch.Tensor:
    """g_total + alpha * ||g_total|| / ||g_v|| * g_v (per slice for "tensor"; nothing where ||g_v|| = 0)."""
    parts = [slice(None)] if slices is None else slices
    out = g_total.clone()
    for s in parts:
        nv = _norm(g_v[s])
        if nv > 0:
            out[s] = out[s] + alpha * _norm(g_total[s]) / nv * g_v[s]
    return out


def simulate(w0: torch.Tensor, shapes: dict, steps: list, cfg: dict, opt: dict) -> list[torch.Tensor]:
    """The flat float64 weights after each optimizer step; ``steps[t]`` is that step's list of (x, y)."""
    cfg = {**DEFAULTS, **cfg}
    _reject_unspecified(cfg)
    optimizer = _Optimizer(opt)
    slices = _slices(shapes) if cfg["granularity"] == "tensor" else None
    w = w0.detach().clone().double()
    fsam_m = None  # F-SAM's momentum of clean gradients, across micro-batches and steps
    g_v = None  # LookSAM's stored direction
    out = []
    for t, micro in enumerate(steps):
        n_micro = len(micro)
        lr_t = optimizer.lr(t)
        rho = _rho_at(cfg, lr_t)
        if cfg["method"] == "msam":
            v = optimizer.momentum()
            scale = _scale(w, cfg)
            point = w
            if v is not None and _norm(scale * v) > 0:
                point = w - rho * scale * scale * v / _norm(scale * v)
            g_total = sum(grad_at(point, shapes, x, y) / n_micro for x, y in micro)
            w = optimizer.step(w, g_total, lr_t)
        elif t % cfg["every_n"] != 0:
            g_total = sum(grad_at(w, shapes, x, y) / n_micro for x, y in micro)
            if cfg["reuse_alpha"] > 0 and g_v is not None:
                g_total = _add_reuse(g_total, g_v, cfg["reuse_alpha"], slices)
            w = optimizer.step(w, g_total, lr_t)
        else:
            g_total = torch.zeros_like(w)
            s_sum = torch.zeros_like(w)
            g_c = torch.zeros_like(w)
            g_s_sum = torch.zeros_like(w)
            for x, y in micro:
                g, g_s = _ascent(w, shapes, x, y, n_micro, cfg, rho, fsam_m)
                if cfg["direction"] == "friendly":
                    fsam_m = g.clone() if fsam_m is None else cfg["lam"] * fsam_m + (1 - cfg["lam"]) * g
                part, aside = _contribution(g, g_s, cfg)
                g_total = g_total + part
                if aside is not None:
                    s_sum = s_sum + aside
                g_c, g_s_sum = g_c + g, g_s_sum + g_s
            w = optimizer.step(w, g_total, lr_t)
            if cfg["descent"] == "wsam" and cfg["wsam_decouple"]:
                gamma = cfg["wsam_gamma"]
                w = w - lr_t * gamma / (1 - gamma) * s_sum
            if cfg["every_n"] > 1 and cfg["reuse_alpha"] > 0:
                g_v = _reuse_direction(g_c, g_s_sum, slices)
        out.append(w.clone())
    return out


if __name__ == "__main__":
    # A demonstration, not a test: each variant should move the weights away from plain SAM's.
    torch.manual_seed(0)
    shapes = {"fc1.weight": (7, 5), "fc1.bias": (7,), "fc2.weight": (3, 7), "fc2.bias": (3,)}
    w0 = torch.randn(sum(math.prod(s) for s in shapes.values()), dtype=torch.float64) * 0.5
    data = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(12)]
    steps = [data[2 * i : 2 * i + 2] for i in range(6)]
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    base = simulate(w0, shapes, steps, {"k": 2}, sgd)[-1]
    variants = {
        "gsam": {"k": 2, "descent": "gsam"},
        "wsam decoupled": {"k": 2, "descent": "wsam"},
        "wsam coupled": {"k": 2, "descent": "wsam", "wsam_decouple": False},
        "friendly": {"k": 2, "direction": "friendly", "sigma": 0.5},
        "every 3, reuse": {"k": 2, "every_n": 3, "reuse_alpha": 0.7},
        "every 3, reuse tensor": {"k": 2, "every_n": 3, "reuse_alpha": 0.7, "granularity": "tensor"},
        "msam": {"method": "msam", "rho": 0.5},
        "adaptive projected": {"k": 2, "adaptive": True, "rule": "projected", "rho": 0.5},
    }
    for label, c in variants.items():
        w = simulate(w0, shapes, steps, c, sgd)[-1]
        print(f"{label:24s} ||w - w_sam|| = {float(_norm(w - base)):.3e}")
    lrs = [0.1, 0.08, 0.06, 0.04, 0.02, 0.01]
    plain = simulate(w0, shapes, steps, {"k": 2}, {**sgd, "lrs": lrs})[-1]
    sched = simulate(w0, shapes, steps, {"k": 2, "rho_schedule": (0.0, 0.01, 0.1)}, {**sgd, "lrs": lrs})[-1]
    print(f"{'rho schedule':24s} ||w - w_sam|| = {float(_norm(sched - plain)):.3e}")
    print(f"sam_step_count(10, 3) = {sam_step_count(10, 3)}")
