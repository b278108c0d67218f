"""A reuse of a user's own, registered like LookSAM's: selected by ``sam_reuse``, its options through
``sam_options``, its hook called at the one-pass steps of ``sam_every_n_steps`` > 1, its refusal checked before
training. The update is checked against the float64 family reference (SAM every 2 steps) plus the user's term,
computed by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import set_seed

from hf_sam import register
from hf_sam.engine import LastDescent, Refusal, Variant, option
from hf_sam.engine.variants import unregister

from ..helpers import WeightRecorder, sam_trainer
from ..reference_family import simulate
from ..reference_sam import NAMES, flatten
from ..tiny import TinyNet, batch_of, make_data

LR, RHO, BATCH, PUSH = 0.1, 0.3, 4, 0.01


class PushDescent(LastDescent):
    """SAM's descent; the one-pass steps add ``push`` to every gradient entry."""

    def __init__(self, push: float) -> None:
        self.push = push
        self.one_pass_steps = 0

    def one_pass_step(self, params, layout) -> None:
        self.one_pass_steps += 1
        for p in params:
            p.grad.add_(self.push)


@dataclass
class PushOptions:
    push: float = option(0.0, "what the one-pass steps add to every gradient entry")


@pytest.fixture
def push_reuse():
    variant = Variant("reuse", "push", "adds a constant to the one-pass steps' gradient",
                      lambda o, rho: PushDescent(o.push), PushOptions, needs_ascent=False,
                      refusals=(Refusal("several processes", "it is a test"),))  # fmt: skip
    register(variant)
    yield variant
    unregister("reuse", "push")


def test_a_users_reuse_acts_in_the_one_pass_steps(tmp_path, push_reuse):
    set_seed(0)
    model = TinyNet()
    data = make_data(n=BATCH * 2)
    recorder = WeightRecorder()
    trainer = sam_trainer(
        tmp_path, model, data, [recorder], max_steps=2, per_device_train_batch_size=BATCH, optim="sgd",
        learning_rate=LR, sam_rho=RHO, sam_every_n_steps=2, sam_reuse="push", sam_options=f'{{"push": {PUSH}}}',
    )  # fmt: skip
    trainer.train()
    start = recorder.before[0]
    shapes = {n: tuple(start[n].shape) for n in NAMES}
    batches = [[batch_of(data[t * BATCH : (t + 1) * BATCH])] for t in range(2)]
    # step 0 is SAM's, step 1 the one-pass step: plain SGD moves it by -lr * push more on every weight
    sam_every_2 = simulate(flatten(start), shapes, batches, {"rho": RHO, "every_n": 2}, {"name": "sgd", "lr": LR})
    torch.testing.assert_close(flatten(recorder.before[1]), sam_every_2[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(flatten(recorder.final), sam_every_2[1] - LR * PUSH, rtol=0, atol=1e-12)


def test_a_users_reuse_is_refused_where_it_declares(push_reuse):
    from types import SimpleNamespace

    from hf_sam import SAMConfig
    from hf_sam.trainer.checks import check_variants

    config = SAMConfig(every_n_steps=2, reuse="push", options={"push": 0.5}, sync_ascent=True)
    launch = SimpleNamespace(sam_config=config, args=SimpleNamespace(world_size=2, gradient_accumulation_steps=1))
    with pytest.raises(ValueError, match=r"sam_reuse='push' does not support several processes: it is a test"):
        check_variants(launch)
    # not active without sam_every_n_steps > 1, and its option is then refused rather than ignored
    with pytest.raises(ValueError, match=r"reuse='push' is invalid: it is used only by every_n_steps > 1"):
        SAMConfig(reuse="push")
