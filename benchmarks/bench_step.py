#!/usr/bin/env python
"""SAM step time and peak memory against the (k+1)-pass floor and a peer SAM, measured in one run,
every ratio with a 95% confidence interval.

Variants, all on the same model, batch and AdamW optimizer:
  floor  k+1 plain forward+backward passes (accumulating) + one optimizer step: what SAM cannot beat
  plain  SAMTrainer.training_step with k=0 (the stock Trainer step) + optimizer step
  sam    SAMTrainer.training_step with k ascent steps and a rule + optimizer step
  peer   pytorch_optimizer's SAM (k=1): first_step/second_step with a closure-free loop
  looksam  SAMTrainer with sam_every_n_steps=5 and LookSAM's reuse, timed per cycle of 5 steps (one SAM
         step of k ascent passes, four one-pass steps) against its own floor, cyclefloor: 5 + k passes
         and 5 optimizer steps ((1 + k/5) passes per step on average)
  msam   SAMTrainer with sam_method="msam": one pass per step, against the floor of k = 0

After warm-up the variants are timed in rounds, each round running every variant once in a shuffled
order, and every ratio is taken within a round (paired), so drift of the machine cancels. Rounds are
added until every SAM row's intervals are narrower than --target (+-1% by default) or the time cap is
hit; the table says which (benchmarks/intervals.py). Three ratios: `x floor`, `x trainer` = against
the stock Trainer step plus k more plain passes (plain + floor_k - floor_0), which leaves out the
Trainer's own per-step work (model.train(), input preparation) that SAMTrainer pays once, like the
Trainer, and `x peer` (k=1). The targets, judged from the intervals only (met / missed / not
resolved): SAM <= 1.03 x trainer, and SAM <= 1.00 x peer at k=1.

    python benchmarks/bench_step.py --quick                 # k=1 rows of resnet-small, about 5 minutes
    python benchmarks/bench_step.py --preset cpu --json benchmarks/cpu_results.json
    python benchmarks/bench_step.py --preset gpu            # BERT-base, ViT-base, ResNet-50 in bf16

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the growth of the peak RSS of a
fresh process that builds the model and runs only that variant (model, activations, gradients,
optimizer state and SAM's copy), so variants do not see each other's peaks, with glibc told to
return freed tensors to the OS at once (MALLOC_MMAP_THRESHOLD_), so the RSS follows the tensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from intervals import Interval, Rounds, ratio_interval  # noqa: E402
from step_variants import CYCLE, make_variant, variant_list  # noqa: E402, F401 - make_variant: for the other scripts

TRAINER_LIMIT = 1.03  # SAM <= 1.03 x (stock Trainer step + k plain passes)
PEER_LIMIT = 1.00  # never slower than the peer at k=1
TRAINER_KEY, PEER_KEY = f"x trainer <= {TRAINER_LIMIT}", f"x peer <= {PEER_LIMIT}"


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


def training_case(parser: argparse.ArgumentParser, prefix: str, preset: str = "cpu", device: str = "cpu"):
    """The preset's model whose name starts with ``prefix``, built and in training mode, with its batch
    (a parser error naming the prefix when none does): ``(case, model, batch)``."""
    chosen = [c for c in cases(preset, device) if c.name.startswith(prefix)]
    if not chosen:
        parser.error(f"no {preset} model starts with {prefix!r}")
    model, batch = chosen[0].build()
    model.train()
    return chosen[0], model, batch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timer(runners: dict, device: str):
    def time_one(variant) -> float:
        _sync(device)
        start = time.perf_counter()
        runners[variant]()
        _sync(device)
        return time.perf_counter() - start

    return time_one


def ratios(rounds: Rounds, resamples: int = 4000) -> dict:
    """Every ratio of every variant with its interval: {(variant, name): Interval}."""
    t = {v: rounds.times[v] for v in rounds.variants}
    floor = {v[1]: t[v] for v in rounds.variants if v[0] == "floor"}
    plain = t.get(("plain", 0, "-"))
    peer = next((t[v] for v in rounds.variants if v[0] == "peer"), None)
    out = {}
    for v in rounds.variants:
        kind, k, _ = v
        if kind in ("looksam", "cyclefloor"):  # one cycle of CYCLE steps: its own floor, CYCLE stock steps + k
            base = t[("cyclefloor", k, f"n{CYCLE}")]
            out[v, "floor"] = ratio_interval(t[v], base, resamples=resamples)
            if plain is not None and k in floor and 0 in floor:
                trainer = [CYCLE * p + f - f0 for p, f, f0 in zip(plain, floor[k], floor[0], strict=True)]
                out[v, "trainer"] = ratio_interval(t[v], trainer, resamples=resamples)
            continue
        if kind == "msam":  # one pass: the floor of k = 0, and the stock Trainer step itself
            out[v, "floor"] = ratio_interval(t[v], floor[0], resamples=resamples)
            if plain is not None:
                out[v, "trainer"] = ratio_interval(t[v], plain, resamples=resamples)
            continue
        if k in floor:
            out[v, "floor"] = ratio_interval(t[v], floor[k], resamples=resamples)
            if plain is not None and 0 in floor:
                trainer = [p + f - f0 for p, f, f0 in zip(plain, floor[k], floor[0], strict=True)]
                out[v, "trainer"] = ratio_interval(t[v], trainer, resamples=resamples)
        if peer is not None and kind == "sam" and k == 1:
            out[v, "peer"] = ratio_interval(t[v], peer, resamples=resamples)
    return out


def _target_widths(rounds: Rounds) -> list[float]:
    """The half-widths the sampling waits on: every ratio of the SAM rows."""
    # checked every few rounds while sampling: fewer resamples than the reported intervals
    found = ratios(rounds, resamples=1000)
    return [iv.half_width for (v, _), iv in found.items() if v[0] in ("sam", "looksam", "msam")] or [0.0]


def time_case(case: Case, variants, bf16: bool, device: str, opts) -> tuple[Rounds, str]:
    model, batch = case.build()
    model.train()
    runners = {v: make_variant(v[0], model, batch, v[1], v[2], bf16, device) for v in variants}
    for _ in range(opts.warmup):
        for run in runners.values():
            run()
    _sync(device)
    rounds = Rounds(variants, seed=0)
    stopped = rounds.sample_until(
        _timer(runners, device),
        _target_widths,
        target=opts.target,
        min_rounds=opts.min_rounds,
        max_rounds=opts.max_rounds,
        time_cap_s=opts.time_cap,
        clock=time.perf_counter,
    )
    return rounds, stopped


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


def _cpu_name() -> str:
    """The CPU model and core count, as /proc/cpuinfo tells them (the machine a table was measured on)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"cpu {names[0] if names else 'unknown'} x{len(names) or os.cpu_count()}"


