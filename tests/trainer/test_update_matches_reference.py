"""Semantics 1 and 4: SAMTrainer's updates equal an independent float64 SAM (tests/reference_sam.py).

Driven only through the public API (SAMTrainingArguments, SAMTrainer.train) and a Trainer
callback that records the weights before every optimizer step.
"""

import itertools

import pytest
import torch
from transformers import set_seed

from ..helpers import WeightRecorder, sam_trainer
from ..reference_sam import NAMES, flatten, sam_gradient
from ..tiny import TinyNet, batch_of, make_data

LR = 0.1
RHO = 0.3  # large enough that the perturbation changes the gradient well above rounding


def expected_next(weights: dict, micro_batches, k, grad_accum, **rule):
    shapes = {n: tuple(weights[n].shape) for n in NAMES}
    vec = flatten(weights)
    total = torch.zeros_like(vec)
    for rows in micro_batches:
        x, y = batch_of(rows)
        total += sam_gradient(vec, shapes, x, y, k, RHO, **rule) / grad_accum
    return vec - LR * total


def run_and_check(tmp_path, k, grad_accum=1, steps=2, batch=4, **rule):
    set_seed(0)
    model = TinyNet()
    data = make_data(n=batch * grad_accum * steps)
    recorder = WeightRecorder()
    trainer = sam_trainer(
        tmp_path,
        model,
        data,
        [recorder],
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        sam_ascent_steps=k,
        sam_rho=RHO,
        sam_ascent_rule=rule.get("rule", "normalized"),
        sam_step_mult=rule.get("step_mult", 1.0),
        sam_adaptive=rule.get("adaptive", False),
        sam_descent=rule.get("descent", "last"),
    )
    trainer.train()
    after = recorder.before[1:] + [recorder.final]
    for step in range(steps):
        start = step * batch * grad_accum
        micro = [data[start + m * batch : start + (m + 1) * batch] for m in range(grad_accum)]
        want = expected_next(recorder.before[step], micro, k, grad_accum, **rule)
        got = flatten(after[step])
        moved = (want - flatten(recorder.before[step])).abs().max()
        assert moved > 1e-3, "the step should move the weights"
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


CASES = [
    dict(rule=rule, adaptive=adaptive, descent=descent)
    for rule, adaptive, descent in itertools.product(
        ["normalized", "projected", "accumulated"], [False, True], ["last", "mean"]
    )
]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rule", CASES, ids=lambda c: f"{c['rule']}-asam{int(c['adaptive'])}-{c['descent']}")
def test_one_step_matches_float64_reference(tmp_path, k, rule):
    run_and_check(tmp_path, k, **rule)


@pytest.mark.parametrize("step_mult", [0.6, 2.0])
def test_projected_step_mult_matches_reference(tmp_path, step_mult):
    run_and_check(tmp_path, 3, rule="projected", step_mult=step_mult)


@pytest.mark.parametrize("k,grad_accum", [(1, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("descent", ["last", "mean"])
def test_gradient_accumulation_perturbs_each_micro_batch(tmp_path, k, grad_accum, descent):
    run_and_check(tmp_path, k, grad_accum=grad_accum, batch=3, descent=descent, adaptive=k == 2)


def test_rules_really_differ(tmp_path):
    """Guard against a reference that cannot tell the rules apart."""
    set_seed(0)
    w = {n: p.detach().clone() for n, p in TinyNet().named_parameters()}
    rows = make_data(4)
    a = expected_next(w, [rows], 3, 1, rule="normalized")
    b = expected_next(w, [rows], 3, 1, rule="accumulated")
    c = expected_next(w, [rows], 0, 1)
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
