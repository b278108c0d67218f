"""What bf16/fp16 autocast does to SAM, measured: the perturbation the lowered kernels see, and what SAM gets.

Under autocast a Linear/Conv computes with low(w + e), so the perturbation its kernels see is
low(w + e) - low(w), not e (hf_sam.measures.fidelity). For each model, after brief AdamW training (fp32), on one
fixed batch in eval mode (no dropout), for bf16 and fp16 and each rho:

- perturbation fidelity: cosine and norm ratio of low(w + e) - low(w) against e, over the lowered weights;
- SAM's gradient correction c = g(w + e) - g(w) under autocast (e from the autocast gradient, as SAM takes it)
  against float64's (cosine, norm ratio), and the sharpness L(w + e) - L(w) against float64's (relative error).

A setting "keeps SAM's correction" when the correction's cosine is >= 0.99 and the sharpness is within 2%.

    python benchmarks/precision.py                      # CPU: MiniLM, BERT-base, ViT-base, ResNet on embedded data
    python benchmarks/precision.py --device cuda --data synthetic --models bert-base vit-base bert-large
    HF_SAM_GPU_DRY_RUN=1 python benchmarks/precision.py # the GPU session's part on the CPU, tiny models

fp16 gradients are taken with a fixed loss scale of 2^12 (a GradScaler's role), then unscaled. On a CPU without
native fp16 matmuls fp16 is measured only on models up to 30M parameters (``--fp16_max_params``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sam.measures.fidelity import lowered_parameters, perturbation_fidelity  # noqa: E402

RHOS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0**12
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# name -> (kind, config overrides, AdamW steps, learning rate)
MODELS = {
    "minilm": ("minilm", {}, 300, 5e-5),
    "bert-base": ("bert", BASE, 30, 5e-5),
    "bert-large": ("bert", LARGE, 20, 3e-5),
    "vit-base": ("vit", BASE, 30, 1e-4),
    "vit-large": ("vit", LARGE, 20, 5e-5),
    "resnet": ("resnet", {}, 100, 1e-3),
    "bert-tiny": ("bert", TINY, 10, 1e-3),
    "vit-tiny": ("vit", TINY, 10, 1e-3),
}
BATCH, SEQ, IMAGE = 16, 64, 32


def _dropout_off(config) -> None:
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)


def _embedded_task(kind: str, overrides: dict):
    """The model and its train/eval data through hf_sam's own task API (datasets needed)."""
    from hf_sam.tasks.arguments import DataArguments, ModelArguments

    text = ",".join(f"{k}={v}" for k, v in overrides.items()) or None
    if kind in ("minilm", "bert"):
        from hf_sam.tasks.text import prepare_text_task

        model_args = (
            ModelArguments(model_name_or_path="embedded:minilm")
            if kind == "minilm"
            else ModelArguments(model_type="bert", tokenizer_name="embedded:minilm", config_overrides=text)
        )
        data_args = DataArguments(dataset_name="embedded:rotten_tomatoes", max_seq_length=SEQ)
        return prepare_text_task(model_args, data_args, seed=0)
    from hf_sam.tasks.vision import prepare_image_task

    patch = {"patch_size": 4} if kind == "vit" else {}
    text = ",".join(f"{k}={v}" for k, v in {**overrides, **patch}.items()) or None
    data_args = DataArguments(dataset_name="embedded:digits", image_size=IMAGE if kind == "vit" else None)
    return prepare_image_task(ModelArguments(model_type=kind, config_overrides=text), data_args, seed=0)


def _embedded_batches(task, steps: int):
    from torch.utils.data import DataLoader

    def loader(split, shuffle):
        g = torch.Generator().manual_seed(0)
        return DataLoader(split, batch_size=BATCH, shuffle=shuffle, collate_fn=task.data_collator, generator=g)

    train = []
    while len(train) < steps:
        train += list(loader(task.train_dataset, True))[: steps - len(train)]
    return train, next(iter(loader(task.eval_dataset, False)))