def _format(iv: Interval | None) -> str:
    return "" if iv is None else f"{iv.estimate:.3f} [{iv.low:.3f},{iv.high:.3f}]"


def _verdicts(v, found: dict) -> dict:
    out = {}
    if v[0] in ("sam", "looksam", "msam") and (v, "trainer") in found:
        out[TRAINER_KEY] = found[v, "trainer"].verdict(TRAINER_LIMIT)
    if (v, "peer") in found:
        out[PEER_KEY] = found[v, "peer"].verdict(PEER_LIMIT)
    return out


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="The k=1 rows of resnet-small, no memory: ~5 minutes.")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--rules", nargs="+", default=["normalized", "projected", "accumulated"])
    parser.add_argument("--target", type=float, default=0.01, help="Stop once every half-width is below this.")
    parser.add_argument("--time_cap", type=float, help="Seconds of timed rounds per model (cpu 600, gpu 45).")
    parser.add_argument(
        "--min_rounds",
        type=int,
        default=30,
        help="At least this many rounds: a bootstrap of a median over fewer is too coarse to trust.",
    )
    parser.add_argument("--max_rounds", type=int, default=5000)
    parser.add_argument("--rounds", type=int, help="Exactly this many rounds (no stopping rule).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", help="Only the models whose name starts with one of these.")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurement.")
    parser.add_argument(
        "--no_family", action="store_true", help=f"Skip the LookSAM (n={CYCLE}, k=1 and 3) and MSAM rows."
    )
    parser.add_argument("--json", help="Write the rows as a JSON list here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.ks, args.no_memory = args.models or ["resnet"], [1], True
        args.time_cap = args.time_cap or 240.0
    args.time_cap = args.time_cap or (600.0 if args.preset == "cpu" else 45.0)
    if args.rounds:
        args.min_rounds = args.max_rounds = args.rounds
        args.time_cap = float("inf")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if args.preset == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --preset gpu needs a CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bf16 = device == "cuda"
    variants = variant_list(args.ks, args.rules, family=not args.no_family)
    if importlib.util.find_spec("pytorch_optimizer") is None:
        print("# pytorch_optimizer is not installed (pip install -e '.[bench]'): no peer rows", file=sys.stderr)
        variants = [v for v in variants if v[0] != "peer"]
    rows = []
    print(
        f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else _cpu_name()}, "
        f"threads {torch.get_num_threads()}, bf16 {bf16}; ratios: median of per-round ratios [95% bootstrap "
        f"interval], rounds until every SAM half-width <= {args.target:g} or {args.time_cap:g} s"
    )
    header = (
        f"{'model':28} {'variant':10} {'k':>2} {'rule':11} {'ms':>8} {'x floor [95%]':>21} {'x trainer [95%]':>21} "
        f"{'x peer [95%]':>21} {'<=1.03 trainer':>14} {'<=1 peer':>12} {'peak MiB':>8}"
    )
    print(header)
    for index, case in enumerate(cases(args.preset, device)):
        if args.models and not case.name.startswith(tuple(args.models)):
            continue
        rounds, stopped = time_case(case, variants, bf16, device, args)
        found = ratios(rounds)
        for v in variants:
            kind, k, rule = v
            peak = None if args.no_memory else peak_mib(args.preset, index, case, v, bf16, device)
            got = {name: found.get((v, name)) for name in ("floor", "trainer", "peer")}
            verdicts = _verdicts(v, found)
            row = {
                "model": case.name,
                "variant": kind,
                "k": k,
                "rule": rule,
                "ms_median": round(statistics.median(rounds.times[v]) * 1000, 3),
                "rounds": len(rounds),
                "stopped": stopped,
                "peak_mib": None if peak is None else round(peak, 1),
                "verdicts": verdicts,
            }
            for name, key in (
                ("floor", "ratio_to_floor"),
                ("trainer", "ratio_to_trainer_floor"),
                ("peer", "ratio_to_peer"),
            ):
                iv = got[name]
                row[key] = None if iv is None else round(iv.estimate, 4)
                row[key + "_ci95"] = None if iv is None else iv.as_list()
            rows.append(row)
            print(
                f"{case.name:28} {kind:10} {k:>2} {rule:11} {row['ms_median']:>8.2f} {_format(got['floor']):>21} "
                f"{_format(got['trainer']):>21} {_format(got['peer']):>21} "
                f"{verdicts.get(TRAINER_KEY, ''):>14} {verdicts.get(PEER_KEY, ''):>12} "
                f"{'' if peak is None else f'{peak:8.1f}'}",
                flush=True,
            )
        widest = max(_target_widths(rounds))
        print(f"# {case.name}: {len(rounds)} rounds, stopped by the {stopped} (widest SAM half-width {widest:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
