#!/usr/bin/env python
"""GPU check: the SAM engine's calls inside a training step make no host sync, under CUDA's own
sync debug mode (``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronizing call); with
HF_SAM_GPU_DRY_RUN=1, on the CPU, where the host reads of tensor values stand for the syncs.

The engine's phases (begin, every ascend, begin_descent, end_descent, restore) run in "error" mode
for k in {1, 3}, each rule, descents last/mean/xsam, and with a non-finite ascent gradient injected;
the model's forward and backward passes run outside it (a model may sync on its own). Then one whole
SAMTrainer.training_step runs in "warn" mode and the synchronizing calls it makes are counted next to
the stock Trainer step's (k=0). The CPU counterpart is tests/engine/test_no_host_sync.py.

    python benchmarks/gpu_sync_check.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_env import (  # noqa: E402,E501
    DEVICE,
    DRY_RUN,
    HostSyncError,
    counting_syncs,
    device_name,
    device_ready,
    no_host_sync,
    synchronize,
    verdict,
)

PART = "sync"
PHASES = ("begin", "ascend", "begin_descent", "end_descent", "restore")


def _strict(engine) -> None:
    """Run every engine phase of this engine in "error" mode."""
    for name in PHASES:
        original = getattr(engine, name)

        def strict(*args, _original=original, **kwargs):
            with no_host_sync():
                return _original(*args, **kwargs)

        setattr(engine, name, strict)


def _trainer(k: int, options: dict):
    from bench_step import _bert

    from hf_sam import SAMTrainer, SAMTrainingArguments

    size = (32, 1, 2, 64, 4, 8) if DRY_RUN else (128, 2, 2, 512, 8, 32)
    model, batch = _bert(*size, DEVICE)
    args = SAMTrainingArguments(
        output_dir="/tmp/hf_sam_sync_check", report_to=[], sam_ascent_steps=k, sam_rho=0.05,
        use_cpu=DRY_RUN, **options,
    )  # fmt: skip
    trainer = SAMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1
    return trainer, model, batch


def main() -> int:
    if not device_ready(PART):
        return 1
    failures = 0
    cases = [(k, {"sam_ascent_rule": rule}) for k in (1, 3) for rule in ("normalized", "projected", "accumulated")]
    cases += [(3, {"sam_descent": "mean"}), (3, {"sam_descent": "xsam", "sam_xsam_alpha": 0.5})]
    cases += [(3, {"sam_adaptive": True}), (3, {"sam_ascent_rule": "projected", "sam_step_mult": 0.6})]
    print(f"# {device_name()}, torch {torch.__version__}")
    for k, options in cases:
        for poison in (False, True):
            trainer, model, batch = _trainer(k, options)
            trainer.training_step(model, dict(batch))  # binds the engine; the first step reviews the norms once
            _strict(trainer.sam_run.engine)
            if poison:  # a non-finite first ascent gradient: dropped on the device
                handle = model.bert.embeddings.word_embeddings.weight.register_hook(lambda g: g * float("nan"))
            try:
                trainer.training_step(model, dict(batch))
                synchronize()
                found = "no sync"
            except HostSyncError as error:
                found, failures = f"SYNC: {str(error)[:80]}", failures + 1
            finally:
                if poison:
                    handle.remove()
            print(f"k={k} {options} non-finite={poison}: {found}")
    counts = {}
    for k in (0, 3):
        trainer, model, batch = _trainer(k, {})
        trainer.training_step(model, dict(batch))
        with counting_syncs() as found:
            trainer.training_step(model, dict(batch))
        counts[k] = found.count
    print(f"whole training_step, synchronizing calls: stock (k=0) {counts[0]}, SAM k=3 {counts[3]}")
    failures += counts[3] > counts[0]
    return verdict(
        PART,
        not failures,
        f"{2 * len(cases)} engine steps (rules, descents, ASAM, non-finite) "
        + ("made no host sync" if not failures else f"with {failures} failure(s)")
        + f"; whole step {counts[3]} sync(s) at k=3 against {counts[0]} for the stock step",
    )


if __name__ == "__main__":
    sys.exit(main())
