"""Raw data for the task scripts: embedded, hub or local files, with train/validation(/test) splits."""

from __future__ import annotations

import logging
from pathlib import Path

from .arguments import DataArguments, ModelArguments
from .embedded import IMAGE_DATASETS, TEXT_DATASETS, is_embedded, load_embedded
from .hub import from_hub
from .label_noise import with_label_noise

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "target", "class")
OFFLINE_CHOICE = {
    "image": "--dataset_name embedded:mnist5k (or embedded:digits)",
    "text": "--dataset_name embedded:rotten_tomatoes",
}


def load_raw_datasets(data_args: DataArguments, model_args: ModelArguments, kind: str, seed: int = 42):
    """A DatasetDict with "train", "validation" and, where the source has one, "test" (label column "label")."""
    import datasets

    name = data_args.dataset_name
    if is_embedded(name):
        key = name.split(":", 1)[1]
        wanted = IMAGE_DATASETS if kind == "image" else TEXT_DATASETS
        if key not in wanted:
            raise ValueError(
                f"{name} is not an embedded {kind} data set; use one of {', '.join('embedded:' + w for w in wanted)}."
            )
        raw = load_embedded(name)
    elif name is not None:
        raw = from_hub(
            f"data set {name!r}",
            OFFLINE_CHOICE[kind],
            datasets.load_dataset,
            name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code or None,
        )
    else:
        raw = _load_files(data_args, kind)
    raw = datasets.DatasetDict({k: v for k, v in raw.items() if k in ("train", "validation", "test")})
    raw = _normalise_labels(raw, data_args)
    if "validation" not in raw and "train" in raw:
        # hold out part of train, stratified and seeded, so train and validation never overlap
        try:
            parts = raw["train"].train_test_split(
                test_size=data_args.train_val_split, seed=seed, stratify_by_column="label"
            )
        except ValueError:  # a class too rare to stratify: plain seeded split
            parts = raw["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    if "test" in raw and _unlabelled(raw["test"]):
        logger.info("The test split has no labels (e.g. GLUE): --do_predict writes predictions without metrics.")
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_predict_samples),
    ):
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    if data_args.label_noise and "train" in raw:  # after the split: validation and test stay clean
        raw["train"] = with_label_noise(raw["train"], data_args.label_noise, data_args.label_noise_seed)
    return raw


def _load_files(data_args: DataArguments, kind: str):
    import datasets

    files = {
        split: path
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        )
        if path
    }
    first = Path(next(iter(files.values())))
    if first.is_dir():
        if kind != "image":
            raise ValueError(f"{first} is a folder; text data comes as csv, json or jsonl files.")
        return datasets.load_dataset("imagefolder", data_dir=None, data_files={k: f"{v}/**" for k, v in files.items()})
    extension = first.suffix.lstrip(".")
    extension = {"jsonl": "json", "tsv": "csv"}.get(extension, extension)
    if extension not in ("csv", "json", "parquet"):
        raise ValueError(f"{first}: data files must be csv, tsv, json, jsonl or parquet.")
    kwargs = {"delimiter": "\t"} if first.suffix == ".tsv" else {}
    return datasets.load_dataset(extension, data_files=files, **kwargs)


def _normalise_labels(raw, data_args: DataArguments):
    """Rename the label column to "label" and make it a ClassLabel shared by all splits."""
    import datasets

    any_split = next(iter(raw.values()))
    column = data_args.label_column_name or next((c for c in LABEL_COLUMNS if c in any_split.column_names), None)
    if column is None:
        raise ValueError(f"No label column found among {any_split.column_names}; name it with --label_column_name.")
    if column != "label":
        if "label" in any_split.column_names:
            raw = raw.remove_columns("label")
        raw = raw.rename_column(column, "label")
    feature = next(iter(raw.values())).features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return raw
    if feature.dtype.startswith("int"):
        n_classes = max(max(split["label"]) for split in raw.values() if len(split)) + 1
        return raw.cast_column("label", datasets.ClassLabel(num_classes=n_classes))
    # string labels: one shared, sorted vocabulary across the splits
    names = sorted({str(v) for split in raw.values() for v in split["label"]})
    class_label = datasets.ClassLabel(names=names)
    raw = raw.map(lambda batch: {"label": class_label.str2int([str(v) for v in batch["label"]])}, batched=True)
    return raw.cast_column("label", class_label)


def _unlabelled(split) -> bool:
    labels = split["label"][: min(len(split), 256)]
    return len(labels) > 0 and all(v == -1 or v is None for v in labels)


def label_names(raw) -> list[str]:
    """The class names of the label column."""
    return list(next(iter(raw.values())).features["label"].names)
