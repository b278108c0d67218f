#!/usr/bin/env python
"""GPU check: bf16 and fp16 SAMTrainer steps for k in {1, 3} on from-config BERT-base and ViT-base.

Checks, per case: the weights are bit-identical after training_step, the losses are finite, the descent
gradients are finite or (fp16) the loss scaler skips that step and lowers its scale, at least one of the 4
steps is applied and leaves the weights finite; prints a table. Needs only
torch, transformers and accelerate (no network, no datasets/evaluate); finishes in a few minutes.
HF_SAM_GPU_DRY_RUN=1 runs the same on the CPU with tiny models.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_env import DEVICE, DRY_RUN, device_name, device_ready, synchronize, verdict  # noqa: E402

PART = "precision"


def main() -> int:
    if not device_ready(PART):
        return 1
    import accelerate
    import transformers
    from bench_step import _bert, _vit

    from hf_sam import SAMTrainer, SAMTrainingArguments

    print(
        f"# {device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}"
    )
    print(
        f"{'model':10} {'prec':5} {'k':>2} {'restored':>9} {'finite':>7} {'skipped':>7} {'loss':>8} "
        f"{'sharpness':>10} {'ms/step':>8}"
    )
    failures = 0
    builders = {
        "bert-base": lambda: _bert(768, 12, 12, 3072, 32, 128, DEVICE),
        "vit-base": lambda: _vit(768, 12, 12, 3072, 224, 16, 32, DEVICE),
    }
    if DRY_RUN:
        builders = {
            "bert-tiny": lambda: _bert(32, 1, 2, 64, 4, 8, DEVICE),
            "vit-tiny": lambda: _vit(32, 1, 2, 64, 16, 8, 4, DEVICE),
        }
    for name, build in builders.items():
        for precision in ("bf16", "fp16"):
            for k in (1, 3):
                transformers.set_seed(0)
                model, batch = build()
                args = SAMTrainingArguments(
                    output_dir="/tmp/hf_sam_gpu_check",
                    report_to=[],
                    max_steps=1,
                    sam_ascent_steps=k,
                    sam_rho=0.05,
                    use_cpu=DRY_RUN,
                    **{precision: True},
                )
                trainer = SAMTrainer(model=model, args=args)
                trainer.create_optimizer()
                trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this bypasses
                optimizer = trainer.optimizer
                before = [p.detach().clone() for p in model.parameters()]
                times = []
                restored = finite = True
                skipped = 0
                for step in range(4):
                    synchronize()
                    start = time.perf_counter()
                    with trainer.accelerator.autocast():
                        loss = trainer.training_step(model, batch)
                    synchronize()
                    times.append(time.perf_counter() - start)
                    if step == 0:
                        restored = all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
                    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
                    finite &= bool(torch.isfinite(loss))
                    scaler = trainer.accelerator.scaler
                    if scaler is not None:
                        # fp16: scaled gradients may overflow (the scaler's first scale is 2**16); then the
                        # scaler must skip the step and lower its scale, leaving the weights as they were
                        scale, weights = scaler.get_scale(), [p.detach().clone() for p in model.parameters()]
                        scaler.step(optimizer)
                        scaler.update()
                        if not grads_finite:
                            skipped += 1
                            finite &= scaler.get_scale() < scale and all(
                                torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True)
                            )
                        del weights
                    else:
                        finite &= grads_finite
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                # at least one step applied, and the weights it left finite
                moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
                finite &= skipped < 4 and moved
                logs = trainer.sam_log_metrics()
                ok = restored and finite and all(torch.isfinite(p).all() for p in model.parameters())
                failures += not ok
                print(
                    f"{name:10} {precision:5} {k:>2} {str(restored):>9} {str(finite):>7} {skipped:>7} "
                    f"{logs.get('sam/loss_clean', float('nan')):8.4f} {logs.get('sam/sharpness', float('nan')):10.5f} "
                    f"{1000 * sorted(times)[len(times) // 2]:8.1f}",
                    flush=True,
                )
                del model, trainer, optimizer, before
                if not DRY_RUN:
                    torch.cuda.empty_cache()
    cases = 4 * len(builders)
    return verdict(
        PART,
        not failures,
        f"{cases - failures} of {cases} bf16/fp16 cases restored w exactly and stayed finite, overflows skipped "
        f"({', '.join(builders)}, k 1 and 3)",
    )


if __name__ == "__main__":
    sys.exit(main())
