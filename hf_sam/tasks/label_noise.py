"""Symmetric label noise for the training split: a fixed fraction of the training labels flipped, each to a
class drawn uniformly among the other classes, with a seed of its own (the same noisy set for every method
and training seed); validation and test labels stay clean. SAM's robustness to such noise is one of its
headline results (Foret et al. 2021)."""

from __future__ import annotations

import numpy as np


def noisy_labels(labels: list[int], fraction: float, num_classes: int, seed: int) -> tuple[list[int], np.ndarray]:
    """The labels with ``round(fraction * n)`` of them flipped, and the indices that were flipped (sorted)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise={fraction} is invalid: it must be in [0, 1).")
    if fraction > 0 and num_classes < 2:
        raise ValueError("label_noise needs at least two classes to flip a label to another.")
    rng = np.random.default_rng(seed)
    out = np.asarray(labels, dtype=np.int64).copy()
    flipped = np.sort(rng.choice(len(out), size=round(fraction * len(out)), replace=False))
    # a shift of 1..C-1 classes: uniform over the other classes, never the label itself
    shifts = rng.integers(1, num_classes, size=len(flipped))
    out[flipped] = (out[flipped] + shifts) % num_classes
    return out.tolist(), flipped


def with_label_noise(train, fraction: float, seed: int):
    """The training ``datasets.Dataset`` with noisy labels (its ClassLabel feature kept)."""
    if fraction == 0:
        return train
    num_classes = train.features["label"].num_classes
    labels, _ = noisy_labels(list(train["label"]), fraction, num_classes, seed)
    feature = train.features["label"]
    return train.remove_columns("label").add_column("label", labels, feature=feature)
