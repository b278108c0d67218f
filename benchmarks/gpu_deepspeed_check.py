#!/usr/bin/env python
"""SAMTrainer under DeepSpeed ZeRO-2 against the same run without DeepSpeed, on one GPU.

    python benchmarks/gpu_deepspeed_check.py       # launches both runs with torchrun, compares, prints a table

Each run trains a small MLP classifier for 4 steps (SAM k=2, synchronized ascent; normalized, and
projected+ASAM+mean) in its own process under torchrun, once with ``--deepspeed`` (ZeRO-2) and once
without, then the final weights and the wall time of the steps are compared. fp32 under DeepSpeed:
SAMTrainer refuses DeepSpeed's bf16 and fp16 (README, "Several GPUs"); the bf16 case checks that the
refusal comes before training. Needs deepspeed on the device (carry a wheel, as for the peer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from gpu_fsdp_check import sam_trainer  # the same small classifier and rows as the FSDP2 check

CASES = {
    "normalized": dict(sam_ascent_steps=2),
    "projected-asam-mean": dict(sam_ascent_steps=3, sam_ascent_rule="projected", sam_adaptive=True, sam_descent="mean"),
}
ZERO2 = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


def worker(out: str, case: str, deepspeed: str) -> None:
    extra = {}
    if deepspeed != "none":
        extra["deepspeed"] = {**ZERO2, **({"bf16": {"enabled": True}} if deepspeed == "bf16" else {})}
    try:
        trainer = sam_trainer(os.path.join(out, f"{case}-{deepspeed}"), CASES[case], extra)
    except ValueError as err:  # the bf16 case: refused before training
        torch.save({"refused": str(err)}, os.path.join(out, f"{case}-{deepspeed}.pt"))
        return
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    weights = {n.removeprefix("module."): p.detach().float().cpu() for n, p in trainer.model.named_parameters()}
    torch.save({"weights": weights, "seconds": seconds}, os.path.join(out, f"{case}-{deepspeed}.pt"))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(os.environ["DS_CHECK_OUT"], sys.argv[2], sys.argv[3])
        return 0
    if not torch.cuda.is_available():
        print("gpu_deepspeed_check: no CUDA device (the CPU check is tests/distributed/test_deepspeed.py).")
        return 2
    out = tempfile.mkdtemp(prefix="ds_check_")
    rows = []
    for case in CASES:
        for mode in ("none", "fp32", "bf16"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", __file__, "--worker", case,
                   mode]  # fmt: skip
            proc = subprocess.run(cmd, env={**os.environ, "DS_CHECK_OUT": out}, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:])
                rows.append({"case": case, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
        try:
            plain, zero2, bf16 = (torch.load(os.path.join(out, f"{case}-{m}.pt")) for m in ("none", "fp32", "bf16"))
        except FileNotFoundError:
            continue
        diff = max((plain["weights"][n] - zero2["weights"][n]).abs().max().item() for n in plain["weights"])
        rows.append(
            {
                "case": case, "max_abs_diff": diff, "seconds_plain": round(plain["seconds"], 3),
                "seconds_zero2": round(zero2["seconds"], 3), "bf16_refused": "refused" in bf16,
            }
        )  # fmt: skip
    print(json.dumps(rows, indent=1))
    return 0 if rows and all("error" not in r and r["bf16_refused"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
