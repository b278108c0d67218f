"""Embedded instruction-tuning data and a word-level tokenizer for it (no hub needed).

``embedded:arithmetic`` is a generated prompt/completion data set in TRL's conversational-free
"prompt"/"completion" format: small additions, subtractions and comparisons written in words
("what is 3 plus 4 ?" -> "7"). It is learnable by a tiny from-config causal LM in minutes on a CPU,
and the split into train/validation/test is fixed and disjoint.
"""

from __future__ import annotations

import random

EMBEDDED_INSTRUCTIONS = "embedded:arithmetic"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
_NUMBERS = range(0, 20)
_WORDS = ("what", "is", "plus", "minus", "larger", "smaller", ",", "or", "?", "which", "the", "of")


def _examples() -> list[dict[str, str]]:
    rows = []
    for a in range(10):
        for b in range(10):
            rows.append({"prompt": f"what is {a} plus {b} ?", "completion": f" {a + b}"})
            if a >= b:
                rows.append({"prompt": f"what is {a} minus {b} ?", "completion": f" {a - b}"})
            if a != b:
                rows.append({"prompt": f"which is larger , {a} or {b} ?", "completion": f" {max(a, b)}"})
                rows.append({"prompt": f"which is smaller , {a} or {b} ?", "completion": f" {min(a, b)}"})
    return rows


def arithmetic_dataset(seed: int = 1234):
    """A ``datasets.DatasetDict`` with disjoint, seeded train (80%)/validation (10%)/test (10%) splits."""
    import datasets

    rows = _examples()
    random.Random(seed).shuffle(rows)
    n_val = n_test = len(rows) // 10
    parts = {
        "validation": rows[:n_val],
        "test": rows[n_val : n_val + n_test],
        "train": rows[n_val + n_test :],
    }
    return datasets.DatasetDict({name: datasets.Dataset.from_list(part) for name, part in parts.items()})


def word_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the words and numbers of the embedded data (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [*SPECIAL_TOKENS, *(str(n) for n in _NUMBERS), *_WORDS]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
