#!/usr/bin/env python
"""SAMTrainer under accelerate's FSDP2 against the same run without FSDP, on one GPU.

    python benchmarks/gpu_fsdp_check.py            # launches both runs with torchrun, compares, prints a table

Each run trains a small MLP classifier for 4 steps (SAM k=2, synchronized ascent, for fp32 and bf16
autocast, the rules normalized and projected+ASAM+mean) in its own process under torchrun, once
with --fsdp full_shard (fsdp_config version 2) and once without, then the final weights are compared.
With FSDP the Trainer must report it active (accelerate enables FSDP on accelerators only; on a CPU
the check says so and stops).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

CASES = {
    "normalized-fp32": dict(sam_ascent_steps=2),
    "normalized-bf16": dict(sam_ascent_steps=2, bf16=True),
    "projected-asam-mean-fp32": dict(
        sam_ascent_steps=3, sam_ascent_rule="projected", sam_adaptive=True, sam_descent="mean"
    ),
}


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


def sam_trainer(output_dir: str, sam: dict, extra: dict):
    """SAMTrainer on the small classifier and 64 fixed rows, 4 steps of SGD with a synchronized ascent;
    ``sam``: the case's sam_* (and precision) arguments, ``extra``: the launch's (FSDP, DeepSpeed)."""
    from transformers import set_seed

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_sam import SAMTrainer, SAMTrainingArguments

    set_seed(0)
    model = MLP()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    data = [{"x": x[i], "labels": y[i]} for i in range(64)]
    args = SAMTrainingArguments(
        output_dir=output_dir, max_steps=4, per_device_train_batch_size=16,
        learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
        train_sampling_strategy="sequential", disable_tqdm=True, sam_rho=0.1, sam_sync_ascent=True,
        **sam, **extra,
    )  # fmt: skip
    return SAMTrainer(model=model, args=args, train_dataset=data)


def worker(out: str, case: str, fsdp: bool) -> None:
    extra = {"fsdp": "full_shard", "fsdp_config": {"version": 2}} if fsdp else {}
    trainer = sam_trainer(os.path.join(out, case + ("-fsdp" if fsdp else "")), CASES[case], extra)
    trainer.train()
    weights = {}
    for name, p in trainer.model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[name.replace("_fsdp_wrapped_module.", "")] = full.detach().float().cpu()
    torch.save(
        {"weights": weights, "fsdp_active": trainer.is_fsdp_enabled, "log": trainer.state.log_history},
        os.path.join(out, f"{case}-{int(fsdp)}.pt"),
    )


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        case, fsdp = sys.argv[2], sys.argv[3] == "1"
        worker(os.environ["FSDP_CHECK_OUT"], case, fsdp)
        return 0
    if not torch.cuda.is_available():
        print("gpu_fsdp_check: no CUDA device; accelerate enables FSDP only on accelerators.")
        return 2
    out = tempfile.mkdtemp(prefix="fsdp_check_")
    rows = []
    for case in CASES:
        for fsdp in (False, True):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", __file__, "--worker", case,
                   str(int(fsdp))]  # fmt: skip
            proc = subprocess.run(cmd, env={**os.environ, "FSDP_CHECK_OUT": out}, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:])
                rows.append({"case": case, "fsdp": fsdp, "error": proc.stderr.strip().splitlines()[-1:]})
        try:
            plain = torch.load(os.path.join(out, f"{case}-0.pt"))
            sharded = torch.load(os.path.join(out, f"{case}-1.pt"))
        except FileNotFoundError:
            continue
        diff = max((plain["weights"][n] - sharded["weights"][n]).abs().max().item() for n in plain["weights"])
        moved = max((plain["weights"][n]).abs().max().item() for n in plain["weights"])
        rows.append(
            {"case": case, "fsdp_active": sharded["fsdp_active"], "max_abs_diff": diff, "max_abs_weight": moved}
        )
    print(json.dumps(rows, indent=1))
    return 0 if rows and all("error" not in r and r["fsdp_active"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
