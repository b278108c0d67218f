"""Tiny language models from configs, and token batches, for the Trainer-family tests (no hub)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)

from hf_sam.tasks.instructions import word_tokenizer

VOCAB = len(word_tokenizer())


def gpt2(dropout: float = 0.0, dtype=torch.float64, seed: int = 0) -> GPT2LMHeadModel:
    set_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).to(dtype)
    # transformers 5.24 derives loss_type from the class name, and "GPT2LMHeadModel" matches no entry: the
    # Trainer then counts num_items_in_batch over unshifted labels (one token per row too many) and the
    # loss is not the token mean. Naming the loss makes the stock Trainer count the predicted tokens.
    model.loss_type = "ForCausalLM"
    return model


def t5(dtype=torch.float64, seed: int = 0) -> T5ForConditionalGeneration:
    set_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).to(dtype)


def bert_classifier(dtype=torch.float64, seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    set_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2, max_position_embeddings=32,
    )  # fmt: skip
    return BertForSequenceClassification(config).to(dtype)


def token_rows(n: int, length: int, seed: int = 0, min_length: int = 3) -> list[dict[str, torch.Tensor]]:
    """Rows of random token ids padded to ``length`` (labels -100 on the padding): lengths vary, so
    that a per-micro-batch token mean differs from the mean over the whole accumulated batch."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        size = int(torch.randint(min_length, length + 1, (1,), generator=g))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:size] = torch.randint(3, VOCAB, (size,), generator=g)
        mask = (torch.arange(length) < size).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows
