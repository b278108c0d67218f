"""Exact resume, checkpoint interchange with the plain Trainer, and interruption mid-step."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed

from ..helpers import WeightRecorder, params_equal, plain_trainer, sam_trainer
from ..tiny import TinyNet, batch_of, make_data
from ..tiny_lm import bert_classifier, token_rows

RUN = dict(
    optim="adamw_torch",
    learning_rate=0.01,
    gradient_accumulation_steps=2,
    per_device_train_batch_size=3,
    train_sampling_strategy="random",
    save_strategy="steps",
    save_steps=2,
    max_steps=4,
    max_grad_norm=1.0,
)


def _train(tmp_path, make, resume=None, **kw):
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    rec = WeightRecorder()
    trainer = make(tmp_path, model, make_data(30, dtype=torch.float32), [rec], **{**RUN, **kw})
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec.final


def _sam(*a, **k):
    return sam_trainer(*a, sam_ascent_steps=2, sam_rho=0.1, **k)


def _losses(trainer, after_step):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and h["step"] > after_step]


@pytest.mark.parametrize("rule", ["normalized", "projected"])
def test_resume_is_bit_identical_to_one_run(tmp_path, rule):
    straight, final = _train(tmp_path / "a", _sam, sam_ascent_rule=rule)
    resumed, final_resumed = _train(
        tmp_path / "b", _sam, resume=str(tmp_path / "a" / "checkpoint-2"), sam_ascent_rule=rule
    )
    assert params_equal(final, final_resumed)
    assert _losses(straight, 2) == _losses(resumed, 2) and _losses(straight, 2)


def _bert_rows(n: int) -> list[dict]:
    rows = token_rows(n, 12, seed=1)
    return [{**r, "labels": torch.tensor(int(r["input_ids"][0]) % 2)} for r in rows]


def test_resume_mid_epoch_with_dropout_is_bit_identical(tmp_path):
    """A tiny BERT with dropout 0.1, SAM k=2, saved at step 5 of 12 in the first epoch and resumed: the weights
    equal the uninterrupted run's bit for bit (the first step after the resume does the same arithmetic as the
    straight run's: nothing that decides it is left out of the checkpoint)."""
    options = dict(
        sam_ascent_steps=2, sam_rho=0.05, optim="adamw_torch", learning_rate=1e-3, per_device_train_batch_size=2,
        train_sampling_strategy="random", max_steps=12, save_strategy="steps", save_steps=5,
    )  # fmt: skip
    finals = []
    for resume in (None, str(tmp_path / "a" / "checkpoint-5")):
        rec = WeightRecorder()
        model = bert_classifier(dtype=torch.float32, dropout=0.1)
        trainer = sam_trainer(tmp_path / ("b" if resume else "a"), model, _bert_rows(48), [rec], **options)
        trainer.train(resume_from_checkpoint=resume)
        finals.append(rec.final)
    assert trainer.state.epoch < 1, "the save falls mid-epoch"
    assert params_equal(*finals)


@pytest.mark.parametrize("first,second", [(_sam, plain_trainer), (plain_trainer, _sam)])
def test_checkpoints_interchange_with_the_plain_trainer(tmp_path, first, second):
    _train(tmp_path / "a", first, max_steps=2)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved_optimizer = torch.load(checkpoint / "optimizer.pt")["state"]
    assert saved_optimizer and all("exp_avg" in s for s in saved_optimizer.values()), "a plain AdamW state"
    trainer, _ = _train(tmp_path / "b", second, resume=str(checkpoint), max_steps=3)
    assert trainer.state.global_step == 3
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert set(weights) == {n for n, _ in trainer.model.named_parameters()}


def test_keyboard_interrupt_mid_step_leaves_a_consistent_model(tmp_path):
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    rows = make_data(4, dtype=torch.float32)
    trainer = sam_trainer(tmp_path, model, rows, sam_ascent_steps=3, sam_rho=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fail_on = {3: "interrupt"}  # inside the third ascent pass
    x, y = batch_of(rows)
    with pytest.raises(KeyboardInterrupt):
        trainer.training_step(model, {"x": x, "labels": y})
    assert params_equal(before, {n: p.detach().clone() for n, p in model.named_parameters()})
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert all(torch.equal(reloaded[n], before[n]) for n in before)


def test_trainer_state_records_sam_logs(tmp_path):
    trainer, _ = _train(tmp_path, _sam, logging_steps=1)
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert sum("sam/sharpness" in h for h in state["log_history"]) == 4
