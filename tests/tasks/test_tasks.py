"""The task layer: embedded data, hub-shaped data (with the hub replaced by local data), scripts."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_sam.tasks import DataArguments, ModelArguments, load_embedded
from hf_sam.tasks.data import load_raw_datasets
from hf_sam.tasks.run import main

from ..helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY_BERT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


@pytest.mark.parametrize(
    "name,n,key",
    [
        ("embedded:digits", 1797, "image"),
        ("embedded:mnist5k", 5000, "image"),
        ("embedded:rotten_tomatoes", None, "text"),
    ],
)
def test_embedded_splits_are_fixed_and_disjoint(name, n, key):
    first, second = load_embedded(name), load_embedded(name)
    total = sum(len(split) for split in first.values())
    if n is not None:
        assert total == n
    fingerprints = {}
    for split_name, split in first.items():
        assert split[key] == second[split_name][key], "splits must be deterministic"
        rows = split[key]
        fingerprints[split_name] = {
            hashlib.sha1(np.asarray(r).tobytes() if key == "image" else r.encode()).hexdigest() for r in rows
        }
    assert not fingerprints["train"] & fingerprints["validation"]
    assert not fingerprints["train"] & fingerprints["test"]
    labels = np.asarray(first["train"]["label"])
    assert len(np.unique(labels)) == first["train"].features["label"].num_classes


def _images(n, size, rng):
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _hub_like(name, config):
    """Small stand-ins with the columns and splits the real hub data sets have."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        feats = datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])}
        )
        make = lambda n: datasets.Dataset.from_dict(
            {"img": _images(n, 32, rng), "label": list(rng.integers(0, 10, n))}, features=feats
        )  # noqa: E731
        return datasets.DatasetDict(train=make(40), test=make(10))
    if name == "cifar100":
        feats = datasets.Features(
            {
                "img": datasets.Image(),
                "fine_label": datasets.ClassLabel(num_classes=100),
                "coarse_label": datasets.ClassLabel(num_classes=20),
            }
        )
        make = lambda n: datasets.Dataset.from_dict(
            {
                "img": _images(n, 32, rng),
                "fine_label": list(rng.integers(0, 100, n)),
                "coarse_label": list(rng.integers(0, 20, n)),
            },
            features=feats,
        )  # noqa: E731
        return datasets.DatasetDict(train=make(40), test=make(10))
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    text = lambda n: [" ".join(rng.choice(words, 5)) for _ in range(n)]  # noqa: E731
    labels = datasets.ClassLabel(names=["neg", "pos"])
    if name == "glue" and config == "sst2":
        feats = datasets.Features(
            {"sentence": datasets.Value("string"), "label": labels, "idx": datasets.Value("int32")}
        )
        make = lambda n, lab=True: datasets.Dataset.from_dict(
            {"sentence": text(n), "label": list(rng.integers(0, 2, n)) if lab else [-1] * n, "idx": list(range(n))},
            features=feats,
        )  # noqa: E731
        return datasets.DatasetDict(train=make(40), validation=make(10), test=make(10, False))
    if name in ("imdb", "rotten_tomatoes"):
        feats = datasets.Features({"text": datasets.Value("string"), "label": labels})
        make = lambda n: datasets.Dataset.from_dict(
            {"text": text(n), "label": list(rng.integers(0, 2, n))}, features=feats
        )  # noqa: E731
        if name == "imdb":
            return datasets.DatasetDict(train=make(40), test=make(10), unsupervised=make(10))
        return datasets.DatasetDict(train=make(40), validation=make(10), test=make(10))
    raise AssertionError(name)


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return _hub_like(name, config)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("hf_sam.tasks.hub.hub_reachable", lambda timeout=2.0: True)
    return calls


@pytest.mark.parametrize(
    "name,config,kind,classes",
    [
        ("cifar10", None, "image", 10),
        ("cifar100", None, "image", 100),
        ("glue", "sst2", "text", 2),
        ("imdb", None, "text", 2),
        ("rotten_tomatoes", None, "text", 2),
    ],
)
def test_hub_layouts_are_understood(fake_hub, name, config, kind, classes):
    raw = load_raw_datasets(DataArguments(dataset_name=name, dataset_config_name=config), ModelArguments(), kind)
    assert fake_hub == [(name, config)]
    assert set(raw) >= {"train", "validation"} and "unsupervised" not in raw
    assert raw["train"].features["label"].num_classes == classes
    if name in ("cifar10", "cifar100", "imdb"):  # validation carved out of train, disjoint
        assert len(raw["train"]) + len(raw["validation"]) == 40


