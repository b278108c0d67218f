"""Fine-tune, evaluate and predict with SAMTrainer: the body of the task scripts and of the study runs."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import build_compute_metrics
from ..trainer.args import SAMTrainingArguments
from ..trainer.compat import declare_loss_unscaled
from ..trainer.mixin import SAMTrainer
from .arguments import DataArguments, ModelArguments
from .hub import HubUnavailableError
from .models import with_lora
from .pretrained_vision import EMBEDDED_RESNET, ensure_checkpoint

logger = logging.getLogger(__name__)
TASK_KINDS = ("image", "text")


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, SAMTrainingArguments]:
    """HfArgumentParser over the three dataclasses; a single .json/.yaml argument is read as a config file."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, SAMTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def _resume_target(training_args: SAMTrainingArguments) -> str | bool | None:
    """--resume_from_checkpoint PATH, or "last"/"true" for the newest checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if str(value).lower() in ("last", "true"):
        return True
    return value


def build_trainer(
    kind: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: SAMTrainingArguments,
    callbacks: list | None = None,
):
    """The SAMTrainer and the prepared task (model, splits, collator) for one run."""
    from transformers import set_seed

    from .text import prepare_text_task
    from .vision import prepare_image_task

    if kind not in TASK_KINDS:
        raise ValueError(f"kind={kind!r}: use one of {TASK_KINDS}.")
    set_seed(training_args.seed)
    if kind == "image" and training_args.remove_unused_columns:
        # the on-the-fly image transform needs the raw image column the model does not take
        training_args.remove_unused_columns = False
    if model_args.model_name_or_path == EMBEDDED_RESNET:  # pretrained here once, then a local checkpoint
        model_args.model_name_or_path = str(ensure_checkpoint())
    prepare = prepare_image_task if kind == "image" else prepare_text_task
    task = prepare(model_args, data_args, seed=training_args.seed)
    task.model = with_lora(task.model, model_args)
    trainer = SAMTrainer(
        model=task.model,
        args=training_args,
        train_dataset=task.train_dataset if training_args.do_train else None,
        eval_dataset=task.eval_dataset if training_args.do_eval or training_args.eval_strategy != "no" else None,
        data_collator=task.data_collator,
        processing_class=task.processing_class,
        compute_metrics=build_compute_metrics(task.metric_names),
        callbacks=callbacks,
    )
    # Classification heads average their loss themselves and ignore num_items_in_batch: divide by the
    # accumulation steps as for any model whose loss is not already scaled.
    declare_loss_unscaled(trainer)
    return trainer, task


def run_classification(
    kind: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: SAMTrainingArguments,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train/evaluate/predict as asked by ``training_args``; returns all metrics (also in all_results.json)."""
    trainer, task = build_trainer(kind, model_args, data_args, training_args, callbacks)
    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=_resume_target(training_args))
        trainer.save_model()
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(task.train_dataset)
        metrics["train_forward_backward_passes"] = forward_backward_passes(trainer)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate(eval_dataset=task.eval_dataset)
        metrics["eval_samples"] = len(task.eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if training_args.do_predict:
        if task.test_dataset is None:
            raise ValueError("--do_predict needs a test split (--test_file, or a data set that has one).")
        prediction = trainer.predict(task.test_dataset, metric_key_prefix="predict")
        metrics = dict(prediction.metrics)
        metrics["predict_samples"] = len(task.test_dataset)
        if prediction.label_ids is None or np.all(np.asarray(prediction.label_ids) < 0):  # unlabelled: no metrics
            metrics = {k: v for k, v in metrics.items() if k.split("_", 1)[-1] not in ("accuracy", "f1")}
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        results.update(metrics)
        if trainer.is_world_process_zero():
            logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
            predicted = np.argmax(logits, axis=-1)
            with open(Path(training_args.output_dir) / "predict_results.txt", "w") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(predicted):
                    f.write(f"{i}\t{task.label_names[int(p)]}\n")
    return results


def forward_backward_passes(trainer: SAMTrainer) -> int:
    """Forward+backward passes the training took, per process, resumed steps included: per micro-batch
    k + 1 on SAM steps, one on the steps between them (sam_every_n_steps) and before sam_start_step, one for
    MSAM and without SAM."""
    config, steps = trainer.sam_config, trainer.state.global_step
    if config.ascent_steps == 0 or config.method == "msam":
        per_step = [1] * steps
    else:
        first = config.first_sam_step(trainer.state.max_steps)
        per_step = [
            config.ascent_steps + 1 if t >= first and t % config.every_n_steps == 0 else 1 for t in range(steps)
        ]
    return int(sum(per_step) * trainer.args.gradient_accumulation_steps)


def main(kind: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of scripts/run_{image,text}_classification.py."""
    import transformers

    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    try:
        results = run_classification(kind, model_args, data_args, training_args)
    except HubUnavailableError as err:
        raise SystemExit(f"error: {err}") from None
    if training_args.should_save:
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=1))
    end_process_group()
    return results


def end_process_group() -> None:
    """Leave the process group before the interpreter's teardown: gloo's destructors can abort the
    process (SIGABRT) when they run at exit with the group still alive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
