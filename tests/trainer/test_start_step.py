"""SAM late in training (``sam_start_step``): plain optimizer steps before it, each the stock Trainer's bit for
bit; SAM from it on, equal to the float64 reference; ``sam/passes`` and ``total_flos`` count both kinds."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import set_seed

from hf_sam import SAMConfig, SAMTrainingArguments

from ..helpers import LogRecorder, WeightRecorder, plain_trainer, sam_trainer
from ..reference_sam import NAMES, flatten, sam_gradient
from ..tiny import TinyNet, batch_of, make_data

LR, RHO, K, STEPS, BATCH = 0.1, 0.3, 2, 5, 4


def _run(tmp_path, make, **options):
    set_seed(0)
    model = TinyNet()
    recorder, logs = WeightRecorder(), LogRecorder()
    trainer = make(tmp_path, model, make_data(BATCH * STEPS), [recorder, logs], max_steps=STEPS, **options)
    trainer.train()
    return recorder.before + [recorder.final], [entry for entry in logs.logs if "loss" in entry], trainer


@pytest.mark.parametrize("start,first_sam", [(2, 2), (0.5, 3)])  # 0.5 of 5 steps: ceil(2.5) = 3, as warmup_steps
def test_plain_steps_then_sam_steps(tmp_path, start, first_sam):
    weights, logs, trainer = _run(tmp_path / "sam", sam_trainer, sam_ascent_steps=K, sam_rho=RHO, sam_start_step=start)
    stock, _, _ = _run(tmp_path / "stock", plain_trainer)
    data = make_data(BATCH * STEPS)
    for step in range(STEPS):
        before, after = weights[step], weights[step + 1]
        if step < first_sam:  # the stock Trainer's step, from the same weights on the same batch
            assert all(torch.equal(before[n], stock[step][n]) for n in NAMES), step
            assert all(torch.equal(after[n], stock[step + 1][n]) for n in NAMES), step
            continue
        x, y = batch_of(data[step * BATCH : (step + 1) * BATCH])
        shapes = {n: tuple(before[n].shape) for n in NAMES}
        want = flatten(before) - LR * sam_gradient(flatten(before), shapes, x, y, K, RHO)
        torch.testing.assert_close(flatten(after), want, rtol=0, atol=1e-12, msg=f"step {step}")
        assert not torch.equal(after["fc1.weight"], stock[step + 1]["fc1.weight"]), "SAM's step is not the stock one"
    assert [entry["sam/passes"] for entry in logs] == [1.0] * first_sam + [K + 1.0] * (STEPS - first_sam)
    from hf_sam.tasks.run import forward_backward_passes  # what the study records for the run

    assert forward_backward_passes(trainer) == first_sam + (K + 1) * (STEPS - first_sam)
    stock_flos = _run(tmp_path / "stock2", plain_trainer)[2].state.total_flos
    assert trainer.state.total_flos == pytest.approx(stock_flos * (first_sam + (K + 1) * (STEPS - first_sam)) / STEPS)


def test_start_step_resumes_exactly(tmp_path):
    common = dict(
        sam_ascent_steps=K, sam_rho=RHO, sam_start_step=2, sam_direction="friendly", max_steps=4,
        save_strategy="steps", save_steps=1, optim="adamw_torch", learning_rate=0.01,
    )  # fmt: skip
    finals = []
    for resume in (None, str(tmp_path / "a" / "checkpoint-1"), str(tmp_path / "a" / "checkpoint-3")):
        set_seed(0)
        recorder = WeightRecorder()
        trainer = sam_trainer(tmp_path / "a", TinyNet(), make_data(16), [recorder], **common)
        trainer.train(resume_from_checkpoint=resume)
        finals.append(recorder.final)
    assert all(torch.equal(finals[0][n], f[n]) for f in finals[1:] for n in NAMES)


@pytest.mark.parametrize(
    "value,words",
    [(-1, ">= 0"), (1.5, "an integer step or a fraction in [0, 1)"), ("2", "a number"), (float("nan"), "a number")],
)
def test_bad_start_steps_are_refused_by_name(tmp_path, value, words):
    with pytest.raises(ValueError, match=rf"sam_start_step=.* is invalid: .*{re.escape(words)}"):
        SAMTrainingArguments(output_dir=str(tmp_path), sam_start_step=value, use_cpu=True)


def test_lookbehind_with_a_start_step_is_refused_by_name():
    with pytest.raises(ValueError, match=r"start_step=2 is invalid: .*method='lookbehind'"):
        SAMConfig(method="lookbehind", ascent_steps=2, start_step=2)
