#!/usr/bin/env python
"""SAM step time and peak memory against the (k+1)-pass floor and a peer SAM, measured in one run.

Variants, all on the same model, batch and AdamW optimizer, timed interleaved (round-robin) after
warm-up, median of many steps:
  floor  k+1 plain forward+backward passes (accumulating) + one optimizer step: what SAM cannot beat
  plain  SAMTrainer.training_step with k=0 (the stock Trainer step) + optimizer step
  sam    SAMTrainer.training_step with k ascent steps and a rule + optimizer step
  peer   pytorch_optimizer's SAM (k=1): first_step/second_step with a closure-free loop

Two ratios: `x floor` (the target) and `x trainer` = against the stock Trainer step plus k more
plain passes (plain + floor_k - floor_0), which leaves out the Trainer's own per-step work
(model.train(), input preparation) that SAMTrainer pays once, like the Trainer.

    python benchmarks/bench_step.py --preset cpu --json benchmarks/cpu.json
    python benchmarks/bench_step.py --preset gpu            # BERT-base, ViT-base, ResNet-50 in bf16

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the growth of the peak RSS of a
fresh process that builds the model and runs only that variant (model, activations, gradients,
optimizer state and SAM's copy), so variants do not see each other's peaks, with glibc told to
return freed tensors to the OS at once (MALLOC_MMAP_THRESHOLD_), so the RSS follows the tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Case:
    name: str
    build: callable  # () -> (model, batch)


def _bert(hidden, layers, heads, inter, batch, seq, device):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config).to(device)
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }
    return model, {k: v.to(device) for k, v in data.items()}


def _vit(hidden, layers, heads, inter, image, patch, batch, device):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        image_size=image,
        patch_size=patch,
        num_labels=10,
    )
    model = ViTForImageClassification(config).to(device)
    g = torch.Generator().manual_seed(0)
    data = {
        "pixel_values": torch.randn(batch, 3, image, image, generator=g),
        "labels": torch.randint(0, 10, (batch,), generator=g),
    }
    return model, {k: v.to(device) for k, v in data.items()}


def _resnet(depths, hidden, layer_type, image, batch, device):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(depths=depths, hidden_sizes=hidden, layer_type=layer_type, num_labels=10)
    model = ResNetForImageClassification(config).to(device)
    g = torch.Generator().manual_seed(0)
    data = {
        "pixel_values": torch.randn(batch, 3, image, image, generator=g),
        "labels": torch.randint(0, 10, (batch,), generator=g),
    }
    return model, {k: v.to(device) for k, v in data.items()}


def cases(preset: str, device: str) -> list[Case]:
    if preset == "cpu":
        return [
            Case("bert-tiny (4x256, 16x64)", lambda: _bert(256, 4, 4, 1024, 16, 64, device)),
            Case("vit-tiny (4x192, 16x32^2)", lambda: _vit(192, 4, 4, 768, 32, 4, 16, device)),
            Case(
                "resnet-small (BN, 16x32^2)", lambda: _resnet([1, 1, 1, 1], [32, 64, 128, 256], "basic", 32, 16, device)
            ),
        ]
    return [
        Case("bert-base (32x128)", lambda: _bert(768, 12, 12, 3072, 32, 128, device)),
        Case("vit-base (64x224^2)", lambda: _vit(768, 12, 12, 3072, 224, 16, 64, device)),
        Case(
            "resnet-50 (64x224^2)", lambda: _resnet([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck", 224, 64, device)
        ),
    ]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_variant(kind: str, model, batch, k: int, rule: str, bf16: bool, device: str):
    """A closure running one full optimizer step of the variant."""
    from transformers import set_seed

    from hf_sam import SAMTrainer, SAMTrainingArguments

    set_seed(0)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if kind == "peer":
        from pytorch_optimizer import SAM

        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-5, foreach=True)

        def step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            opt.first_step(zero_grad=True)
            with autocast:
                loss2 = model(**batch).loss
            loss2.backward()
            opt.second_step(zero_grad=True)

        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    if kind == "floor":

        def step():
            for _ in range(k + 1):
                with autocast:
                    loss = model(**batch).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    args = SAMTrainingArguments(
        output_dir="/tmp/hf_sam_bench",
        report_to=[],
        use_cpu=device == "cpu",
        sam_ascent_steps=k if kind == "sam" else 0,
        sam_ascent_rule=rule if kind == "sam" else "normalized",
    )
    trainer = SAMTrainer(model=model, args=args)
    trainer.optimizer = opt
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this bypasses

    def step():
        with autocast:
            trainer.training_step(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.trainer = trainer  # for benchmarks/profile_step.py, which times the trainer's phases
    return step


def variant_list(ks: list[int], rules: list[str]) -> list[tuple[str, int, str]]:
    out = [("plain", 0, "-")] + [("floor", k, "-") for k in [0, *ks]]
    out += [("sam", k, rule) for k in ks for rule in rules]
    out.append(("peer", 1, "normalized"))
    return out


def time_case(case: Case, variants, steps: int, warmup: int, bf16: bool, device: str) -> dict:
    model, batch = case.build()
    model.train()
    runners = {v: make_variant(v[0], model, batch, v[1], v[2], bf16, device) for v in variants}
    for _ in range(warmup):
        for run in runners.values():
            run()
    _sync(device)
    times = {v: [] for v in variants}
    for _ in range(steps):  # interleaved, so drift hits every variant alike
        for v, run in runners.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) * 1000 for v, t in times.items()}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _peak_child(preset: str, index: int, variant, bf16: bool, device: str, queue) -> None:
    """In a fresh (spawned) process: the peak RSS growth while building the model and running this
    variant only, over the RSS after the imports (the high-water mark is reset there)."""
    from hf_sam import SAMTrainer  # noqa: F401 - import everything before the baseline

    torch.set_num_threads(1)
    case = cases(preset, device)[index]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = _status_mib("VmRSS")
    model, batch = case.build()
    run = make_variant(variant[0], model, batch, variant[1], variant[2], bf16, device)
    for _ in range(3):
        run()
    queue.put(_status_mib("VmHWM") - start)


def peak_mib(preset: str, index: int, case: Case, variant, bf16: bool, device: str) -> float:
    if device == "cuda":
        model, batch = case.build()
        run = make_variant(variant[0], model, batch, variant[1], variant[2], bf16, device)
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del model, run
        torch.cuda.empty_cache()
        return peak
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(preset, index, variant, bf16, device, queue))
    # A fixed mmap threshold makes glibc hand every freed tensor above 64 KiB back to the OS at once,
    # so the RSS follows the live tensors; with its default, adaptive threshold the heap keeps freed
    # memory and the peaks wander by +-15 MiB from run to run.
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    value = queue.get(timeout=600)
    proc.join()
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--rules", nargs="+", default=["normalized", "projected", "accumulated"])
    parser.add_argument("--steps", type=int, help="Timed steps per variant (default 15 cpu, 20 gpu).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", help="Only the models whose name starts with one of these.")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurement.")
    parser.add_argument("--json", help="Write the rows as a JSON list here.")
    args = parser.parse_args(argv)
    device = "cuda" if args.preset == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --preset gpu needs a CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bf16 = device == "cuda"
    steps = args.steps or (15 if device == "cpu" else 20)
    variants = variant_list(args.ks, args.rules)
    if importlib.util.find_spec("pytorch_optimizer") is None:
        print("# pytorch_optimizer is not installed (pip install -e '.[bench]'): no peer rows", file=sys.stderr)
        variants = [v for v in variants if v[0] != "peer"]
    rows = []
    header = (
        f"{'model':28} {'variant':7} {'k':>2} {'rule':12} {'ms':>9} {'x floor':>8} {'x trainer':>9} {'peak MiB':>9}"
    )
    print(
        f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
        f"threads {torch.get_num_threads()}, bf16 {bf16}, median of {steps} interleaved steps"
    )
    print(header)
    for index, case in enumerate(cases(args.preset, device)):
        if args.models and not case.name.startswith(tuple(args.models)):
            continue
        medians = time_case(case, variants, steps, args.warmup, bf16, device)
        floor = {v[1]: medians[v] for v in variants if v[0] == "floor"}
        # the stock Trainer step plus k more plain passes: what SAMTrainer adds over the Trainer
        plain = medians[("plain", 0, "-")]
        trainer_floor = {k: plain + floor[k] - floor[0] for k in floor}
        for v in variants:
            kind, k, rule = v
            peak = None if args.no_memory else peak_mib(args.preset, index, case, v, bf16, device)
            row = {
                "model": case.name,
                "variant": kind,
                "k": k,
                "rule": rule,
                "ms_median": round(medians[v], 3),
                "ratio_to_floor": round(medians[v] / floor[k], 4) if k in floor else None,
                "ratio_to_trainer_floor": round(medians[v] / trainer_floor[k], 4) if k in floor else None,
                "peak_mib": None if peak is None else round(peak, 1),
            }
            rows.append(row)
            ratio = "" if row["ratio_to_floor"] is None else f"{row['ratio_to_floor']:.3f}"
            ratio_trainer = "" if row["ratio_to_trainer_floor"] is None else f"{row['ratio_to_trainer_floor']:.3f}"
            print(
                f"{case.name:28} {kind:7} {k:>2} {rule:12} {row['ms_median']:>9.2f} {ratio:>8} {ratio_trainer:>9} "
                f"{'' if peak is None else f'{peak:9.1f}'}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