def _synthetic(kind: str, overrides: dict, steps: int):
    """A model from its config and random batches (the GPU image has no datasets): token ids or images with
    random labels, the same distribution for training and the measured batch."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    g = torch.Generator().manual_seed(0)
    if kind in ("bert", "minilm"):
        config = BertConfig(**overrides, num_labels=2)
        model = BertForSequenceClassification(config)

        def batch():
            return {
                "input_ids": torch.randint(1000, config.vocab_size, (BATCH, SEQ), generator=g),
                "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
                "labels": torch.randint(0, 2, (BATCH,), generator=g),
            }
    else:
        if kind == "vit":
            config = ViTConfig(**overrides, image_size=IMAGE, patch_size=4, num_channels=3, num_labels=10)
            model = ViTForImageClassification(config)
        else:
            model = ResNetForImageClassification(ResNetConfig(num_channels=3, num_labels=10))

        def batch():
            return {
                "pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
                "labels": torch.randint(0, 10, (BATCH,), generator=g),
            }

    _dropout_off(model.config)
    return model, [batch() for _ in range(steps)], batch()


def _to(batch: dict, device: torch.device, floating: torch.dtype | None = None) -> dict:
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        out[k] = v.to(floating) if floating is not None and v.is_floating_point() else v
    return out


def train_briefly(model, batches, lr: float, device: torch.device, name: str = "") -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for batch in tqdm(batches, desc=f"{name}: AdamW steps", leave=False):
        model(**_to(batch, device)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def loss_and_grad(model, batch: dict, dtype: torch.dtype | None, device: torch.device):
    """The loss and gradient at the current weights: under autocast(dtype), or in the model's own dtype."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model(**batch).loss.float()
    (loss * scale).backward()
    grads = [torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double() / scale for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach().double(), grads


def repeatable_loss_and_grad(model, batch: dict, dtype: torch.dtype, device: torch.device):
    """:func:`loss_and_grad` twice: the result, and whether the two agree bit for bit (a low-precision kernel
    that does not repeat itself, like torch 2.13's CPU bf16 convolution backward, which now and then returns
    values of 1e16-1e34, makes the row meaningless)."""
    loss, grad = loss_and_grad(model, batch, dtype, device)
    again, grad_again = loss_and_grad(model, batch, dtype, device)
    same = bool(torch.equal(loss, again)) and all(torch.equal(a, b) for a, b in zip(grad, grad_again, strict=True))
    return loss, grad, same


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


class Perturbed:
    """Moves the trainable weights by rho g/||g|| and back (the weights are restored from a copy)."""

    def __init__(self, model, rho: float, grads) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        norm = _flat(grads).norm()
        self.offsets = [(rho * g / norm).to(p.dtype) for g, p in zip(grads, self.params, strict=True)]

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.offsets, strict=True):
                p.add_(e)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, w in zip(self.params, self.saved, strict=True):
                p.copy_(w)


