"""What SAM reports through the Trainer's own channels: total_flos and the model card."""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from ..helpers import plain_trainer, sam_trainer
from ..tiny_lm import bert_classifier, token_rows

STEPS = 4


def _rows(n: int) -> list[dict]:
    rows = token_rows(n, 8, seed=2)
    return [{**r, "labels": torch.tensor(int(r["input_ids"][0]) % 2)} for r in rows]


class _PassCounter:
    """Counts the model's forwards with autograd on (forward+backward passes) and off (forward only), from the
    model's side: independent of SAM's own bookkeeping."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.with_grad = self.forward_only = 0
        model.register_forward_hook(self._seen)

    def _seen(self, module, args, output) -> None:
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.forward_only += 1


def _train(tmp_path, make, **options):
    set_seed(0)
    model = bert_classifier(dtype=torch.float32)
    counter = _PassCounter(model)
    common = dict(max_steps=STEPS, per_device_train_batch_size=4, optim="sgd", optim_args="momentum=0.9")
    trainer = make(tmp_path, model, _rows(4 * STEPS), **{**common, **options})
    trainer.train()
    return trainer, counter


@pytest.mark.parametrize(
    "options,passes_per_step",
    [
        ({"sam_ascent_steps": 2}, 3),  # k + 1
        ({"sam_ascent_steps": 1, "sam_every_n_steps": 2}, 1.5),  # 1 + k/n
        ({"sam_ascent_steps": 2, "sam_every_n_steps": 2, "sam_reuse_alpha": 0.5}, 2),  # LookSAM: 1 + k/n
        ({"sam_method": "msam"}, 1),
        ({"sam_method": "lookbehind", "sam_ascent_steps": 2, "sam_rho": 0.01}, 3),
        ({"sam_descent": "xsam"}, None),  # the dynamic alpha's forward-only probes, once per epoch
    ],
)
def test_total_flos_counts_every_pass_sam_makes(tmp_path, options, passes_per_step):
    stock, stock_passes = _train(tmp_path / "stock", plain_trainer)
    sam, counted = _train(tmp_path / "sam", sam_trainer, **options)
    assert stock_passes.with_grad == STEPS and stock.state.total_flos > 0
    per_pass = stock.state.total_flos / STEPS  # the stock Trainer's count of one forward+backward pass
    # a forward costs 2 of the 6 FLOPs per parameter and token of a forward+backward pass
    want = per_pass * (counted.with_grad + counted.forward_only / 3)
    assert sam.state.total_flos == pytest.approx(want, rel=1e-12)
    if passes_per_step is not None:
        assert counted.with_grad == passes_per_step * STEPS and counted.forward_only == 0
    else:
        assert counted.forward_only > 0
    if options == {"sam_ascent_steps": 2}:
        assert sam.state.total_flos == pytest.approx(3 * stock.state.total_flos, rel=1e-12)


def test_model_card_records_sam(tmp_path):
    trainer, _ = _train(tmp_path, sam_trainer, sam_ascent_steps=2, sam_rho=0.1, sam_descent="gsam", sam_gsam_alpha=0.2)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    hyperparameters = card.split("The following hyperparameters were used during training:\n")[1]
    hyperparameters = hyperparameters.split("\n\n")[0]
    for line in ("- sam_ascent_steps: 2", "- sam_rho: 0.1", "- sam_descent: gsam", "- sam_gsam_alpha: 0.2"):
        assert line in hyperparameters.splitlines(), line
    assert "- learning_rate: 0.1" in hyperparameters.splitlines(), "the Trainer's own lines are kept"
    assert "arXiv 2302.10181" in hyperparameters and "GSAM (Zhuang" in hyperparameters
    assert "sam_step_mult" not in card and "sam_ascent_rule" not in card, "settings at their default are left out"
    assert "### Framework versions" in card


def test_model_card_of_a_plain_run_says_nothing_of_sam(tmp_path):
    trainer, _ = _train(tmp_path, sam_trainer, sam_ascent_steps=0)
    trainer.create_model_card(model_name="tiny")
    assert "sam_" not in (tmp_path / "README.md").read_text()
