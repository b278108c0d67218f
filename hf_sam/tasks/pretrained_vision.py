"""``embedded:resnet-mnist5k``: a small ResNet pretrained on the embedded MNIST-5k, built once and cached.

No vision checkpoint ships in an installed package, so the fine-tuning tasks make their own: the small ResNet of
the from-scratch tasks, trained with plain AdamW (the stock step, no SAM) on MNIST-5k's training split, saved
with ``save_pretrained`` under ``$HF_SAM_CACHE`` (default ``~/.cache/hf_sam``) beside ``pretraining.json`` (its
source, steps and validation accuracy). A study then fine-tunes it on another set (the 8x8 digits, resized to
28x28) the way users fine-tune a hub checkpoint. The build is seeded and written atomically (a folder renamed
into place), so concurrent workers agree on one checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

EMBEDDED_RESNET = "embedded:resnet-mnist5k"
RECIPE = {  # what the checkpoint is; a change to it is a new folder
    "source": "embedded:mnist5k",
    "model_type": "resnet",
    "num_train_epochs": 5,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 64,
    "warmup_steps": 20,
    "seed": 0,
}
IMAGE_SIZE = 28  # MNIST's: fine-tuning sets are resized to it


def cache_root() -> Path:
    return Path(os.environ.get("HF_SAM_CACHE", Path.home() / ".cache" / "hf_sam"))


def checkpoint_dir() -> Path:
    key = "-".join(f"{k}={v}" for k, v in sorted(RECIPE.items()) if k != "source")
    return cache_root() / f"resnet-mnist5k-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def pretraining_record() -> dict[str, Any]:
    """The cached checkpoint's record (source, steps, validation accuracy), building the checkpoint if needed."""
    return json.loads((ensure_checkpoint() / "pretraining.json").read_text())


def ensure_checkpoint() -> Path:
    """The folder of the pretrained ResNet: built on first use (about 20 s on a 2-core CPU), then read."""
    target = checkpoint_dir()
    if (target / "pretraining.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        record = _pretrain(staging)
        (staging / "pretraining.json").write_text(json.dumps(record, indent=1))
        try:
            staging.rename(target)
        except OSError:  # another worker finished first: theirs is the same recipe
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _pretrain(folder: Path) -> dict[str, Any]:
    from transformers import ViTImageProcessor, set_seed

    from ..metrics import build_compute_metrics
    from ..trainer.args import SAMTrainingArguments
    from ..trainer.mixin import SAMTrainer
    from .arguments import DataArguments, ModelArguments
    from .vision import collate_images, prepare_image_task

    seed = RECIPE["seed"]
    set_seed(seed)
    data = DataArguments(dataset_name=RECIPE["source"], image_size=IMAGE_SIZE)
    task = prepare_image_task(ModelArguments(model_type=RECIPE["model_type"]), data, seed=seed)
    args = SAMTrainingArguments(
        output_dir=str(folder / "run"),
        sam_ascent_steps=0,  # the stock Trainer's step
        num_train_epochs=RECIPE["num_train_epochs"],
        learning_rate=RECIPE["learning_rate"],
        per_device_train_batch_size=RECIPE["per_device_train_batch_size"],
        warmup_steps=RECIPE["warmup_steps"],
        seed=seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,  # the on-the-fly transform needs the raw image column
    )
    trainer = SAMTrainer(
        model=task.model, args=args, train_dataset=task.train_dataset, data_collator=collate_images,
        compute_metrics=build_compute_metrics(("accuracy",)),
    )  # fmt: skip
    trainer.train()
    accuracy = trainer.evaluate(eval_dataset=task.eval_dataset)["eval_accuracy"]
    task.model.save_pretrained(folder)
    # the processor a fine-tuning run reads: MNIST's size, one channel, the from-scratch tasks' normalization
    channels = task.model.config.num_channels
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * channels, image_std=[0.5] * channels
    ).save_pretrained(folder)
    shutil.rmtree(folder / "run", ignore_errors=True)
    return {
        **RECIPE,
        "model": EMBEDDED_RESNET,
        "optimizer_steps": trainer.state.global_step,
        "validation_accuracy": round(float(accuracy), 4),
    }
