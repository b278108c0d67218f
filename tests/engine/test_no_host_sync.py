"""No host sync inside a SAM step: nothing is read back from a tensor between the clean pass and the
restore, so on a GPU the launch queue never drains mid-step.

On the CPU a read costs nothing, so it is counted instead: every ``item()``, ``bool()``, ``float()`` or
``int()`` of a tensor reaches aten as ``_local_scalar_dense`` (seen by a dispatch mode), and ``tolist()``
and ``numpy()`` are wrapped. The counter is first shown to catch the reads the engine used to make.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import set_seed

from hf_sam import MultiStepAscent
from hf_sam.engine.descents import XSAMDescent
from hf_sam.engine.rules import ProjectedRule

from ..helpers import sam_trainer
from ..tiny import TinyNet, batch_of, make_data

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from host_reads import counting_host_reads  # noqa: E402 - shared with the GPU session's dry run


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor([1.5])
    with counting_host_reads() as counter:
        t.item()
        bool(t > 0)
        float(t)
        t.tolist()
        t.numpy()
        torch.equal(t, t)
        norm = torch.linalg.vector_norm(t)  # device work alone is not a read
    assert len(counter.reads) == 6, counter.reads
    assert norm.item() == 1.5


def _engine_step(engine, params, grad_fn, k, poison_at=None):
    for p in params:
        p.grad = None  # as optimizer.zero_grad() leaves them
    engine.begin()
    for i in range(1, k + 1):
        for p, g in zip(params, grad_fn(params), strict=True):
            p.grad = g * float("nan") if i == poison_at else g
        engine.ascend()
    factor = engine.begin_descent()
    at_descent = [p.detach().clone() for p in params]
    for p, g in zip(params, grad_fn(params), strict=True):
        p.grad = g * factor if p.grad is None else p.grad + g * factor
    engine.end_descent()
    engine.restore()
    return at_descent


def _cubic_grads(params):
    return [3 * p.detach() ** 2 + 0.1 for p in params]


@pytest.mark.parametrize("rule", ["normalized", "projected", "accumulated"])
@pytest.mark.parametrize("descent", ["last", "mean", "xsam"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engine_step_reads_nothing_back(rule, descent, adaptive, dtype):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=dtype, requires_grad=True), torch.randn(5, dtype=dtype, requires_grad=True)]
    w = [p.detach().clone() for p in params]
    engine = MultiStepAscent(
        params,
        ascent_steps=3,
        rho=0.1,
        ascent_rule=ProjectedRule(0.8) if rule == "projected" else rule,
        adaptive=adaptive,
        descent=XSAMDescent(0.5, rho_max=0.2) if descent == "xsam" else descent,
    )
    _engine_step(engine, params, _cubic_grads, 3)  # the first step ends with the norms' one review
    with counting_host_reads() as counter:
        at_descent = _engine_step(engine, params, _cubic_grads, 3)
    assert counter.reads == []
    assert not all(torch.equal(a, b) for a, b in zip(at_descent, w, strict=True)), "the ascent moved"
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, w, strict=True)), "restore is bit-exact"


@pytest.mark.parametrize("poison_at", [1, 2, 3])
@pytest.mark.parametrize("rule", ["normalized", "projected"])
def test_a_dropped_ascent_is_decided_on_the_device(poison_at, rule):
    # the non-finite step, its sequel and the return to w all happen without a read; the descent
    # is at w exactly, nothing non-finite reaches the weights, and the drop is on the record
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    w = [p.detach().clone() for p in params]
    engine = MultiStepAscent(params, ascent_steps=3, rho=0.1, ascent_rule=rule, descent="mean")
    _engine_step(engine, params, _cubic_grads, 3)
    with counting_host_reads() as counter:
        at_descent = _engine_step(engine, params, _cubic_grads, 3, poison_at=poison_at)
    assert counter.reads == []
    assert all(torch.equal(a, b) for a, b in zip(at_descent, w, strict=True)), "the descent is at w"
    assert engine.skipped and not engine.moved and float(engine.perturbation_norm) == 0.0
    want = _cubic_grads(w)  # a plain step's gradient: the mean over the dropped ascent is not taken
    assert all(torch.equal(p.grad, g) for p, g in zip(params, want, strict=True))
    assert all(torch.isfinite(p).all() for p in params)


def test_plain_loop_step_reads_nothing_back():
    set_seed(0)
    model = TinyNet()
    x, y = batch_of(make_data(8))
    engine = MultiStepAscent(model.parameters(), ascent_steps=3, rho=0.1)
    with counting_host_reads() as counter:
        for _ in range(5):
            engine.step(lambda: model(x, y)["loss"])
    assert counter.reads == []


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"sam_ascent_rule": "projected", "sam_step_mult": 0.6, "sam_adaptive": True},
        {"sam_descent": "mean", "sam_replay_rng": True},
        {"sam_descent": "xsam", "sam_xsam_alpha": 0.5},
        {"sam_diagnostics": True},
        {"gradient_accumulation_steps": 2},
    ],
)
def test_trainer_step_adds_no_read_to_the_stock_step(tmp_path, options):
    # the stock training_step (k=0) is the baseline, so reads the Trainer or the model make do not
    # count against SAM; the SAM step with k=3 must make exactly as many
    data = make_data(8)
    x, y = batch_of(data[:4])
    reads = {}
    for k in (0, 3):
        set_seed(0)
        model = TinyNet()
        chosen = options if k else {key: v for key, v in options.items() if not key.startswith("sam_")}
        trainer = sam_trainer(tmp_path, model, data, sam_ascent_steps=k, sam_rho=0.1, **chosen)
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.training_step(model, {"x": x, "labels": y})  # warm-up: lazy set-up may read once
        with counting_host_reads() as counter:
            trainer.training_step(model, {"x": x, "labels": y})
        reads[k] = counter.reads
    assert reads[3] == reads[0], reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_ascent_norm_has_no_mode(dtype):
    """The same gradient gets the same step at every step, first or later: no precision mode a resume could lose.
    In range, the step is rho g/||g|| (closed form); gradients whose float32 squares overflow (1e20) drop the
    ascent, as a non-finite one does, and those whose squares vanish (1e-25) are a zero gradient (no move); in
    float64 both are in range."""
    params = [torch.zeros(3, dtype=dtype, requires_grad=True)]
    engine = MultiStepAscent(params, ascent_steps=1, rho=0.1)
    step = torch.full((3,), 0.1 / 3**0.5, dtype=torch.float64).to(dtype)  # rho g/||g||, g = c (1, 1, 1)
    for scale in (1.0, 1e20, 1e-25, 1.0, 1e20, 1e-25, 1.0):
        engine.begin()
        params[0].grad = torch.full((3,), scale, dtype=dtype)
        engine.ascend()
        moved = params[0].detach().clone()
        engine.begin_descent()
        engine.restore()
        in_range = dtype == torch.float64 or scale == 1.0
        assert engine.skipped == (not in_range and scale > 1), scale
        assert engine.moved == in_range, scale
        torch.testing.assert_close(moved, step if in_range else torch.zeros_like(step), msg=str(scale))
