#!/usr/bin/env python
"""SAM's extra memory per rank under DDP, DeepSpeed ZeRO-2 and ZeRO-3, against the model's size (CPU, gloo).

    python benchmarks/sharded_memory.py                    # 2 and 4 ranks, a 42M-parameter MLP (~5 minutes)
    python benchmarks/sharded_memory.py --ranks 2 --hidden 2048 --json out.json

Each case is one torchrun launch of SAMTrainer for a few steps, once stock (``sam_ascent_steps 0``) and once
with SAM (k=1, synchronized ascent). A rank measures its own resident memory over training only: the peak
(VmHWM) is reset once the engine is prepared (``/proc/self/clear_refs``), so the model built whole on every
rank before ZeRO partitions it does not hide what SAM adds later. SAM's extra = (SAM run's training peak -
its resident memory at the reset) - the same for the stock run, the largest over ranks; it is printed against
the model's fp32 size and against one rank's share of it (size / ranks). For ZeRO-2, "gather MiB" is what one
of ZeRO-2's own refreshes of the weights (``update_lp_params``: an all-gather) peaks above the memory before
it, after the stock run: the backend's staging, which SAM's refreshes meet while its state is alive. glibc's
mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the system instead of staying
in the heap.
FSDP2 is not here: accelerate enables it only on accelerators (tests/distributed/test_fsdp.py asserts
that SAM's snapshot is each rank's shard on a CPU mesh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ENGINES = ("ddp", "zero2", "zero3")
STEPS = 4


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _deepspeed_config(engine: str) -> dict:
    zero = {"stage": 2} if engine == "zero2" else {"stage": 3, "stage3_param_persistence_threshold": 0}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def worker(out: str, engine: str, k: int, hidden: int) -> None:
    import torch
    from transformers import TrainerCallback, set_seed

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    from gpu_env import gloo_state_for_deepspeed

    from hf_sam import SAMTrainer, SAMTrainingArguments

    torch.set_num_threads(1)
    extra: dict = {"ddp_backend": "gloo"}
    if engine != "ddp":
        gloo_state_for_deepspeed()
        extra = {"deepspeed": _deepspeed_config(engine), "accelerator_config": {"use_configured_state": True}}

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(hidden // 4, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 10),
            )  # fmt: skip

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}

    class TrainingPeak(TrainerCallback):
        """Resets the peak once the engine is prepared; reads it at the end."""

        def on_train_begin(self, args, state, control, **kwargs):
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.start = _rss_kib("VmRSS")

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = _rss_kib("VmHWM")

    set_seed(0)
    model = MLP()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    rows = 4 * STEPS * int(os.environ["WORLD_SIZE"])
    x, y = torch.randn(rows, hidden // 4, generator=g), torch.randint(0, 10, (rows,), generator=g)
    data = [{"x": x[i], "labels": y[i]} for i in range(rows)]
    args = SAMTrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=STEPS, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", disable_tqdm=True, learning_rate=1e-4, sam_ascent_steps=k, sam_rho=0.05,
        sam_sync_ascent=True, **extra,
    )  # fmt: skip
    peak = TrainingPeak()
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, callbacks=[peak])
    trainer.train()
    gather_kib = None
    if engine == "zero2":  # what one of ZeRO-2's own refreshes (fp32 master -> all-gathered weights) stages
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _rss_kib("VmRSS")
        trainer.accelerator.deepspeed_engine_wrapped.engine.optimizer.update_lp_params()
        gather_kib = _rss_kib("VmHWM") - before
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"{engine}-{k}-rank{rank}.json"), "w") as f:
        json.dump({"start_kib": peak.start, "peak_kib": peak.peak, "model_bytes": size, "gather_kib": gather_kib}, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown, which can abort under load


def _launch(out: str, engine: str, k: int, ranks: int, hidden: int) -> list[dict]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), os.path.abspath(__file__),
        "--worker", engine, str(k), str(hidden),
    ]  # fmt: skip
    env = {**os.environ, "SHARDED_MEMORY_OUT": out, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{engine} k={k} on {ranks} ranks failed")
    results = []
    for rank in range(ranks):
        with open(os.path.join(out, f"{engine}-{k}-rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(os.environ["SHARDED_MEMORY_OUT"], argv[1], int(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--hidden", type=int, default=4096, help="The MLP's width (4096: 42M parameters).")
    parser.add_argument("--json", help="Write the rows here.")
    args = parser.parse_args(argv)
    rows = []
    header = ("engine", "ranks", "model MiB", "share MiB", "SAM extra MiB", "x model", "x share", "gather MiB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 5, 10, 10, 14, 8, 8, 11), strict=True)))
    for ranks in args.ranks:
        for engine in args.engines:
            with tempfile.TemporaryDirectory(prefix="sam_memory_") as out:
                stock, sam = (_launch(out, engine, k, ranks, args.hidden) for k in (0, 1))
            growth = lambda run: [(r["peak_kib"] - r["start_kib"]) / 1024 for r in run]  # noqa: E731
            extra = max(s - b for s, b in zip(growth(sam), growth(stock), strict=True))
            model = stock[0]["model_bytes"] / 2**20
            row = {
                "engine": engine, "ranks": ranks, "model_mib": round(model, 1), "share_mib": round(model / ranks, 1),
                "sam_extra_mib": round(extra, 1), "x_model": round(extra / model, 2),
                "x_share": round(extra / (model / ranks), 2),
                # ZeRO-2: the transient of one all-gather of the weights (ZeRO's refresh) on this backend
                "gather_mib": None if stock[0]["gather_kib"] is None else round(
                    max(r["gather_kib"] for r in stock) / 1024, 1),
                "stock_growth_mib": [round(v, 1) for v in growth(stock)],
                "sam_growth_mib": [round(v, 1) for v in growth(sam)],
            }  # fmt: skip
            rows.append(row)
            print(
                f"{engine:7} {ranks:>5} {model:>10.1f} {model / ranks:>10.1f} {extra:>14.1f} "
                f"{row['x_model']:>8.2f} {row['x_share']:>8.2f} {row['gather_mib'] or '-':>11}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
