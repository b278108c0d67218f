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
from gpu_env import DRY_RUN, verdict  # noqa: E402
from intervals import Interval, Rounds, median_interval, ratio_interval  # noqa: E402
from own_time import (  # noqa: E402
    OWN_LIMIT,
    copy_variant,
    own_passes,
    own_time_row,
    own_verdict,
    phase_seconds,
    weight_bytes,
)
from step_timer import StepTimer, cpu_name  # noqa: E402
from step_variants import CYCLE, make_variant, variant_list  # noqa: E402, F401 - make_variant: for the other scripts
from throughput import bf16_peak_flops, step_flops  # noqa: E402

TRAINER_LIMIT = 1.03  # SAM <= 1.03 x (stock Trainer step + k plain passes), where the passes dominate
PEER_LIMIT = 1.00  # never slower than the peer at k=1
TRAINER_KEY, PEER_KEY = f"x trainer <= {TRAINER_LIMIT}", f"x peer <= {PEER_LIMIT}"
OWN_KEY = f"own <= {OWN_LIMIT} x traffic"
PHASES_KEY = f"phases <= {OWN_LIMIT} x traffic"
COPY = ("copy", 0, "-")


@dataclass
class Case:
    name: str
    build: callable  # () -> (model, batch)
    # The 1.03 x trainer target holds where the passes dominate SAM's own work. Where a pass is short against
    # the weights' bytes (resnet-small: 1.4 ms of SAM's 4 weight passes in a 43 ms step), SAM's own time is
    # bounded by its traffic floor instead, which the own-time target judges.
    trainer_target: bool = True


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
                "resnet-small (BN, 16x32^2)",
                lambda: _resnet([1, 1, 1, 1], [32, 64, 128, 256], "basic", 32, 16, device),
                trainer_target=False,
            ),
        ]
    if DRY_RUN:  # the GPU preset's code path on the CPU, with tiny models of the same kinds
        return [
            Case("bert-base (dry run: 1x32)", lambda: _bert(32, 1, 2, 64, 4, 8, device)),
            Case("vit-base (dry run: 1x32)", lambda: _vit(32, 1, 2, 64, 16, 8, 4, device)),
            Case("resnet-50 (dry run: 1x8)", lambda: _resnet([1], [8], "bottleneck", 16, 4, device)),
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


def ratios(rounds: Rounds, resamples: int = 4000) -> dict:
    """Every ratio of every variant with its interval: {(variant, name): Interval}."""
    t = {v: rounds.times[v] for v in rounds.variants}
    floor = {v[1]: t[v] for v in rounds.variants if v[0] == "floor"}
    plain = t.get(("plain", 0, "-"))
    peer = next((t[v] for v in rounds.variants if v[0] == "peer"), None)
    out = {}
    for v in rounds.variants:
        kind, k, _ = v
        if kind == "copy":  # the bandwidth probe: no ratio of its own
            continue
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


def time_case(case: Case, variants, bf16: bool, device: str, opts) -> tuple[Rounds, str, dict, object]:
    """Warm up, then interleaved rounds until the SAM rows' intervals are narrow enough: (rounds, why they
    stopped, the runners, the model)."""
    model, batch = case.build()
    model.train()
    runners = {v: make_variant(v[0], model, batch, v[1], v[2], bf16, device) for v in variants}
    runners[COPY] = copy_variant(model, device)
    timer = StepTimer(runners, device, opts.min_sample_s)
    timer.warm_up(opts.warmup, opts.warmup_cap)
    rounds = Rounds(list(runners), seed=0)
    stopped = rounds.sample_until(
        timer,
        _target_widths,
        target=opts.target,
        min_rounds=opts.min_rounds,
        max_rounds=opts.max_rounds,
        time_cap_s=opts.time_cap,
        clock=time.perf_counter,
        check_every=opts.check_every,
    )
    return rounds, stopped, runners, (model, batch)


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


def peak_mib(preset: str, index: int, case: Case, variant, bf16: bool, device: str) -> float | None:
    if preset == "gpu":  # torch.cuda's peak of the second step, in this process (None in a dry run)
        model, batch = case.build()
        run = make_variant(variant[0], model, batch, variant[1], variant[2], bf16, device)
        run()
        if device != "cuda":
            return None
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


def _format(iv: Interval | None) -> str:
    return "" if iv is None else f"{iv.estimate:.3f} [{iv.low:.3f},{iv.high:.3f}]"


def _verdicts(v, found: dict, case: Case, own: dict | None) -> dict:
    out = {}
    if v[0] in ("sam", "looksam", "msam") and (v, "trainer") in found and case.trainer_target:
        out[TRAINER_KEY] = found[v, "trainer"].verdict(TRAINER_LIMIT)
    if (v, "peer") in found:
        out[PEER_KEY] = found[v, "peer"].verdict(PEER_LIMIT)
    if own is not None:
        out[OWN_KEY] = own_verdict(own["ratio"])
        if "phases" in own:
            floor = own["floor_s"]
            out[PHASES_KEY] = own_verdict(
                Interval(*(x / floor for x in (own["phases"].estimate, own["phases"].low, own["phases"].high)))
            )
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
        help="At least this many rounds (cpu 30: a bootstrap of a median over fewer is too coarse; gpu 8, whose "
        "samples of >= 0.25 s vary by well under 1%%).",
    )
    parser.add_argument("--max_rounds", type=int, default=5000)
    parser.add_argument("--rounds", type=int, help="Exactly this many rounds (no stopping rule).")
    parser.add_argument("--warmup", type=int, default=3, help="At least this many warm-up rounds.")
    parser.add_argument(
        "--warmup_cap",
        type=float,
        help="At most this many seconds of warm-up rounds until the step times settle (gpu 10; cpu 0: the "
        "--warmup rounds only, the paired rounds absorb the CPU's drift).",
    )
    parser.add_argument(
        "--min_sample_s",
        type=float,
        help="Each timed sample repeats the step until it lasts this long (gpu 0.25; cpu 0: one step).",
    )
    parser.add_argument("--check_every", type=int, help="Check the intervals every this many rounds (cpu 5, gpu 2).")
    parser.add_argument("--models", nargs="+", help="Only the models whose name starts with one of these.")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurement.")
    parser.add_argument(
        "--no_family", action="store_true", help=f"Skip the LookSAM (n={CYCLE}, k=1 and 3) and MSAM rows."
    )
    parser.add_argument("--no_own", action="store_true", help="Skip SAM's own time against its traffic floor.")
    parser.add_argument(
        "--phase_steps", type=int, default=30, help="Steps of the SAM rows with the engine's phases timed directly."
    )
    parser.add_argument("--json", help="Write the rows as a JSON list here.")
    args = parser.parse_args(argv)
    gpu = args.preset == "gpu"
    if args.quick:
        args.models, args.ks, args.no_memory = args.models or ["resnet"], [1], True
        args.time_cap = args.time_cap or 240.0
    args.time_cap = args.time_cap or (45.0 if gpu else 600.0)
    args.min_rounds = args.min_rounds or (8 if gpu else 30)
    args.min_sample_s = args.min_sample_s if args.min_sample_s is not None else (0.25 if gpu else 0.0)
    args.check_every = args.check_every or (2 if gpu else 5)
    args.warmup_cap = args.warmup_cap if args.warmup_cap is not None else (10.0 if gpu else 0.0)
    if gpu and DRY_RUN:  # the same code path, briefly
        args.time_cap, args.min_rounds, args.min_sample_s, args.warmup_cap = 2.0, 3, 0.01, 2.0
    if args.rounds:
        args.min_rounds = args.max_rounds = args.rounds
        args.time_cap = float("inf")
    return args


