"""The Trainer contract of training_step: restore, accumulation, BatchNorm, faults, k=0."""

import copy

import pytest
import torch
from transformers import set_seed

from hf_sam import SAMTrainer

from ..helpers import LogRecorder, WeightRecorder, params_equal, plain_trainer, sam_trainer
from ..reference_sam import NAMES, flatten, grad_at, sam_gradient
from ..tiny import TinyNet, batch_of, make_data

RULES = ["normalized", "projected", "accumulated"]


def _inputs(rows):
    x, y = batch_of(rows)
    return {"x": x, "labels": y}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_weights_bit_identical_and_descent_gradient_added(tmp_path, rule, adaptive):
    set_seed(1)
    model = TinyNet(dtype=torch.float32)
    rows = make_data(6, seed=3, dtype=torch.float32)
    trainer = sam_trainer(
        tmp_path, model, rows, sam_ascent_steps=3, sam_rho=0.2, sam_ascent_rule=rule, sam_adaptive=adaptive
    )
    held = {n: torch.randn_like(p) for n, p in model.named_parameters()}  # earlier micro-batches
    for n, p in model.named_parameters():
        p.grad = held[n].clone()
    before = _snapshot(model)
    trainer.training_step(model, _inputs(rows))
    assert params_equal(before, _snapshot(model)), "weights must be restored bit for bit"
    added = torch.cat([(p.grad - held[n]).reshape(-1) for n, p in model.named_parameters()]).double()
    x, y = batch_of(rows)
    want = sam_gradient(flatten(before), _shapes(model), x.double(), y, 3, 0.2, rule=rule, adaptive=adaptive)
    torch.testing.assert_close(added, want, rtol=1e-4, atol=1e-5)


def test_zero_ascent_steps_is_bit_identical_to_trainer(tmp_path):
    runs = []
    for make in (plain_trainer, lambda *a, **k: sam_trainer(*a, sam_ascent_steps=0, **k)):
        set_seed(0)
        model = TinyNet(dtype=torch.float32)
        data = make_data(24, dtype=torch.float32)
        rec = WeightRecorder()
        trainer = make(
            tmp_path,
            model,
            data,
            [rec],
            optim="adamw_torch",
            max_steps=3,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            train_sampling_strategy="random",
        )
        trainer.train()
        runs.append((rec.final, [h.get("loss") for h in trainer.state.log_history]))
    assert params_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert not params_equal(runs[0][0], {n: torch.zeros_like(v) for n, v in runs[0][0].items()})


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_batchnorm_statistics_see_only_the_clean_pass(tmp_path, grad_accum):
    set_seed(0)
    model = TinyNet(batchnorm=True)
    reference = copy.deepcopy(model).train()
    data = make_data(4 * grad_accum, seed=5)
    trainer = sam_trainer(
        tmp_path,
        model,
        data,
        sam_ascent_steps=3,
        sam_rho=0.5,
        gradient_accumulation_steps=grad_accum,
        learning_rate=0.0,
    )
    trainer.train()
    with torch.no_grad():
        for m in range(grad_accum):
            reference(batch_of(data[4 * m : 4 * (m + 1)])[0])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(reference.bn, name)), name
    assert int(model.bn.num_batches_tracked) == grad_accum
    assert model.bn.track_running_stats


@pytest.mark.parametrize("k,poisoned_call,value", [(1, 1, float("inf")), (3, 2, float("nan")), (3, 3, float("inf"))])
def test_non_finite_ascent_descends_at_w_and_is_counted(tmp_path, k, poisoned_call, value):
    set_seed(0)
    model = TinyNet()
    data = make_data(4, seed=2)
    model.poison = {poisoned_call: value}
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = sam_trainer(tmp_path, model, data, [rec, logs], sam_ascent_steps=k, sam_rho=0.3)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    x, y = batch_of(data)
    w = flatten(rec.before[0])
    want = w - 0.1 * grad_at(w, _shapes(model), x, y)  # a plain step at the unperturbed weights
    torch.testing.assert_close(flatten(rec.final), want, rtol=0, atol=1e-12)
    # the decision stays on the device, so every pass runs: the ones after the drop do not move
    assert model.calls == k + 1
    train_logs = [entry for entry in logs.logs if "loss" in entry]
    assert train_logs[-1]["sam/skipped_ascents"] == 1
    assert trainer.sam_skipped_ascents == 1


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_exception_in_any_pass_restores_weights_and_grads(tmp_path, k, where):
    for failing_call in range(1, k + 2):  # every ascent pass and the descent pass
        set_seed(0)
        model = TinyNet()
        rows = make_data(4)
        trainer = sam_trainer(tmp_path, model, rows, sam_ascent_steps=k, sam_rho=0.3, sam_ascent_rule="projected")
        held = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = held[n].clone()
        before = _snapshot(model)
        model.fail_on = {failing_call: where}
        with pytest.raises(RuntimeError, match="injected"):
            trainer.training_step(model, _inputs(rows))
        assert params_equal(before, _snapshot(model)), f"call {failing_call}"
        assert all(torch.equal(p.grad, held[n]) for n, p in model.named_parameters())
        # the trainer is usable again afterwards
        model.fail_on = {}
        trainer.training_step(model, _inputs(rows))
        assert params_equal(before, _snapshot(model))


