"""hf_sam.trainer.compat against the installed transformers: the accumulation scaling it reports is the one
the release's own stock ``training_step`` applies (observed through ``accelerator.backward``), for every
combination of the inputs that decide it; and SAMTrainer trains with accumulation on the installed
release (on 5.0-5.19, which lack ``Trainer.loss_is_scaled_for_ga``, its first step used to raise).

Runs in CI at both ends of the declared range (tests/version_ends.txt).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import Trainer, set_seed

from hf_sam.trainer import compat

from ..helpers import WeightRecorder, plain_trainer, sam_trainer
from ..tiny import TinyNet, batch_of, make_data

ACCUMULATION = 4


class KwargsNet(TinyNet):
    """A head whose forward takes ``**kwargs`` (num_items_in_batch among them) and ignores them."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


def _cross_entropy(outputs, labels, num_items_in_batch=None):
    return torch.nn.functional.cross_entropy(outputs["logits"], labels)


def _stock_divides(trainer, num_items_in_batch) -> bool:
    """Whether the stock training_step divides the loss by the accumulation steps (seen at backward)."""
    seen = []
    trainer.accelerator.backward = lambda loss, **kwargs: seen.append(loss.detach())
    model = trainer.model
    inputs = batch_of(make_data(4))
    inputs = {"x": inputs[0], "labels": inputs[1]}
    Trainer.training_step(trainer, model, dict(inputs), num_items_in_batch)
    with torch.no_grad():
        loss = model(**inputs)["loss"]
    if torch.allclose(seen[0], loss / ACCUMULATION):
        return True
    assert torch.allclose(seen[0], loss), "the stock step neither kept nor divided the loss"
    return False


DECLARED = [None, True, False] if compat.HAS_LOSS_IS_SCALED_FOR_GA else [None]


@pytest.mark.parametrize(
    "accepts,num_items,loss_func,declared", list(itertools.product([False, True], [None, 8], [False, True], DECLARED))
)
def test_scaling_decision_is_the_stock_steps(tmp_path, accepts, num_items, loss_func, declared):
    set_seed(0)
    trainer = sam_trainer(tmp_path, KwargsNet(), make_data(4), gradient_accumulation_steps=ACCUMULATION)
    trainer.current_gradient_accumulation_steps = ACCUMULATION
    trainer.model_accepts_loss_kwargs = accepts
    if loss_func:  # only its presence matters to the decision; it computes the model's own loss
        trainer.compute_loss_func = _cross_entropy
    if declared is not None:
        trainer.loss_is_scaled_for_ga = declared
    num = None if num_items is None else torch.tensor(num_items)
    assert compat.loss_is_scaled_for_ga(trainer, num) == (not _stock_divides(trainer, num))
    assert compat.accumulation_steps(trainer) == ACCUMULATION


def test_declared_unscaled_loss_is_divided_on_this_release(tmp_path):
    trainer = sam_trainer(tmp_path, KwargsNet(), make_data(4), gradient_accumulation_steps=ACCUMULATION)
    trainer.current_gradient_accumulation_steps = ACCUMULATION
    trainer.model_accepts_loss_kwargs = True  # a head whose forward takes **kwargs but ignores them
    assert not _stock_divides(trainer, torch.tensor(8))
    compat.declare_loss_unscaled(trainer)
    assert _stock_divides(trainer, torch.tensor(8))
    assert not compat.loss_is_scaled_for_ga(trainer, torch.tensor(8))


def test_trains_on_this_release(tmp_path):
    """On transformers 5.0-5.19 (no Trainer.loss_is_scaled_for_ga) the first SAM step raised AttributeError;
    in CI's floor venv this runs there. SAM k=0 equals the stock Trainer; k=2 trains with accumulation."""
    common = dict(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=3)
    finals = {}
    for name, make, sam in (("stock", plain_trainer, {}), ("k0", sam_trainer, {"sam_ascent_steps": 0}),
                            ("k2", sam_trainer, {"sam_ascent_steps": 2, "sam_rho": 0.3})):  # fmt: skip
        set_seed(0)
        rec = WeightRecorder()
        trainer = make(tmp_path / name, TinyNet(), make_data(12), [rec], **common, **sam)
        trainer.train()
        finals[name] = rec.final
        assert all("loss" in h for h in trainer.state.log_history[:-1])
    assert all(torch.equal(finals["stock"][n], finals["k0"][n]) for n in finals["stock"])
    assert not all(torch.equal(finals["stock"][n], finals["k2"][n]) for n in finals["stock"])