def _measure_memory(args, variant) -> bool:
    """Every row on the CPU; on a GPU the k <= 1 rows the memory claim is about (each builds its model)."""
    kind, k, _ = variant
    if args.no_memory or kind == "copy":
        return False
    return args.preset == "cpu" or (kind in ("plain", "floor", "sam", "peer") and k <= 1)


def _own_rows(args, runners: dict, rounds: Rounds, model) -> dict:
    """Per SAM row, its own time, traffic floor and their ratio (CPU rows; ``--no_own`` skips)."""
    if args.no_own or args.preset == "gpu":
        return {}
    weights = weight_bytes(model)
    out = {}
    copy = statistics.median(rounds.times[COPY])
    counted: dict = {}  # bytes per variant, counted once for all rows
    for v in rounds.variants:
        if v[0] in ("sam", "looksam", "msam"):
            passes = own_passes(runners, v, weights, counted)
            if passes > 0:
                out[v] = {"passes": passes, **own_time_row(rounds.times, v, passes, resamples=4000)}
                if v[0] == "sam":  # the engine's phases timed directly: resolvable where the difference is not
                    phases = median_interval(phase_seconds(runners[v], args.phase_steps), resamples=4000)
                    out[v]["phases"] = phases
                    out[v]["phases_ratio"] = phases.estimate / (passes / 2 * copy)
    return out


