"""What a low-precision kernel sees of SAM's perturbation.

Under autocast a Linear, Conv or matmul receives its weight cast to bf16/fp16, so the perturbed pass computes
with ``low(w + e)``: the perturbation its kernels see is ``low(w + e) - low(w)``, not ``e``. Where ``e`` is
small against the rounding step of ``w`` (about ``|w| / 256`` in bf16), much of it rounds away or is
inflated. The fidelity is the cosine between the realized and the intended perturbation over the
parameters autocast lowers, with their norm ratio. Pure torch: the trainer logs it (``sam_diagnostics``) and
``benchmarks/precision.py`` measures it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# the modules whose weights autocast casts to the low dtype (transformers' GPT-2 Conv1D computes with addmm)
LOWERED_MODULES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "NonDynamicallyQuantizableLinear")


def lowered_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters autocast computes with in low precision (weights and biases of Linear/Conv)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if type(module).__name__ not in LOWERED_MODULES:
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@torch.no_grad()
def perturbation_fidelity(perturbed: list[Tensor], original: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cosine and norm ratio of the realized perturbation ``low(w + e) - low(w)`` against ``e = perturbed -
    original``, over all the tensors together; 0-d float64 device tensors (nothing is read back). A zero
    perturbation gives cosine 1 and ratio 1 (nothing to lose)."""
    device = perturbed[0].device
    dot = torch.zeros((), dtype=torch.float64, device=device)
    realized_sq = torch.zeros_like(dot)
    intended_sq = torch.zeros_like(dot)
    for moved, w in zip(perturbed, original, strict=True):
        # fp32 temporaries (a low-precision value and a difference of near fp32 values are exact in fp32)
        intended = (moved.float() - w.float()).reshape(-1)
        realized = (moved.to(dtype).float() - w.to(dtype).float()).reshape(-1)
        dot += torch.dot(intended, realized).double()
        realized_sq += torch.dot(realized, realized).double()
        intended_sq += torch.dot(intended, intended).double()
    zero = intended_sq == 0
    cosine = torch.where(zero, torch.ones_like(dot), dot / (realized_sq * intended_sq).sqrt().clamp_min(1e-300))
    ratio = torch.where(zero, torch.ones_like(dot), (realized_sq / intended_sq.clamp_min(1e-300)).sqrt())
    return cosine, ratio
