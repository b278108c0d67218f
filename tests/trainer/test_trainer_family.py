"""SAM in the rest of the Trainer family: model_init and hyperparameter_search (the engine and the
BatchNorm list follow the model being trained), a user's subclass with its own compute_loss and
training_step, and dropout replayed for a clean sharpness measure."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, set_seed

from hf_sam import SAMMixin, SAMTrainer, SAMTrainingArguments

from ..helpers import BASE_ARGS, LogRecorder, WeightRecorder, params_equal, sam_trainer
from ..reference_sam import NAMES, flatten, sam_gradient
from ..tiny import TinyNet, batch_of, make_data
from ..tiny_lm import gpt2, token_rows

SAM = dict(sam_ascent_steps=2, sam_rho=0.3)


def _bn_model():
    set_seed(0)
    return TinyNet(batchnorm=True)


def test_model_init_equals_the_model_passed_directly_in_every_train_call(tmp_path):
    data = make_data(12)
    rec_direct = WeightRecorder()
    direct = sam_trainer(tmp_path / "direct", _bn_model(), data, [rec_direct], max_steps=3, **SAM)
    direct.train()
    args = SAMTrainingArguments(output_dir=str(tmp_path / "init"), **{**BASE_ARGS, "max_steps": 3}, **SAM)
    recs = []
    trainer = SAMTrainer(model_init=_bn_model, args=args, train_dataset=data)
    for _ in range(2):  # the second call trains a new model: SAM must follow it
        rec = WeightRecorder()
        trainer.callback_handler.callbacks.append(rec)
        trainer.train()
        trainer.callback_handler.callbacks.remove(rec)
        recs.append((rec, {n: b.clone() for n, b in trainer.model.named_buffers()}))
    direct_buffers = dict(direct.model.named_buffers())
    for rec, buffers in recs:
        assert params_equal(rec.final, rec_direct.final)
        assert all(torch.equal(buffers[n], direct_buffers[n]) for n in direct_buffers)
    # BatchNorm counted one clean pass per step, not k + 1
    assert int(direct_buffers["bn.num_batches_tracked"]) == 3


def test_batchnorm_statistics_come_from_the_clean_pass_only_with_model_init(tmp_path):
    data = make_data(4)
    args = SAMTrainingArguments(output_dir=str(tmp_path), **BASE_ARGS, **SAM)
    trainer = SAMTrainer(model_init=_bn_model, args=args, train_dataset=data)
    w = {n: p.detach().clone() for n, p in _bn_model().named_parameters()}
    trainer.train()
    x, _ = batch_of(data)
    hidden = torch.tanh(x @ w["fc1.weight"].T + w["fc1.bias"])  # the BatchNorm input at the clean weights
    torch.testing.assert_close(trainer.model.bn.running_mean, 0.1 * hidden.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        trainer.model.bn.running_var, 0.9 + 0.1 * hidden.var(0, unbiased=True), rtol=0, atol=1e-12
    )


class _FinalWeights(TrainerCallback):
    def __init__(self):
        self.trials = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trials.append((args.learning_rate, {n: p.detach().clone() for n, p in model.named_parameters()}))


def test_every_hyperparameter_search_trial_trains_with_sam(tmp_path):
    pytest.importorskip("optuna")
    data = make_data(12)
    init = lambda trial=None: TinyNet()  # noqa: E731 - set_seed(args.seed) runs before each model_init
    args = SAMTrainingArguments(output_dir=str(tmp_path / "search"), **{**BASE_ARGS, "max_steps": 2}, **SAM)
    rec = _FinalWeights()
    trainer = SAMTrainer(model_init=init, args=args, train_dataset=data, eval_dataset=data, callbacks=[rec])
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 0.05, 0.5)},
        backend="optuna",
        n_trials=2,
        direction="minimize",
    )
    assert len(rec.trials) == 2 and rec.trials[0][0] != rec.trials[1][0]
    for lr, final in rec.trials:  # each trial equals a direct SAM run with its learning rate
        direct = WeightRecorder()
        set_seed(0)
        sam_trainer(tmp_path / f"lr{lr}", TinyNet(), data, [direct], max_steps=2, learning_rate=lr, **SAM).train()
        assert params_equal(final, direct.final)


class WeightedTrainer(SAMTrainer):
    """A user's subclass: its own compute_loss (not calling super) and a training_step with a side effect."""

    steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(x=inputs["x"])["logits"]
        return F.cross_entropy(logits, inputs["labels"])

    def training_step(self, model, inputs, num_items_in_batch=None):
        type(self).steps += 1
        return super().training_step(model, inputs, num_items_in_batch)


def test_a_subclass_compute_loss_is_used_for_every_pass(tmp_path):
    data = make_data(8)
    model = TinyNet()
    w = flatten(dict(model.named_parameters()))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    rec = WeightRecorder()
    args = SAMTrainingArguments(output_dir=str(tmp_path), **{**BASE_ARGS, "max_steps": 2}, **SAM)
    WeightedTrainer(model=model, args=args, train_dataset=data, callbacks=[rec]).train()
    assert WeightedTrainer.steps == 2  # once per micro-batch, not per pass
    for step in range(2):
        x, y = batch_of(data[4 * step : 4 * step + 4])
        w = w - 0.1 * sam_gradient(w, shapes, x, y, 2, 0.3)
    torch.testing.assert_close(flatten(rec.final), w, rtol=0, atol=1e-12)
    assert set(rec.final) == set(NAMES)


class _OwnBackward(Trainer):
    """A Trainer subclass whose training_step calls loss.backward() itself."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()


class _SAMOverOwnBackward(SAMMixin, _OwnBackward):
    pass


class _OverridesWithoutSuper(SAMTrainer):
    training_step = _OwnBackward.training_step


@pytest.mark.parametrize("cls", [_SAMOverOwnBackward, _OverridesWithoutSuper])
def test_a_training_step_that_bypasses_sam_is_refused(tmp_path, cls):
    args = SAMTrainingArguments(output_dir=str(tmp_path), **BASE_ARGS, **SAM)
    with pytest.raises(RuntimeError, match="made no accelerator.backward|without a SAM step"):
        cls(model=TinyNet(), args=args, train_dataset=make_data(4)).train()


@pytest.mark.parametrize("replay", [False, True])
def test_replayed_dropout_leaves_only_the_perturbation_in_sharpness(tmp_path, replay):
    """rho tiny: the true loss change is ~rho*||g|| (1e-9 here). With a new dropout mask per pass the
    logged sharpness is dropout noise; with the clean pass's masks replayed it is the perturbation's."""
    rows = token_rows(8, 10, seed=7)
    logs = LogRecorder()
    sam_trainer(
        tmp_path, gpt2(dropout=0.3), rows, [logs], per_device_train_batch_size=4, max_steps=2, learning_rate=0.0,
        sam_ascent_steps=1, sam_rho=1e-9, sam_replay_rng=replay,
    ).train()  # fmt: skip
    sharpness = [abs(entry["sam/sharpness"]) for entry in logs.logs if "sam/sharpness" in entry]
    assert len(sharpness) == 2
    if replay:
        assert max(sharpness) < 1e-6
    else:
        assert min(sharpness) > 1e-3