def test_zero_gradient_degrades_to_plain_step(tmp_path):
    set_seed(0)
    model = TinyNet()
    model.poison = {1: 0.0}  # the clean pass has zero loss, so zero gradient
    data = make_data(4)
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = sam_trainer(tmp_path, model, data, [rec, logs], sam_ascent_steps=1, sam_rho=0.3)
    trainer.train()
    x, y = batch_of(data)
    w = flatten(rec.before[0])
    torch.testing.assert_close(flatten(rec.final), w - 0.1 * grad_at(w, _shapes(model), x, y), rtol=0, atol=1e-12)
    last = [entry for entry in logs.logs if "loss" in entry][-1]
    assert last["sam/zero_gradient_ascents"] == 1 and last["sam/perturbation_norm"] == 0.0


def test_sam_metrics_reach_the_logs(tmp_path):
    set_seed(0)
    model = TinyNet()
    data = make_data(8)
    rec, logs = WeightRecorder(), LogRecorder()
    trainer = sam_trainer(tmp_path, model, data, [rec, logs], sam_ascent_steps=1, sam_rho=0.3, max_steps=2)
    trainer.train()
    train_logs = [entry for entry in logs.logs if "loss" in entry]
    assert len(train_logs) == 2
    shapes = _shapes(model)
    from ..reference_sam import loss_at

    for step, entry in enumerate(train_logs):
        for key in (
            "sam/loss_clean",
            "sam/loss_perturbed",
            "sam/sharpness",
            "sam/grad_norm",
            "sam/perturbation_norm",
            "sam/skipped_ascents",
        ):
            assert key in entry, key
        x, y = batch_of(data[4 * step : 4 * step + 4])
        w = flatten(rec.before[step])
        g = grad_at(w, shapes, x, y)
        assert entry["sam/loss_clean"] == pytest.approx(float(loss_at(w, shapes, x, y)), abs=1e-10)
        assert entry["sam/loss_clean"] == pytest.approx(entry["loss"], rel=1e-6)  # the Trainer sums in fp32
        perturbed = float(loss_at(w + 0.3 * g / g.norm(), shapes, x, y))
        assert entry["sam/loss_perturbed"] == pytest.approx(perturbed, abs=1e-10)
        assert entry["sam/sharpness"] == pytest.approx(perturbed - entry["sam/loss_clean"], abs=1e-10)
        assert entry["sam/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-9)
        assert entry["sam/perturbation_norm"] == pytest.approx(0.3)
    assert not any("sam/loss_clean" in entry for entry in logs.logs if "loss" not in entry)


@pytest.mark.parametrize("rule", RULES)
def test_perturbation_norm_is_logged_per_rule(tmp_path, rule):
    set_seed(0)
    model = TinyNet()
    logs = LogRecorder()
    trainer = sam_trainer(tmp_path, model, make_data(4), [logs], sam_ascent_steps=3, sam_rho=0.3, sam_ascent_rule=rule)
    trainer.train()
    norm = [entry for entry in logs.logs if "loss" in entry][-1]["sam/perturbation_norm"]
    if rule == "accumulated":
        assert 0.3 < norm <= 0.9 + 1e-9
    else:
        assert 0.0 < norm <= 0.3 + 1e-9


def test_sam_config_overrides_plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from hf_sam import SAMConfig

    from ..helpers import BASE_ARGS

    set_seed(0)
    model = TinyNet()
    data = make_data(4)
    rec = WeightRecorder()
    trainer = SAMTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), **BASE_ARGS),
        train_dataset=data,
        callbacks=[rec],
        sam_config=SAMConfig(ascent_steps=2, rho=0.3),
    )
    trainer.train()
    x, y = batch_of(data)
    w = flatten(rec.before[0])
    want = w - 0.1 * sam_gradient(w, {n: tuple(rec.before[0][n].shape) for n in NAMES}, x, y, 2, 0.3)
    torch.testing.assert_close(flatten(rec.final), want, rtol=0, atol=1e-12)
