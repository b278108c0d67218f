#!/usr/bin/env python
"""SAMTrainer under DeepSpeed ZeRO-2 against the same run without DeepSpeed, on one GPU.

    python benchmarks/gpu_deepspeed_check.py       # launches both runs with torchrun, compares, prints a table

Each run trains a small MLP classifier for 4 steps (SAM k=2, synchronized ascent; normalized, and
projected+ASAM+mean) in its own process under torchrun, once with ``--deepspeed`` (ZeRO-2) and once
without, then the final weights and the wall time of the steps are compared: fp32 against fp32 (1e-5), and
``--bf16`` under ZeRO-2 and ZeRO-3 (which SAMTrainer maps onto DeepSpeed's torch_autocast) against ``--bf16``
without DeepSpeed (relative L2 distance of the weights within 5e-3, bf16 rounding), a case with gradient
accumulation 2 among them. DeepSpeed's bf16 parameter storage is refused before training
(docs/precision.md). Needs deepspeed on the device (carry a wheel, as for the peer). Each mode is one
torchrun launch running every case. HF_SAM_GPU_DRY_RUN=1 runs the same on the CPU, with the gloo recipe
of ../shared/TRAINER_NOTES.md ("DeepSpeed on a CPU").
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_env import DRY_RUN, comparison_verdict, device_ready, gloo_state_for_deepspeed, launch_workers, verdict  # noqa: E402
from gpu_fsdp_check import sam_trainer  # noqa: E402 - the same small classifier and rows as the FSDP2 check

PART = "deepspeed"

CASES = {
    "normalized": dict(sam_ascent_steps=2),
    "projected-asam-mean": dict(sam_ascent_steps=3, sam_ascent_rule="projected", sam_adaptive=True, sam_descent="mean"),
    # each micro-batch its own synchronized ascent, the descents summed before DeepSpeed's step
    "accumulation-2": dict(sam_ascent_steps=2, gradient_accumulation_steps=2),
}
ZERO2 = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


def _case(out: str, case: str, deepspeed: str) -> None:
    from accelerate.state import AcceleratorState

    # accelerate takes a DeepSpeed plugin only in the first Accelerator of a process: forget it between cases
    AcceleratorState._reset_state(reset_partial_state=False)
    extra = {"bf16": True} if deepspeed in ("none-bf16", "autocast", "autocast-zero3") else {}
    if not deepspeed.startswith("none"):
        precision = {"bf16": {"enabled": True}} if deepspeed == "bf16" else {}
        if deepspeed.startswith("autocast"):  # --bf16 with bf16 "auto": SAMTrainer maps it onto torch_autocast
            precision = {"bf16": {"enabled": "auto"}}
        stage = {"zero_optimization": {"stage": 3}} if deepspeed.endswith("zero3") else {}
        extra["deepspeed"] = {**ZERO2, **precision, **stage}
        if DRY_RUN:  # the process group comes from the PartialState made in worker()
            extra["accelerator_config"] = {"use_configured_state": True}
    try:
        trainer = sam_trainer(os.path.join(out, f"{case}-{deepspeed}"), CASES[case], extra)
    except ValueError as err:  # the bf16 case: refused before training
        torch.save({"refused": str(err)}, os.path.join(out, f"{case}-{deepspeed}.pt"))
        return
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    gathered = contextlib.nullcontext()
    if deepspeed.endswith("zero3"):  # ZeRO-3 keeps partitions: the whole weights to compare
        import deepspeed as ds

        gathered = ds.zero.GatheredParameters(list(trainer.model.parameters()))
    with gathered:
        weights = {n.removeprefix("module."): p.detach().float().cpu() for n, p in trainer.model.named_parameters()}
    torch.save({"weights": weights, "seconds": seconds}, os.path.join(out, f"{case}-{deepspeed}.pt"))


def worker(out: str, deepspeed: str) -> None:
    if DRY_RUN and deepspeed == "deepspeed":
        gloo_state_for_deepspeed()
    for case in CASES:  # the DeepSpeed launch: fp32, --bf16 (torch_autocast), and the bf16 storage refusal
        modes = ("fp32", "autocast", "autocast-zero3", "bf16") if deepspeed == "deepspeed" else ("none", "none-bf16")
        for mode in modes:
            _case(out, case, mode)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown, which can abort under load


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(os.environ["DS_CHECK_OUT"], sys.argv[2])
        return 0
    if not device_ready(PART):
        return 1
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        return verdict(PART, False, f"deepspeed does not import: {error}")
    out = tempfile.mkdtemp(prefix="ds_check_")
    errors = launch_workers(__file__, ["none", "deepspeed"], {"DS_CHECK_OUT": out})
    rows = []
    for case in CASES:
        modes = ("none", "fp32", "none-bf16", "autocast", "autocast-zero3", "bf16")
        try:
            plain, zero2, plain_bf16, autocast, zero3, bf16 = (
                torch.load(os.path.join(out, f"{case}-{m}.pt")) for m in modes
            )
        except FileNotFoundError:
            continue
        diff = max((plain["weights"][n] - zero2["weights"][n]).abs().max().item() for n in plain["weights"])
        flat = lambda run: torch.cat([w.reshape(-1) for w in run["weights"].values()])  # noqa: E731
        rel = float((flat(autocast) - flat(plain_bf16)).norm() / flat(plain_bf16).norm())
        rel3 = float((flat(zero3) - flat(plain_bf16)).norm() / flat(plain_bf16).norm())
        rows.append(
            {
                "case": case, "max_abs_diff": diff, "seconds_plain": round(plain["seconds"], 3),
                "seconds_zero2": round(zero2["seconds"], 3), "bf16_rel_l2": rel, "bf16_rel_l2_zero3": rel3,
                "seconds_zero2_autocast": round(autocast["seconds"], 3), "bf16_refused": "refused" in bf16,
            }
        )  # fmt: skip
    print(json.dumps(rows, indent=1))
    ok = len(rows) == len(CASES) and all(
        r["bf16_refused"] and r["max_abs_diff"] <= 1e-5 and max(r["bf16_rel_l2"], r["bf16_rel_l2_zero3"]) <= 5e-3
        for r in rows
    )
    worst = max((r["max_abs_diff"] for r in rows), default=float("nan"))
    worst_bf16 = max((max(r["bf16_rel_l2"], r["bf16_rel_l2_zero3"]) for r in rows), default=float("nan"))
    what = (
        f"{len(rows)} cases under ZeRO-2, largest weight difference to the run without DeepSpeed {worst:.2e} (fp32), "
        f"{worst_bf16:.1e} relative (--bf16 as torch_autocast, ZeRO-2 and ZeRO-3, against --bf16), bf16 storage "
        f"{'refused' if all(r['bf16_refused'] for r in rows) else 'NOT refused'} before training"
    )
    return comparison_verdict(PART, errors, ok, what)


if __name__ == "__main__":
    sys.exit(main())