def test_cifar_like_hub_data_trains_end_to_end(fake_hub, tmp_path):
    results = main(
        "image",
        [
            "--dataset_name",
            "cifar10",
            "--model_type",
            "resnet",
            "--output_dir",
            str(tmp_path),
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "--report_to",
            "none",
            "--sam_ascent_steps",
            "2",
            "--image_size",
            "16",
        ],
    )
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert results["train_forward_backward_passes"] == 2 * 3


def test_sst2_like_unlabelled_test_split_predicts_without_metrics(fake_hub, tmp_path):
    results = main(
        "text",
        [
            "--dataset_name",
            "glue",
            "--dataset_config_name",
            "sst2",
            "--model_type",
            "bert",
            "--tokenizer_name",
            "embedded:minilm",
            "--config_overrides",
            TINY_BERT,
            "--output_dir",
            str(tmp_path),
            "--do_train",
            "--do_predict",
            "--max_steps",
            "1",
            "--use_cpu",
            "--report_to",
            "none",
        ],
    )
    assert "predict_accuracy" not in results
    lines = (tmp_path / "predict_results.txt").read_text().splitlines()
    assert len(lines) == 11 and lines[1].split("\t")[1] in ("neg", "pos")


def test_missing_hub_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_sam.tasks.hub.hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(SystemExit) as err:
        main("image", ["--dataset_name", "cifar10", "--output_dir", str(tmp_path), "--do_train", "--use_cpu"])
    message = str(err.value)
    assert "cifar10" in message and "embedded:mnist5k" in message and "\n" not in message


def _metrics(path):
    return json.loads((Path(path) / "all_results.json").read_text())


@pytest.mark.parametrize("k", [0, 2])
def test_image_script_on_embedded_digits(tmp_path, k):
    out = tmp_path / f"k{k}"
    main(
        "image",
        [
            "--dataset_name",
            "embedded:digits",
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "32",
            "--learning_rate",
            "3e-3",
            "--use_cpu",
            "--report_to",
            "none",
            "--sam_ascent_steps",
            str(k),
            "--logging_steps",
            "3",
        ],
    )
    metrics = _metrics(out)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["predict_accuracy"] <= 1.0
    assert metrics["train_forward_backward_passes"] == 6 * (k + 1)
    assert (out / "model.safetensors").exists() and (out / "trainer_state.json").exists()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("sam/sharpness" in h for h in history) == (k > 0)


@pytest.mark.parametrize("k", [0, 2])
def test_text_script_on_embedded_rotten_tomatoes(tmp_path, k):
    config = tmp_path / "args.json"
    config.write_text(
        json.dumps(
            {
                "dataset_name": "embedded:rotten_tomatoes",
                "model_type": "bert",
                "tokenizer_name": "embedded:minilm",
                "config_overrides": TINY_BERT,
                "output_dir": str(tmp_path / "out"),
                "do_train": True,
                "do_eval": True,
                "max_steps": 4,
                "max_eval_samples": 64,
                "max_seq_length": 32,
                "per_device_train_batch_size": 16,
                "use_cpu": True,
                "report_to": "none",
                "sam_ascent_steps": k,
            }
        )
    )
    main("text", [str(config)])  # a single .json argument is a config file
    metrics = _metrics(tmp_path / "out")
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["eval_f1"] <= 1.0
    assert metrics["eval_samples"] == 64


