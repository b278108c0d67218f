"""How busy a step keeps the device: the FLOPs of one forward+backward (torch's own flop counter, which
counts matmuls and convolutions) and the dense bf16 peak of the GPU it runs on, from the vendor's data
sheet (None where the card is not listed)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense (not sparse) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
BF16_PEAK = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12 and is named "H100 PCIe"
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def bf16_peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    matches = [key for key in BF16_PEAK if key in name]
    return BF16_PEAK[max(matches, key=len)] if matches else None  # the longest name: "H100 PCIe" over "H100"


def step_flops(model: torch.nn.Module, batch: dict, bf16: bool, device: str) -> float:
    """FLOPs of one forward and backward pass on ``batch`` (the plain step's passes; the optimizer is not
    counted)."""
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
