"""Building trainers for the tests."""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sam import SAMTrainer, SAMTrainingArguments

BASE_ARGS = dict(
    per_device_train_batch_size=4,
    max_steps=1,
    learning_rate=0.1,
    optim="sgd",
    lr_scheduler_type="constant",
    weight_decay=0.0,
    max_grad_norm=0.0,
    report_to=[],
    logging_steps=1,
    save_strategy="no",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
    dataloader_num_workers=0,
)


class WeightRecorder(TrainerCallback):
    """Records the weights at the start of every optimizer step and at the end of training."""

    def __init__(self):
        self.before: list[dict] = []
        self.final: dict | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.final = {n: p.detach().clone() for n, p in model.named_parameters()}


class LogRecorder(TrainerCallback):
    """What a report_to backend would receive."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# early 5.x releases (5.0 among them) have no train_sampling_strategy: their train sampler is random
HAS_SAMPLING_STRATEGY = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
if HAS_SAMPLING_STRATEGY:
    BASE_ARGS["train_sampling_strategy"] = "sequential"


def _split_sampling(options: dict) -> tuple[dict, str]:
    """The arguments this release takes, and the sampling strategy asked for (sequential by default)."""
    strategy = options.get("train_sampling_strategy", "sequential")
    if not HAS_SAMPLING_STRATEGY:
        options = {k: v for k, v in options.items() if k != "train_sampling_strategy"}
    return options, strategy


def _with_sampling(trainer: Trainer, strategy: str) -> Trainer:
    if strategy == "sequential" and not HAS_SAMPLING_STRATEGY:
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def sam_trainer(tmp_path, model, data, callbacks=(), **overrides) -> SAMTrainer:
    options, strategy = _split_sampling({**BASE_ARGS, **overrides})
    args = SAMTrainingArguments(output_dir=str(tmp_path), **options)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    # set by the Trainer's loop; tests that call training_step directly bypass it
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return _with_sampling(trainer, strategy)


def plain_trainer(tmp_path, model, data, callbacks=(), **overrides) -> Trainer:
    options, strategy = _split_sampling({**BASE_ARGS, **overrides})
    args = TrainingArguments(output_dir=str(tmp_path), **options)
    return _with_sampling(Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks)), strategy)


def params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def free_port() -> int:
    """A free TCP port for a launch's rendezvous. Each pytest-xdist worker draws from a range of its own, so that
    two workers' launches cannot take the same port between this check and the launch."""
    import random
    import socket

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = 20000 + 500 * (int(worker) if worker.isdigit() else 0)
    for port in random.sample(range(base, base + 500), 500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}..{base + 499}")
