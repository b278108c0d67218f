#!/usr/bin/env python
"""SAMTrainer under accelerate's FSDP2 against the same run without FSDP, on one GPU.

    python benchmarks/gpu_fsdp_check.py            # launches both runs with torchrun, compares, prints a table

Each run trains a small MLP classifier for 4 steps (SAM k=2, synchronized ascent, for fp32 and bf16
autocast, the rules normalized and projected+ASAM+mean) in its own process under torchrun, once
with --fsdp full_shard (fsdp_config version 2) and once without, then the final weights are compared.
With FSDP the Trainer must report it active (accelerate enables FSDP on accelerators only). Each launch
runs every case (a torchrun start costs seconds: two launches, not one per case). HF_SAM_GPU_DRY_RUN=1 runs
the same launches on the CPU, where accelerate leaves FSDP off: the dry run proves the launch path and the
comparison, not the sharding (tests/distributed/test_fsdp.py shards on a CPU mesh).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_env import DRY_RUN, comparison_verdict, device_ready, launch_workers  # noqa: E402

PART = "fsdp2"
CASES = {
    "normalized-fp32": dict(sam_ascent_steps=2),
    "normalized-bf16": dict(sam_ascent_steps=2, bf16=True),
    "projected-asam-mean-fp32": dict(
        sam_ascent_steps=3, sam_ascent_rule="projected", sam_adaptive=True, sam_descent="mean"
    ),
    # accumulation under the Trainer's no_sync: every SAM pass still reduce-scatters (bf16 autocast)
    "accumulation-2-bf16": dict(sam_ascent_steps=2, gradient_accumulation_steps=2, bf16=True),
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
        disable_tqdm=True, sam_rho=0.1, sam_sync_ascent=True, use_cpu=DRY_RUN, **sam, **extra,
    )  # fmt: skip
    # the rows in order (the order the no-FSDP run sees too), on every transformers release
    args.train_sampling_strategy = "sequential"
    return SAMTrainer(model=model, args=args, train_dataset=data)


def _reset_accelerate() -> None:
    """Each case builds its own Trainer (and Accelerator) with its own precision in one process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def worker(out: str, fsdp: bool) -> None:
    extra = {"fsdp": "full_shard", "fsdp_config": {"version": 2}} if fsdp else {}
    for case, sam in CASES.items():
        _reset_accelerate()
        start = time.perf_counter()
        trainer = sam_trainer(os.path.join(out, case + ("-fsdp" if fsdp else "")), sam, extra)
        trainer.train()
        print(f"{case}: built and trained in {time.perf_counter() - start:.1f} s", flush=True)
        weights = {}
        for name, p in trainer.model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights[name.replace("_fsdp_wrapped_module.", "")] = full.detach().float().cpu()
        torch.save(
            {"weights": weights, "fsdp_active": trainer.is_fsdp_enabled, "log": trainer.state.log_history},
            os.path.join(out, f"{case}-{int(fsdp)}.pt"),
        )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(os.environ["FSDP_CHECK_OUT"], sys.argv[2] == "1")
        return 0
    if not device_ready(PART):
        return 1
    out = tempfile.mkdtemp(prefix="fsdp_check_")
    errors = launch_workers(__file__, ["0", "1"], {"FSDP_CHECK_OUT": out})  # without, then with FSDP2
    rows = []
    for case in CASES:
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
    # bf16 autocast rounds each run's passes alike but not bit-identically: a bf16 ulp at the weights' scale
    close = all(
        r["max_abs_diff"] <= (1e-2 if "bf16" in r["case"] else 1e-5) * max(1.0, r["max_abs_weight"]) for r in rows
    )
    active = all(r["fsdp_active"] for r in rows) or DRY_RUN  # accelerate leaves FSDP off on a CPU
    worst = max((r["max_abs_diff"] for r in rows), default=float("nan"))
    what = (
        f"{len(rows)} cases, FSDP2 {'active' if all(r['fsdp_active'] for r in rows) else 'NOT active'}, "
        f"largest weight difference to the unsharded run {worst:.2e}"
    )
    return comparison_verdict(PART, errors, len(rows) == len(CASES) and close and active, what)


if __name__ == "__main__":
    sys.exit(main())