def measure(model, batch: dict, rhos: list[float], dtypes: list[str], device: torch.device) -> list[dict]:
    model.eval()
    reference = copy.deepcopy(model).double()
    batch64 = _to(batch, device, torch.float64)
    batch32 = _to(batch, device)
    lowered = {id(p) for p in lowered_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    low_idx = [j for j, p in enumerate(params) if id(p) in lowered]
    loss64, grad64 = loss_and_grad(reference, batch64, None, device)
    rows = []
    for rho in tqdm(rhos, desc="rho", leave=False):
        with Perturbed(reference, rho, grad64):
            loss64_e, grad64_e = loss_and_grad(reference, batch64, None, device)
        correction64 = _flat(grad64_e) - _flat(grad64)
        sharp64 = float(loss64_e - loss64)
        for name in dtypes:
            dtype = DTYPES[name]
            loss, grad, same = repeatable_loss_and_grad(model, batch32, dtype, device)
            with Perturbed(model, rho, grad) as moved:
                loss_e, grad_e, same_e = repeatable_loss_and_grad(model, batch32, dtype, device)
                cosine, ratio = perturbation_fidelity(
                    [params[j] for j in low_idx], [moved.saved[j] for j in low_idx], dtype
                )
            correction = _flat(grad_e) - _flat(grad)
            sharp = float(loss_e - loss)
            rows.append(
                {
                    "dtype": name,
                    "rho": rho,
                    "fidelity_cos": float(cosine),
                    "fidelity_norm_ratio": float(ratio),
                    "correction_cos": _cos(correction, correction64),
                    "correction_norm_ratio": float(correction.norm() / correction64.norm()),
                    "sharpness": sharp,
                    "sharpness_fp64": sharp64,
                    "sharpness_rel_error": abs(sharp - sharp64) / abs(sharp64) if sharp64 else math.inf,
                }
            )
            row = rows[-1]
            row["repeatable"] = same and same_e
            row["kept"] = row["correction_cos"] >= 0.99 and row["sharpness_rel_error"] <= 0.02
    return rows


def table(results: dict[str, dict]) -> str:
    lines = [
        "| model | params | dtype | rho | fidelity cos | fidelity norm ratio | correction cos | correction norm ratio "
        "| sharpness | fp64 | rel. error | SAM's correction kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for r in result["rows"]:
            lines.append(
                f"| {name} | {result['params'] / 1e6:.1f}M | {r['dtype']} | {r['rho']} | {r['fidelity_cos']:.3f} | "
                f"{r['fidelity_norm_ratio']:.2f} | {r['correction_cos']:.4f} | {r['correction_norm_ratio']:.3f} | "
                f"{r['sharpness']:.5f} | {r['sharpness_fp64']:.5f} | {100 * r['sharpness_rel_error']:.2f}% | "
                f"{('yes' if r['kept'] else '**no**') if r['repeatable'] else 'kernel not repeatable'} |"
            )
    return "\n".join(lines)


def main() -> int:
    dry = os.environ.get("HF_SAM_GPU_DRY_RUN", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    parser.add_argument("--data", choices=["embedded", "synthetic"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rhos", nargs="+", type=float, default=RHOS)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--train_steps", type=int, default=None, help="AdamW steps before measuring (per model).")
    parser.add_argument(
        "--fp16_max_params",
        type=float,
        default=None,
        help="Skip fp16 for larger models (default: 30M on a CPU, whose fp16 matmuls are emulated; none on a GPU).",
    )
    parser.add_argument("--json", default=None, help="Write the rows here as well.")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not dry else "cpu"))
    data = args.data or ("synthetic" if dry or device.type == "cuda" else "embedded")
    models = args.models or ["minilm", "bert-base", "vit-base", "resnet"]
    if dry:  # the same code on tiny models, whatever the session asks for
        models = ["bert-tiny", "vit-tiny"]
    rhos = [0.05, 0.5] if dry and args.rhos == RHOS else args.rhos
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for name in models:
        kind, overrides, steps, lr = MODELS[name]
        steps = args.train_steps if args.train_steps is not None else (2 if dry else steps)
        start = time.perf_counter()
        torch.manual_seed(0)
        if data == "embedded":
            task = _embedded_task(kind, overrides)
            model = task.model
            _dropout_off(model.config)
            train, measured = _embedded_batches(task, steps)
        else:
            model, train, measured = _synthetic(kind, overrides, steps)
        model = model.to(device).float()
        for module in model.modules():  # dropout off even where the config was read before
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        train_briefly(model, train, lr, device, name)
        params = sum(p.numel() for p in model.parameters())
        limit = args.fp16_max_params or (30e6 if device.type == "cpu" else math.inf)
        dtypes = [d for d in args.dtypes if d != "fp16" or params <= limit]
        rows = measure(model, measured, rhos, dtypes, device)
        results[name] = {"params": params, "train_steps": steps, "rows": rows}
        print(f"# {name}: {params / 1e6:.1f}M parameters, {steps} AdamW steps, {time.perf_counter() - start:.0f} s",
              flush=True)  # fmt: skip
        del model
    print(f"\n{data} data, {device.type} ({torch.__version__}), one batch of {BATCH}, eval mode\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.type, "data": data, "results": results}, f, indent=1)
    rows = [r for result in results.values() for r in result["rows"] if r["repeatable"]]
    named = [(n, r) for n, res in results.items() for r in res["rows"]]
    lost = [f"{n} {r['dtype']} rho {r['rho']}" for n, r in named if r["repeatable"] and not r["kept"]]
    unrepeatable = [f"{n} {r['dtype']} rho {r['rho']}" for n, r in named if not r["repeatable"]]
    finite = all(math.isfinite(r["correction_cos"]) and math.isfinite(r["fidelity_cos"]) for r in rows)
    kept = f"{len(rows) - len(lost)} of {len(rows)} settings keep SAM's correction (cos >= 0.99, sharpness within 2%)"
    print(f"\n{kept}" + (f"; lost: {', '.join(lost)}" if lost else ""))
    if unrepeatable:
        print(
            "left out, the low-precision kernels gave different gradients for the same input: "
            + ", ".join(unrepeatable)
        )
    # the verdict is whether the measurement ran; what it found is the table
    print(f"{'OK' if finite else 'FAIL'} precision_measure: {kept}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
