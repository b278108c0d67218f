"""Causal-LM and seq2seq SAM updates through the Trainer equal a float64 SAM on the token-mean loss.

Gradient accumulation with rows of different lengths: the Trainer normalizes each micro-batch's
summed token loss by the token count of the whole accumulated batch (``num_items_in_batch``), and
each micro-batch takes its own perturbation. The reference computes exactly that by hand.
"""

import pytest
import torch
from torch.utils.data import default_collate

from hf_sam import SAMSeq2SeqTrainer, SAMSeq2SeqTrainingArguments

from ..helpers import BASE_ARGS, WeightRecorder, sam_trainer
from ..reference_func import loss_of, sam_gradient, token_ce_sum, trainable
from ..tiny_lm import gpt2, t5, token_rows

LR, RHO = 0.1, 0.2
# transformers computes these losses in float32 (logits.float()) even for a float64 model
ATOL = 1e-6


def _reference_update(model, rows, k, grad_accum, shift, forward, per_micro_mean=False):
    """w - lr * sum over micro-batches of the SAM gradient of (summed token CE of the micro-batch / N):
    N is the accumulated batch's token count, or the micro-batch's own with ``per_micro_mean``."""
    size = len(rows) // grad_accum  # sequential sampling: micro-batch m is rows m*size .. (m+1)*size
    micro = [default_collate(rows[m * size : (m + 1) * size]) for m in range(grad_accum)]

    def tokens(batches):
        return int(sum(((b["labels"][:, 1:] if shift else b["labels"]) != -100).sum() for b in batches))

    w = trainable(model)
    total = {n: torch.zeros_like(v) for n, v in w.items()}
    for batch in micro:
        count = tokens([batch] if per_micro_mean else micro)
        loss = loss_of(model, lambda run, b=batch, c=count: token_ce_sum(forward(run, b), b["labels"], shift) / c)
        for n, g in sam_gradient(loss, w, k, RHO).items():
            total[n] += g
    return {n: w[n] - LR * total[n] for n in w}


@pytest.mark.parametrize("k", [0, 2])
def test_causal_lm_update_matches_float64_reference(tmp_path, k):
    rows = token_rows(4, 10, seed=1)
    model = gpt2()
    want = _reference_update(
        model, rows, k, 2, True, lambda run, b: run(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    )
    rec = WeightRecorder()
    trainer = sam_trainer(
        tmp_path, model, rows, [rec], per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=LR, sam_ascent_steps=k, sam_rho=RHO,
    )  # fmt: skip
    trainer.train()
    for n, value in want.items():
        torch.testing.assert_close(rec.final[n], value, rtol=0, atol=ATOL, msg=n)


def _token_mean_loss(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func: summed token CE over the accumulated batch's token count."""
    total = torch.nn.functional.cross_entropy(
        outputs.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / num_items_in_batch


def _shift_right(labels):
    start = torch.zeros_like(labels[:1])  # decoder_start_token_id = 0
    return torch.cat([start, labels[:-1]]).masked_fill(torch.cat([start, labels[:-1]]) == -100, 0)


@pytest.mark.parametrize("k,token_mean", [(1, True), (3, True), (2, False)])
def test_seq2seq_update_matches_float64_reference(tmp_path, k, token_mean):
    """token_mean: a compute_loss_func normalizes by the accumulated token count. Without it, the
    seq2seq models of transformers 5.24 ignore num_items_in_batch yet accept **kwargs, so the stock
    Trainer sums the micro-batches' own token means without dividing by the accumulation steps: SAM
    must reproduce that too (it is the stock descent), and the reference says so."""
    targets = token_rows(4, 6, seed=2)
    sources = token_rows(4, 8, seed=3)
    rows = [
        {
            "input_ids": s["input_ids"],
            "attention_mask": s["attention_mask"],
            "decoder_input_ids": _shift_right(t["labels"]),
            "labels": t["labels"],
        }
        for s, t in zip(sources, targets, strict=True)
    ]
    model = t5()

    def forward(run, b):
        keys = ("input_ids", "attention_mask", "decoder_input_ids")
        return run(**{key: b[key] for key in keys}).logits

    want = _reference_update(model, rows, k, 2, False, forward, per_micro_mean=not token_mean)
    rec = WeightRecorder()
    args = SAMSeq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        **{**BASE_ARGS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": LR},
        sam_ascent_steps=k,
        sam_rho=RHO,
    )
    SAMSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        callbacks=[rec],
        compute_loss_func=_token_mean_loss if token_mean else None,
    ).train()
    for n, value in want.items():
        torch.testing.assert_close(rec.final[n], value, rtol=0, atol=ATOL, msg=n)
