"""Instruction tuning with SAM through TRL's SFTTrainer: the logic behind scripts/run_sft.py.

Offline it trains a small GPT-2 built from a config on the embedded arithmetic instructions with a
word-level tokenizer; on a connected machine ``--model_name_or_path`` and ``--dataset_name`` take
hub names, as in TRL's own ``sft.py``. ``--use_peft`` trains LoRA adapters (TRL's ModelConfig flags).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .hub import from_hub
from .instructions import EMBEDDED_INSTRUCTIONS, arithmetic_dataset, word_tokenizer
from .models import apply_overrides, parse_config_overrides
from .run import end_process_group

logger = logging.getLogger(__name__)
OFFLINE_DATA = f"--dataset_name {EMBEDDED_INSTRUCTIONS}"
OFFLINE_MODEL = "no --model_name_or_path (a GPT-2 built from a config)"


@dataclass
class SFTScriptArguments:
    """The data and the from-config model of the SFT script (the rest is TRL's ModelConfig)."""

    dataset_name: str = field(
        default=EMBEDDED_INSTRUCTIONS,
        metadata={"help": f"A hub data set (trl-lib/Capybara, ...) or {EMBEDDED_INSTRUCTIONS} (offline)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Data set config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str = field(default="validation", metadata={"help": "Evaluation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Overrides of the from-config GPT-2 (no --model_name_or_path), e.g. n_embd=64,n_layer=2."},
    )
    completion_accuracy_samples: int = field(
        default=200,
        metadata={"help": "Evaluation rows scored by greedy generation (exact match of the completion's first word)."},
    )


def _parse(argv: list[str] | None):
    from transformers import HfArgumentParser
    from trl import ModelConfig

    from ..integrations.trl import SAMSFTConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():  # TRL defaults to bf16, which a CPU-only machine refuses
        argv += [] if "--use_cpu" in argv else ["--use_cpu"]
        argv += [] if any(a.startswith("--bf16") for a in argv) else ["--bf16", "false"]
    parser = HfArgumentParser((SFTScriptArguments, SAMSFTConfig, ModelConfig))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0]) if not argv[0].endswith(".json") else parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def load_data(script: SFTScriptArguments):
    if script.dataset_name == EMBEDDED_INSTRUCTIONS:
        return arithmetic_dataset()
    import datasets

    return from_hub(
        f"data set {script.dataset_name!r}", OFFLINE_DATA, datasets.load_dataset, script.dataset_name,
        script.dataset_config,
    )  # fmt: skip


def build_model(script: SFTScriptArguments, model_args, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, set_seed

    if model_args.model_name_or_path:
        return from_hub(
            f"model {model_args.model_name_or_path!r}", OFFLINE_MODEL, AutoModelForCausalLM.from_pretrained,
            model_args.model_name_or_path, revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code, dtype=torch.float32,
        )  # fmt: skip
    set_seed(0)  # the Trainer's seed comes too late for the initial weights
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(apply_overrides(config, parse_config_overrides(script.config_overrides)))
    model.loss_type = "ForCausalLM"  # count the predicted tokens (see tests/tiny_lm.py)
    return model


def build_tokenizer(model_args):
    if not model_args.model_name_or_path:
        return word_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = from_hub(
        f"tokenizer {model_args.model_name_or_path!r}", OFFLINE_MODEL, AutoTokenizer.from_pretrained,
        model_args.model_name_or_path, revision=model_args.model_revision,
    )  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def completion_accuracy(model, tokenizer, rows, limit: int) -> float | None:
    """Share of prompt/completion rows whose greedy continuation starts with the completion's first word."""
    if not rows or "prompt" not in rows.column_names or not isinstance(rows[0]["prompt"], str):
        return None
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0
    for row in rows.select(range(min(limit, len(rows)))):
        ids = tokenizer(row["prompt"], return_tensors="pt").to(device)
        want = row["completion"].split()[:1]
        out = model.generate(**ids, max_new_tokens=len(tokenizer(row["completion"])["input_ids"]) + 1,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        got = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).split()[:1]
        hits += got == want
        total += 1
    return hits / total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of scripts/run_sft.py."""
    import transformers
    from trl import get_peft_config

    from ..integrations.trl import SAMSFTTrainer

    script, training_args, model_args = _parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    data = load_data(script)
    train = data[script.dataset_train_split]
    if script.max_train_samples is not None:
        train = train.select(range(min(script.max_train_samples, len(train))))
    evaluation = data[script.dataset_test_split] if script.dataset_test_split in data else None
    tokenizer = build_tokenizer(model_args)
    model = build_model(script, model_args, tokenizer)
    trainer = SAMSFTTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )  # fmt: skip
    results: dict[str, Any] = {}
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint == "last":
        checkpoint = True
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    results.update(metrics)
    if evaluation is not None and training_args.eval_strategy != "no" or training_args.do_eval:
        metrics = trainer.evaluate()
        accuracy = completion_accuracy(trainer.model, tokenizer, evaluation, script.completion_accuracy_samples)
        if accuracy is not None:
            metrics["eval_completion_accuracy"] = accuracy
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", results, combined=True)
        logger.info("results in %s", os.path.join(training_args.output_dir, "all_results.json"))
    end_process_group()
    return results