def test_resume_from_checkpoint(tmp_path):
    argv = [
        "--dataset_name",
        "embedded:digits",
        "--output_dir",
        str(tmp_path),
        "--do_train",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "16",
        "--use_cpu",
        "--report_to",
        "none",
        "--sam_ascent_steps",
        "1",
    ]
    main("image", argv)
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "checkpoint-4").is_dir()
    main("image", [*argv, "--max_steps", "6", "--resume_from_checkpoint", "last"])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_accelerate_launch_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --multi_gpu starts two processes (the --cpu launcher starts one); --use_cpu below keeps them on the CPU
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "scripts" / "run_image_classification.py"),
        "--dataset_name",
        "embedded:digits",
        "--model_type",
        "vit",  # its untrained loss is close to ln 10, which the loss-scale check below relies on
        "--output_dir",
        str(tmp_path),
        "--do_train",
        "--do_eval",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "16",
        "--report_to",
        "none",
        "--sam_ascent_steps",
        "2",
        "--use_cpu",
        "--logging_steps",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _metrics(tmp_path)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["train_forward_backward_passes"] == 3 * 3
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # two processes really ran: 3 steps of 2 ranks x 16 rows, 40 steps per epoch of the 1,259 training rows
    # (one process would take 79 steps per epoch)
    assert state["log_history"][-1]["epoch"] == pytest.approx(3 / 40)
    # the image model normalizes by the token/item count of all ranks, so the logged losses are on the
    # one-process scale (about ln 10 for 10 untrained classes), not twice it
    first = state["log_history"][0]
    assert 1.9 < first["sam/loss_clean"] < 2.8 and 1.9 < first["loss"] < 2.8


def test_text_script_trains_lora_adapters_with_sam(tmp_path):
    """--use_peft (TRL's and PEFT's flag names): the adapters and the head train with SAM, the base is frozen."""
    from hf_sam.tasks.arguments import DataArguments, ModelArguments
    from hf_sam.tasks.run import build_trainer
    from hf_sam.trainer.args import SAMTrainingArguments

    model_args = ModelArguments(
        model_type="bert", tokenizer_name="embedded:minilm", config_overrides=TINY_BERT, use_peft=True, lora_r=4
    )
    data_args = DataArguments(dataset_name="embedded:rotten_tomatoes", max_seq_length=32, max_train_samples=64)
    args = SAMTrainingArguments(
        output_dir=str(tmp_path / "out"), do_train=True, max_steps=3, per_device_train_batch_size=16, use_cpu=True,
        report_to="none", sam_ascent_steps=2, learning_rate=1e-2, logging_steps=1,
    )  # fmt: skip
    trainer, _ = build_trainer("text", model_args, data_args, args)
    params = dict(trainer.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable), sorted(trainable)
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable, "only adapters and the head move"
    assert trainer.state.log_history[0]["sam/passes"] == 3.0


def test_lora_on_a_model_peft_has_no_default_for_asks_for_target_modules():
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_sam.tasks.arguments import ModelArguments
    from hf_sam.tasks.models import with_lora

    model = ResNetForImageClassification(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8))
    with pytest.raises(ValueError, match="--lora_target_modules"):
        with_lora(model, ModelArguments(model_type="resnet", use_peft=True))
    adapted = with_lora(model, ModelArguments(model_type="resnet", use_peft=True, lora_target_modules=["convolution"]))
    assert any("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)


def test_embedded_pretrained_resnet_is_built_once_and_fine_tuned(tmp_path, monkeypatch):
    """embedded:resnet-mnist5k: trained here on MNIST-5k (one epoch for the test), cached with its record, read
    back without a rebuild, and loaded as the starting point of a fine-tuning run on the 8x8 digits."""
    from safetensors.torch import load_file

    from hf_sam.tasks import pretrained_vision
    from hf_sam.tasks.arguments import DataArguments, ModelArguments
    from hf_sam.tasks.run import build_trainer
    from hf_sam.trainer.args import SAMTrainingArguments

    monkeypatch.setenv("HF_SAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrained_vision.RECIPE, "num_train_epochs", 1)
    record = pretrained_vision.pretraining_record()
    folder = pretrained_vision.checkpoint_dir()
    assert record["source"] == "embedded:mnist5k" and record["validation_accuracy"] > 0.8, record
    assert record["optimizer_steps"] > 0 and (folder / "config.json").exists()
    built = (folder / "pretraining.json").stat().st_mtime_ns
    assert pretrained_vision.ensure_checkpoint() == folder and (folder / "pretraining.json").stat().st_mtime_ns == built
    args = SAMTrainingArguments(output_dir=str(tmp_path / "ft"), do_train=True, use_cpu=True, report_to="none")
    model_args = ModelArguments(model_name_or_path="embedded:resnet-mnist5k")
    trainer, task = build_trainer("image", model_args, DataArguments(dataset_name="embedded:digits"), args)
    saved = load_file(str(folder / "model.safetensors"))
    state = trainer.model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert tuple(task.train_dataset[0]["pixel_values"].shape) == (1, 28, 28), "digits resized to MNIST's size"
