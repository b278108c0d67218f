"""What a float64 gradient norm would cost, against the float32 one the engine takes and a forward+backward pass.

The engine sums the ascent gradient's squares in float32 at every step: one arithmetic, no precision mode for a
checkpoint to carry (until 2026-12 it took float64 norms until a review of their range switched it to float32,
and a resume lost that mode). Float64 squares would be exact at any magnitude; this measures their price. It
prints, per model, in interleaved rounds on the real gradients of one batch: float64 norm / float32 norm, and
each norm / one forward+backward pass of the same batch (a SAM step of k ascent steps takes k norms and k + 1
passes), as medians with 95% intervals.

    OMP_NUM_THREADS=1 python benchmarks/norm_precision.py
"""

from __future__ import annotations

import argparse
import time

import torch
from intervals import Rounds, ratio_interval
from step_timer import cpu_name
from transformers import BertConfig, BertForSequenceClassification, set_seed

MODELS = {  # name: (hidden, layers, heads, intermediate)
    "bert-mini": (256, 4, 4, 1024),
    "minilm-l6": (384, 6, 12, 1536),
}


def _model_and_grads(name: str, batch: int, tokens: int, device: str):
    hidden, layers, heads, intermediate = MODELS[name]
    set_seed(0)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate
    )
    model = BertForSequenceClassification(config).to(device)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)

    def one_pass():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()

    one_pass()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return model, one_pass, grads


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"# {machine}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"# batch {args.batch} x {args.tokens} tokens, {args.rounds} interleaved rounds, medians [95% interval]")
    print("| model | parameters | float64 / float32 norm | float32 norm / pass | float64 norm / pass |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model, one_pass, grads = _model_and_grads(name, args.batch, args.tokens, device)
        variants = {
            "pass": one_pass,
            "float32": lambda grads=grads: torch._foreach_norm(grads, 2),
            "float64": lambda grads=grads: torch._foreach_norm(grads, 2, dtype=torch.float64),
        }
        rounds = Rounds(list(variants))
        for _ in range(args.rounds):
            rounds.run_round(lambda v, variants=variants: _timed(variants[v], device))
        t = rounds.times
        cells = [
            ratio_interval(t["float64"], t["float32"]),
            ratio_interval(t["float32"], t["pass"]),
            ratio_interval(t["float64"], t["pass"]),
        ]
        shown = [f"{c.estimate:.4f} [{c.low:.4f}, {c.high:.4f}]" for c in cells]
        count = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {count / 1e6:.1f}M | " + " | ".join(shown) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
