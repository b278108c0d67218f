"""Model building shared by the tasks: pretrained (hub, local, embedded) or from a config."""

from __future__ import annotations

from typing import Any

import yaml

from .arguments import ModelArguments
from .hub import from_hub


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """ "a=1,b=[16,32],c=gelu" -> {"a": 1, "b": [16, 32], "c": "gelu"} (commas inside brackets kept)."""
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    out = {}
    for item in filter(None, (i.strip() for i in items)):
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(config, overrides: dict[str, Any]):
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"config override {key!r}: {type(config).__name__} has no such field.")
        setattr(config, key, value)
    return config


def label_maps(names: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(names),
        "id2label": {i: n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def hub_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def pretrained(auto_class, name: str, offline_choice: str, model_args: ModelArguments, **kwargs: Any):
    """``auto_class.from_pretrained`` through the hub guard (local folders load as they are)."""
    return from_hub(
        f"model {name!r}",
        offline_choice,
        auto_class.from_pretrained,
        name,
        **hub_kwargs(model_args),
        **kwargs,
    )


# the classification heads of the architectures the tasks build (trained in full beside the adapters)
HEAD_NAMES = ("classifier", "score")


def with_lora(model, model_args: ModelArguments):
    """``model`` with LoRA adapters (PEFT) when ``--use_peft`` is set: the adapters and the classification head
    train, the rest is frozen. Without the flag, the model as it is."""
    if not model_args.use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    heads = [name for name in HEAD_NAMES if hasattr(model, name)]
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save or heads,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # no default target modules for this architecture
        raise ValueError(f"--use_peft: {err} Name them with --lora_target_modules.") from err
