#!/usr/bin/env python
"""Each embedded task: validation accuracy of the untrained model, then after a short SAM training.

    OMP_NUM_THREADS=1 python scripts/embedded_baselines.py [--output_dir outputs/baselines]

Prints a Markdown table (the one in docs/study.md) with chance level, untrained and trained accuracy.
"""

from __future__ import annotations

import argparse
import time

from hf_sam import SAMTrainingArguments
from hf_sam.study.grid import TINY_BERT
from hf_sam.tasks import DataArguments, ModelArguments, run_classification

TASKS = [
    # name, kind, model args, data args, training args
    (
        "digits (ResNet from config, the default)",
        "image",
        {"model_type": "resnet"},
        {"dataset_name": "embedded:digits"},
        {"num_train_epochs": 6, "learning_rate": 2e-3, "per_device_train_batch_size": 32},
    ),
    (
        "mnist5k (ResNet from config, the default)",
        "image",
        {"model_type": "resnet"},
        {"dataset_name": "embedded:mnist5k"},
        {"max_steps": 150, "learning_rate": 2e-3, "per_device_train_batch_size": 32},
    ),
    (
        "digits (ViT from config)",
        "image",
        {"model_type": "vit"},
        {"dataset_name": "embedded:digits"},
        {"num_train_epochs": 6, "learning_rate": 2e-3, "per_device_train_batch_size": 32},
    ),
    (
        "mnist5k (ViT from config)",
        "image",
        {"model_type": "vit"},
        {"dataset_name": "embedded:mnist5k"},
        {"num_train_epochs": 5, "learning_rate": 3e-3, "per_device_train_batch_size": 64, "warmup_steps": 20},
    ),
    (
        "rotten_tomatoes (tiny BERT from config)",
        "text",
        {"model_type": "bert", "tokenizer_name": "embedded:minilm", "config_overrides": TINY_BERT},
        {"dataset_name": "embedded:rotten_tomatoes", "max_seq_length": 32},
        {"num_train_epochs": 3, "learning_rate": 3e-3, "per_device_train_batch_size": 64, "warmup_steps": 16},
    ),
    (
        "rotten_tomatoes (pretrained MiniLM)",
        "text",
        {"model_name_or_path": "embedded:minilm"},
        {"dataset_name": "embedded:rotten_tomatoes", "max_seq_length": 48, "max_train_samples": 1024},
        {"num_train_epochs": 2, "learning_rate": 1e-4, "per_device_train_batch_size": 32, "warmup_steps": 6},
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/baselines")
    parser.add_argument("--sam_ascent_steps", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for i, (name, kind, model, data, training) in enumerate(TASKS):
        results = {}
        for stage in ("untrained", "trained"):
            training_args = SAMTrainingArguments(
                output_dir=f"{args.output_dir}/{i}-{stage}",
                do_train=stage == "trained",
                do_eval=True,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
                seed=0,
                sam_ascent_steps=args.sam_ascent_steps,
                **training,
            )
            start = time.perf_counter()
            metrics = run_classification(kind, ModelArguments(**model), DataArguments(**data), training_args)
            results[stage] = (metrics["eval_accuracy"], time.perf_counter() - start)
        classes = 2 if kind == "text" else 10
        rows.append((name, 1 / classes, results["untrained"][0], results["trained"][0], results["trained"][1]))
    print(f"\n| task | chance | untrained | trained (SAM k={args.sam_ascent_steps}) | seconds |")
    print("|---|---|---|---|---|")
    for name, chance, untrained, trained, seconds in rows:
        print(f"| {name} | {chance:.3f} | {untrained:.3f} | {trained:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