def _throughput(args, rounds: Rounds, model, batch, bf16: bool, device: str) -> str:
    """The plain (stock Trainer) step's achieved FLOP/s and its share of the device's bf16 peak."""
    flops = step_flops(model, batch, bf16, device)
    seconds = statistics.median(rounds.times[("plain", 0, "-")])
    peak = bf16_peak_flops(device)
    share = f", {100 * flops / seconds / peak:.1f}% of the bf16 peak ({peak / 1e12:.0f} TFLOP/s)" if peak else ""
    return (
        f"plain step {flops / 1e9:.2f} GFLOP in {seconds * 1000:.2f} ms = {flops / seconds / 1e12:.2f} TFLOP/s{share}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if args.preset == "gpu" and not DRY_RUN else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --preset gpu needs a CUDA device (HF_SAM_GPU_DRY_RUN=1 runs it on the CPU)", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bf16 = args.preset == "gpu"
    variants = variant_list(args.ks, args.rules, family=not args.no_family)
    if importlib.util.find_spec("pytorch_optimizer") is None:
        print("# pytorch_optimizer is not installed (pip install -e '.[bench]'): no peer rows", file=sys.stderr)
        variants = [v for v in variants if v[0] != "peer"]
    rows = []
    print(
        f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else cpu_name()}, "
        f"threads {torch.get_num_threads()}, bf16 {bf16}; ratios: median of per-round ratios [95% bootstrap "
        f"interval], rounds until every SAM half-width <= {args.target:g} or {args.time_cap:g} s; samples of >= "
        f"{args.min_sample_s:g} s ({'CUDA events' if device == 'cuda' else 'wall clock'}); own = SAM step - "
        f"trainer floor, traffic = SAM's counted bytes / the copy bandwidth of the same rounds"
    )
    header = (
        f"{'model':28} {'variant':10} {'k':>2} {'rule':11} {'ms':>8} {'x floor [95%]':>21} {'x trainer [95%]':>21} "
        f"{'x peer [95%]':>21} {'own ms [95%]':>22} {'traffic':>7} {'own/traffic [95%]':>21} "
        f"{'<=1.03 trainer':>14} {'<=1 peer':>12} {'<=1.5 traffic':>13} {'peak MiB':>8}"
    )
    print(header)
    for index, case in enumerate(cases(args.preset, device)):
        if args.models and not case.name.startswith(tuple(args.models)):
            continue
        rounds, stopped, runners, (model, batch) = time_case(case, variants, bf16, device, args)
        found = ratios(rounds)
        own_rows = _own_rows(args, runners, rounds, model)
        for v in variants:
            kind, k, rule = v
            peak = peak_mib(args.preset, index, case, v, bf16, device) if _measure_memory(args, v) else None
            got = {name: found.get((v, name)) for name in ("floor", "trainer", "peer")}
            own = own_rows.get(v)
            verdicts = _verdicts(v, found, case, own)
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
            if own is not None:
                row.update(
                    own_ms=round(own["own"].estimate * 1000, 3),
                    own_ms_ci95=[round(own["own"].low * 1000, 3), round(own["own"].high * 1000, 3)],
                    own_passes=round(own["passes"], 2),
                    traffic_floor_ms=round(own["floor_s"] * 1000, 3),
                    own_to_traffic=round(own["ratio"].estimate, 3),
                    own_to_traffic_ci95=own["ratio"].as_list(),
                )
                if "phases" in own:
                    row.update(
                        phases_ms=round(own["phases"].estimate * 1000, 3),
                        phases_ms_ci95=[round(own["phases"].low * 1000, 3), round(own["phases"].high * 1000, 3)],
                        phases_to_traffic=round(own["phases_ratio"], 3),
                    )
            rows.append(row)
            traffic_ms = "" if own is None else f"{own['floor_s'] * 1000:.2f}"
            own_ms = (
                ""
                if own is None
                else f"{own['own'].estimate * 1000:.2f} [{own['own'].low * 1000:.2f},{own['own'].high * 1000:.2f}]"
            )
            print(
                f"{case.name:28} {kind:10} {k:>2} {rule:11} {row['ms_median']:>8.2f} {_format(got['floor']):>21} "
                f"{_format(got['trainer']):>21} {_format(got['peer']):>21} {own_ms:>22} "
                f"{traffic_ms:>7} "
                f"{'' if own is None else _format(own['ratio']):>21} "
                f"{verdicts.get(TRAINER_KEY, ''):>14} {verdicts.get(PEER_KEY, ''):>12} {verdicts.get(OWN_KEY, ''):>13} "
                f"{'' if peak is None else f'{peak:8.1f}'}",
                flush=True,
            )
            if own is not None and "phases" in own:
                p = own["phases"]
                print(
                    f"{'':28} {'':10} {'':>2} {'':11} engine phases timed directly: {p.estimate * 1000:.2f} ms "
                    f"[{p.low * 1000:.2f},{p.high * 1000:.2f}] = {own['phases_ratio']:.2f} x the traffic floor "
                    f"{own['floor_s'] * 1000:.2f} ms ({own['passes']:.1f} passes): {verdicts[PHASES_KEY]}",
                    flush=True,
                )
        widest = max(_target_widths(rounds))
        copy_ms = statistics.median(rounds.times[COPY]) * 1000
        bandwidth = 2 * weight_bytes(model) / (copy_ms / 1000) / 2**30
        print(f"# {case.name}: {len(rounds)} rounds, stopped by the {stopped} (widest SAM half-width {widest:.4f}); "
              f"copy bandwidth {bandwidth:.1f} GiB/s over {weight_bytes(model) / 2**20:.1f} MiB of weights; "
              f"{_throughput(args, rounds, model, batch, bf16, device)}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.preset == "gpu":
        return _gpu_verdict(rows, args.target)
    return 0


def _gpu_verdict(rows: list[dict], target: float) -> int:
    """The GPU session's line: every SAM k=1 row's ratio to its trainer floor resolved to +-target."""
    k1 = [r for r in rows if r["variant"] == "sam" and r["k"] == 1 and r["ratio_to_trainer_floor_ci95"]]
    widths = [(r["ratio_to_trainer_floor_ci95"][1] - r["ratio_to_trainer_floor_ci95"][0]) / 2 for r in k1]
    models = len({r["model"] for r in rows})
    if DRY_RUN:
        return verdict("bench", bool(k1), f"{len(rows)} rows on {models} models (intervals not judged)")
    ok = bool(k1) and max(widths) <= target
    widest = max(widths, default=float("nan"))
    return verdict(
        "bench", ok, f"{len(k1)} SAM k=1 rows x trainer, widest 95% half-width {widest:.4f} (target {target})"
    )


if __name__ == "__main__":
    sys.exit(main())
