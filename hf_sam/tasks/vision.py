"""Image classification: data transforms in plain torch (no torchvision needed) and models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .arguments import DataArguments, ModelArguments
from .data import label_names, load_raw_datasets
from .models import apply_overrides, label_maps, parse_config_overrides, pretrained

IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
OFFLINE_MODEL = (
    "--model_type vit or --model_type resnet (a model built from its config), or --model_name_or_path "
    "embedded:resnet-mnist5k (a small ResNet pretrained here on MNIST-5k)"
)


def to_uint8_array(image: Any) -> np.ndarray:
    """A PIL image or an array as an HxWxC uint8 array."""
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        array = np.asarray(image)
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return array.astype(np.uint8, copy=False)


@dataclass
class ImageTransform:
    """uint8 HxWxC -> normalized float CxSxS, with optional random crop (pad 1/8) and flip."""

    size: int
    channels: int
    mean: list[float]
    std: list[float]
    augment: bool = False

    def __call__(self, images: list[Any], generator: torch.Generator | None = None) -> torch.Tensor:
        batch = []
        for image in images:
            x = torch.from_numpy(np.array(to_uint8_array(image))).permute(2, 0, 1).float() / 255.0
            if x.shape[0] != self.channels:
                x = x.mean(0, keepdim=True) if self.channels == 1 else x[:1].expand(self.channels, -1, -1)
            if x.shape[1:] != (self.size, self.size):
                x = F.interpolate(
                    x[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
                )[0]
            if self.augment:
                x = self._augment(x, generator)
            batch.append(x)
        out = torch.stack(batch)
        mean = torch.tensor(self.mean[: self.channels]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.channels]).view(1, -1, 1, 1)
        return (out - mean) / std

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        pad = max(self.size // 8, 1)
        padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        x = padded[:, i : i + self.size, j : j + self.size]
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x


def _image_column(raw, data_args: DataArguments) -> str:
    columns = next(iter(raw.values())).column_names
    column = data_args.image_column_name or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        raise ValueError(f"No image column found among {columns}; name it with --image_column_name.")
    return column


def default_config(model_type: str, size: int, channels: int):
    """Small from-scratch configs that train in minutes on a CPU."""
    from transformers import AutoConfig, ResNetConfig, ViTConfig

    if model_type == "vit":
        patch = 2 if size <= 16 else 4
        return ViTConfig(
            image_size=size,
            patch_size=patch,
            num_channels=channels,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    if model_type == "resnet":
        return ResNetConfig(
            num_channels=channels,
            embedding_size=16,
            hidden_sizes=[16, 32, 64],
            depths=[1, 1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
        )
    config = AutoConfig.for_model(model_type)
    for key, value in (("num_channels", channels), ("image_size", size)):
        if hasattr(config, key):
            setattr(config, key, value)
    return config


@dataclass
class PreparedTask:
    """Everything a Trainer needs for one task."""

    model: Any
    train_dataset: Any
    eval_dataset: Any
    test_dataset: Any
    data_collator: Any
    processing_class: Any
    label_names: list[str]
    metric_names: tuple[str, ...]


def prepare_image_task(model_args: ModelArguments, data_args: DataArguments, seed: int = 42) -> PreparedTask:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    raw = load_raw_datasets(data_args, model_args, "image", seed=seed)
    names = label_names(raw)
    column = _image_column(raw, data_args)
    native = to_uint8_array(raw["train"][0][column])
    processor = None
    if model_args.model_name_or_path:
        model = pretrained(
            AutoModelForImageClassification,
            model_args.model_name_or_path,
            OFFLINE_MODEL,
            model_args,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **label_maps(names),
        )
        processor = pretrained(
            AutoImageProcessor,
            model_args.image_processor_name or model_args.model_name_or_path,
            OFFLINE_MODEL,
            model_args,
        )
        size_info = getattr(processor, "size", {}) or {}
        size = data_args.image_size or size_info.get("height") or size_info.get("shortest_edge") or native.shape[0]
        mean = list(getattr(processor, "image_mean", None) or [0.5] * 3)
        std = list(getattr(processor, "image_std", None) or [0.5] * 3)
        channels = getattr(model.config, "num_channels", 3)
    else:
        from transformers import set_seed

        size = data_args.image_size or native.shape[0]
        channels = native.shape[2]
        config = default_config(model_args.model_type or "resnet", size, channels)
        apply_overrides(config, parse_config_overrides(model_args.config_overrides))
        for key, value in label_maps(names).items():
            setattr(config, key, value)
        set_seed(seed)  # the Trainer's seed comes too late for the initial weights
        model = AutoModelForImageClassification.from_config(config)
        size = getattr(config, "image_size", size) if isinstance(getattr(config, "image_size", None), int) else size
        mean, std = [0.5] * channels, [0.5] * channels
    natural = channels == 3 and native.shape[2] == 3
    augment = data_args.augment if data_args.augment is not None else natural
    eval_transform = ImageTransform(int(size), int(channels), mean, std, augment=False)
    train_transform = ImageTransform(int(size), int(channels), mean, std, augment=augment)

    def attach(split, transform):
        def apply(batch):
            out = {"pixel_values": list(transform(batch[column]))}
            if all(label >= 0 for label in batch["label"]):  # unlabelled test splits carry -1
                out["labels"] = batch["label"]
            return out

        return split.with_transform(apply)

    return PreparedTask(
        model=model,
        train_dataset=attach(raw["train"], train_transform),
        eval_dataset=attach(raw["validation"], eval_transform),
        test_dataset=attach(raw["test"], eval_transform) if "test" in raw else None,
        data_collator=collate_images,
        processing_class=processor,
        label_names=names,
        metric_names=("accuracy",),
    )


def collate_images(rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([row["pixel_values"] for row in rows])}
    if all("labels" in row for row in rows):
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.long)
    return batch
