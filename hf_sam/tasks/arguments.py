"""The model and data arguments of the task scripts (HF examples style)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    """Which model to fine-tune: a hub/local checkpoint, an embedded one, or one built from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune: a hub id (google/vit-base-patch16-224-in21k, bert-base-uncased), "
            "a local folder, or embedded:minilm (text). Leave empty to build --model_type from a config."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Build a new model of this type from its config (resnet, vit, bert, ...). Images default to a "
            "small ResNet, which learns from small data; a ViT from scratch needs far more."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config overrides for --model_type, e.g. hidden_size=64,num_hidden_layers=2."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path (text), if not the model's; embedded:minilm works."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or path."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloads."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the hub."})
    ignore_mismatched_sizes: bool = field(
        default=True, metadata={"help": "Replace a pretrained classification head of another size."}
    )
    # LoRA, with the flag names of TRL's ModelConfig and PEFT's examples
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (PEFT) and the classification head; the rest of the model frozen."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt (e.g. query value); unset: PEFT's default for the architecture (BERT: "
            "query and value). Models PEFT has no default for (ResNet) need it."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full beside the adapters (default: the classification head)."},
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A hub data set (cifar10, cifar100, glue, rotten_tomatoes, imdb) or an embedded one: "
            "embedded:digits, embedded:mnist5k (images), embedded:rotten_tomatoes (text)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Data set config, e.g. sst2 for glue."})
    train_file: str | None = field(default=None, metadata={"help": "A csv/json/jsonl training file (or image folder)."})
    validation_file: str | None = field(default=None, metadata={"help": "A csv/json/jsonl validation file."})
    test_file: str | None = field(default=None, metadata={"help": "A csv/json/jsonl test file for --do_predict."})
    text_column_name: str | None = field(default=None, metadata={"help": "Text column (detected if empty)."})
    text_pair_column_name: str | None = field(default=None, metadata={"help": "Second text column of pair tasks."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (detected if empty)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (detected if empty)."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for validation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})
    max_seq_length: int = field(default=128, metadata={"help": "Longest tokenized text; longer is truncated."})
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to this square size (default: the model's, or native)."}
    )
    augment: bool | None = field(
        default=None,
        metadata={"help": "Random crop and flip for training images (default: on for natural images, off for digits)."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the preprocessed data."})
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Symmetric label noise: this fraction of the training labels flipped, each to another class at "
            "random (validation and test stay clean)."
        },
    )
    label_noise_seed: int = field(default=0, metadata={"help": "The seed of the flipped labels (fixed across runs)."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError(
                "Give --dataset_name (a hub data set or embedded:digits / embedded:mnist5k / "
                "embedded:rotten_tomatoes) or --train_file/--validation_file."
            )
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise={self.label_noise} is invalid: it must be in [0, 1).")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"train_val_split={self.train_val_split} is invalid: it must be in (0, 1).")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is invalid: it must be >= 1.")
