"""--label_noise: that fraction of the training labels flipped, each to another class, the same set for the
same seed; validation and test labels untouched. Checked against the clean data of the same splits."""

import numpy as np
import pytest

from hf_sam.tasks import DataArguments, ModelArguments
from hf_sam.tasks.data import load_raw_datasets
from hf_sam.tasks.label_noise import noisy_labels


def _splits(noise: float, seed: int = 0):
    args = DataArguments(dataset_name="embedded:digits", label_noise=noise, label_noise_seed=seed)
    return load_raw_datasets(args, ModelArguments(), "image", seed=42)


@pytest.mark.parametrize("noise", [0.2, 0.4])
def test_the_fraction_flips_and_evaluation_stays_clean(noise):
    clean, noisy = _splits(0.0), _splits(noise)
    train_clean, train_noisy = np.array(clean["train"]["label"]), np.array(noisy["train"]["label"])
    changed = train_clean != train_noisy
    assert changed.sum() == round(noise * len(train_clean))  # every chosen label moved to another class
    assert train_noisy.min() >= 0 and train_noisy.max() < 10
    for split in ("validation", "test"):
        if split in clean:
            assert clean[split]["label"] == noisy[split]["label"]
    # the images are the same rows: only the labels differ
    assert np.array_equal(np.array(clean["train"]["image"][0]), np.array(noisy["train"]["image"][0]))


def test_same_seed_same_noise_other_seed_other_noise():
    a, b, c = (np.array(_splits(0.2, seed)["train"]["label"]) for seed in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_flips_are_uniform_over_the_other_classes():
    labels = [0] * 20000
    out, flipped = noisy_labels(labels, 0.5, num_classes=5, seed=3)
    assert len(flipped) == 10000 and all(out[i] != 0 for i in flipped)
    counts = np.bincount(np.array(out)[flipped], minlength=5)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] - 2500) < 4 * np.sqrt(2500))  # 4 sigma


@pytest.mark.parametrize("noise", [-0.1, 1.0])
def test_out_of_range_noise_is_refused(noise):
    with pytest.raises(ValueError, match="label_noise"):
        DataArguments(dataset_name="embedded:digits", label_noise=noise)
