"""The ascent-steps study grid: tasks x methods x rho x seeds x budget, its presets and config files."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import VARIANT_KINDS, SAMConfig
from ..engine import variants

TINY_BERT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


@dataclass(frozen=True)
class TaskSpec:
    """One data set with its model and training recipe, for the study."""

    name: str
    kind: str  # "image" or "text"
    model: dict[str, Any]  # ModelArguments fields
    data: dict[str, Any]  # DataArguments fields
    training: dict[str, Any]  # SAMTrainingArguments fields (epochs, lr, batch size, ...)


TASKS: dict[str, TaskSpec] = {
    # embedded: no network, minutes on a CPU
    "digits": TaskSpec(
        "digits",
        "image",
        {"model_type": "resnet"},  # a from-scratch ViT learns little from 1,257 images
        {"dataset_name": "embedded:digits"},
        {"num_train_epochs": 8, "learning_rate": 2e-3, "per_device_train_batch_size": 32},
    ),
    "mnist5k": TaskSpec(
        "mnist5k",
        "image",
        {"model_type": "resnet"},
        {"dataset_name": "embedded:mnist5k"},
        {"num_train_epochs": 5, "learning_rate": 3e-3, "per_device_train_batch_size": 64, "warmup_steps": 20},
    ),
    "rotten_tomatoes": TaskSpec(
        "rotten_tomatoes",
        "text",
        {"model_type": "bert", "tokenizer_name": "embedded:minilm", "config_overrides": TINY_BERT},
        {"dataset_name": "embedded:rotten_tomatoes", "max_seq_length": 32},
        # a from-scratch transformer needs a warm-up, or SAM's first steps can stall it at the majority class
        {"num_train_epochs": 3, "learning_rate": 3e-3, "per_device_train_batch_size": 64, "warmup_steps": 16},
    ),
    "rotten_tomatoes_minilm": TaskSpec(
        "rotten_tomatoes_minilm",
        "text",
        {"model_name_or_path": "embedded:minilm"},
        {"dataset_name": "embedded:rotten_tomatoes", "max_seq_length": 64},
        {"num_train_epochs": 2, "learning_rate": 1e-4, "per_device_train_batch_size": 32, "warmup_steps": 10},
    ),
    # hub, GPU scale (the paper preset)
    "cifar10": TaskSpec(
        "cifar10",
        "image",
        {"model_name_or_path": "google/vit-base-patch16-224-in21k"},
        {"dataset_name": "cifar10"},
        {"num_train_epochs": 3, "learning_rate": 2e-5, "per_device_train_batch_size": 64, "bf16": True},
    ),
    "cifar100": TaskSpec(
        "cifar100",
        "image",
        {"model_name_or_path": "google/vit-base-patch16-224-in21k"},
        {"dataset_name": "cifar100"},
        {"num_train_epochs": 3, "learning_rate": 2e-5, "per_device_train_batch_size": 64, "bf16": True},
    ),
    "sst2": TaskSpec(
        "sst2",
        "text",
        {"model_name_or_path": "bert-base-uncased"},
        {"dataset_name": "glue", "dataset_config_name": "sst2", "max_seq_length": 64},
        {"num_train_epochs": 3, "learning_rate": 2e-5, "per_device_train_batch_size": 32, "bf16": True},
    ),
}


def _noisy(task: TaskSpec, fraction: float) -> TaskSpec:
    """The task with ``fraction`` of its training labels flipped to another class (a fixed noise seed;
    validation and test clean): SAM's robustness to noisy labels, Foret et al. 2021."""
    name = f"{task.name}_noise{round(100 * fraction)}"
    return TaskSpec(name, task.kind, task.model, {**task.data, "label_noise": fraction}, task.training)


TASKS.update({t.name: t for t in (_noisy(TASKS["digits"], 0.2), _noisy(TASKS["digits"], 0.4))})

# fine-tuning as users fine-tune: pretrained models, few labelled examples (where SAM's effect is expected to be
# largest), with and without label noise; no hub (the embedded MiniLM; a ResNet pretrained here on MNIST-5k)
# (recipes chosen on seed 0 with AdamW, so that each learns within three epochs: MiniLM full fine-tuning 0.72, LoRA 0.72
# on rotten_tomatoes' validation split; the ResNet from MNIST-5k 0.96 on the digits)
_MINILM_500 = TaskSpec(
    "rt_minilm_500",
    "text",
    {"model_name_or_path": "embedded:minilm"},
    {"dataset_name": "embedded:rotten_tomatoes", "max_seq_length": 32, "max_train_samples": 500},
    {"num_train_epochs": 3, "learning_rate": 2e-4, "per_device_train_batch_size": 32, "warmup_steps": 4},
)
_MINILM_LORA_500 = TaskSpec(
    "rt_minilm_lora_500",
    "text",
    {"model_name_or_path": "embedded:minilm", "use_peft": True, "lora_r": 8},
    _MINILM_500.data,
    {**_MINILM_500.training, "learning_rate": 5e-3},
)
_DIGITS_FROM_MNIST_500 = TaskSpec(
    "digits_from_mnist_500",
    "image",
    {"model_name_or_path": "embedded:resnet-mnist5k"},
    {"dataset_name": "embedded:digits", "max_train_samples": 500},
    {"num_train_epochs": 8, "learning_rate": 1e-3, "per_device_train_batch_size": 32},
)
FINETUNE_TASKS = [
    _MINILM_500, _MINILM_LORA_500, _noisy(_MINILM_500, 0.2), _noisy(_MINILM_LORA_500, 0.2), _DIGITS_FROM_MNIST_500,
    _noisy(_DIGITS_FROM_MNIST_500, 0.2),
]  # fmt: skip
TASKS.update({t.name: t for t in FINETUNE_TASKS})


@dataclass(frozen=True)
class MethodSpec:
    """An optimizer setting: k ascent steps with a rule, descent, direction and ASAM switch, or a
    whole-step method (Lookbehind, MSAM, SAM every n steps with LookSAM's reuse)."""

    name: str
    ascent_steps: int
    ascent_rule: str = "normalized"
    descent: str = "last"
    adaptive: bool = False
    xsam_alpha: float | None = None  # descent "xsam": fixed alpha, or None for the dynamic choice
    method: str = "sam"  # or "lookbehind" (Lookbehind-SAM with alpha LOOKBEHIND_ALPHA), or "msam"
    direction: str = "gradient"  # or "friendly" (F-SAM)
    every_n_steps: int = 1
    reuse_alpha: float = 0.0  # LookSAM's alpha on the steps between SAM steps
    start_fraction: float = 0.0  # SAM late in training: plain steps for this fraction of the run first

    @property
    def family(self) -> str:
        """What a plot line is: the rule, or the variant for mean/ASAM/XSAM and the SAM family."""
        if self.ascent_steps == 0:
            return "adamw"
        if self.method in ("lookbehind", "msam"):
            return self.method
        if self.start_fraction > 0:
            return "late"
        if self.every_n_steps > 1:
            return "looksam" if self.reuse_alpha > 0 else "every-n"
        if self.direction != "gradient":
            return self.direction
        if self.adaptive:
            return "asam"
        if self.descent != "last":
            return self.descent if self.xsam_alpha is None else "xsam-fixed"
        return self.ascent_rule

    @property
    def passes_per_step(self) -> float:
        """Forward+backward passes per optimizer step on average: k + 1 for SAM, 1 + k/n for SAM every n
        steps (LookSAM), 1 + k f for SAM on the last fraction f of the steps, 1 for MSAM and plain training."""
        if self.ascent_steps == 0 or self.method == "msam":
            return 1.0
        return 1.0 + self.ascent_steps / self.every_n_steps * (1.0 - self.start_fraction)


# XSAM's fixed-alpha variant: halfway between descending along the ascent (0) and SAM's descent (1)
XSAM_FIXED_ALPHA = 0.5
# LookSAM's weight of the reused direction (the paper's and pytorch_optimizer's 0.7)
LOOKSAM_ALPHA = 0.7
_METHOD = re.compile(r"^([a-z][a-z0-9_-]*?)-k(\d+)$")  # <a registered variant, asam or xsam-fixed>-k<N>
_EVERY_N = re.compile(r"^(looksam|every)-n(\d+)-k(\d+)$")
_LATE = re.compile(r"^late(\d+)-k(\d+)$")


def parse_method(name: str) -> MethodSpec:
    """adamw (k=0), sam (k=1), msam (Momentum-SAM, one pass), {normalized,projected,accumulated,mean,
    asam,xsam,xsam-fixed,lookbehind,gsam,wsam,friendly}-k<N>, looksam-n<M>-k<N> and every-n<M>-k<N>.

    xsam: normalized ascent, XSAM descent with the dynamic alpha; xsam-fixed: alpha 0.5;
    lookbehind: Lookbehind-SAM with alpha 0.5 (the paper's fixed alpha); gsam, wsam: those descents
    with their defaults; friendly: F-SAM's direction; looksam-nM-kN: SAM with k steps every M
    optimizer steps and LookSAM's reuse (alpha 0.7) in between; every-nM-kN: the same without reuse;
    lateP-kN: plain steps for the first P% of the run, then SAM with k steps (sam_start_step = P/100)."""
    if name == "adamw":
        return MethodSpec(name, 0)
    if name == "sam":
        return MethodSpec(name, 1)
    if name == "msam":
        return MethodSpec(name, 1, method="msam")
    every = _EVERY_N.match(name)
    if every:
        n, k = int(every.group(2)), int(every.group(3))
        if n < 2 or k < 1:
            raise ValueError(f"Method {name!r}: n must be >= 2 and k >= 1.")
        return MethodSpec(name, k, every_n_steps=n, reuse_alpha=LOOKSAM_ALPHA if every.group(1) == "looksam" else 0.0)
    late = _LATE.match(name)
    if late:
        percent, k = int(late.group(1)), int(late.group(2))
        if not 0 < percent < 100 or k < 1:
            raise ValueError(f"Method {name!r}: the percentage must be in 1..99 and k >= 1.")
        return MethodSpec(name, k, start_fraction=percent / 100)
    match = _METHOD.match(name)
    if not match:
        raise ValueError(
            f"Unknown method {name!r}: use adamw, sam, msam, <variant>-k<N> (a registered rule, descent, direction or "
            "method, asam or xsam-fixed), "
            "looksam-n<M>-k<N>, every-n<M>-k<N> or late<P>-k<N>."
        )
    kind, k = match.group(1), int(match.group(2))
    if k < 1:
        raise ValueError(f"Method {name!r}: k must be >= 1.")
    if kind == "asam":
        return MethodSpec(name, k, adaptive=True)
    if kind == "xsam-fixed":
        return MethodSpec(name, k, descent="xsam", xsam_alpha=XSAM_FIXED_ALPHA)
    # any registered variant by its name: a rule, a descent, a direction or a whole-step method (the registry's)
    for field_name in VARIANT_KINDS:
        if field_name == "reuse":  # looksam-n<M>-k<N> (SAM every n steps)
            continue
        if kind in variants.names(field_name) and kind != "sam":
            method = MethodSpec(name, k, **{field_name: kind})
            try:  # what the variant's declaration allows (MSAM: one pass, written "msam")
                SAMConfig(ascent_steps=k, **{field_name: kind})
            except ValueError as error:
                raise ValueError(f"Method {name!r}: {error}") from None
            return method
    raise ValueError(f"Method {name!r}: {kind!r} is no registered rule, descent, direction or method, nor asam.")


# 3 seeds for the verdicts; accumulated-k3 (shown to hurt), normalized-k5, mean-k3 and asam-k1 left to --methods;
# two cheap members of the family ask whether fewer passes can match multi-step SAM (the rest: --preset family)
# the README's main command: within 10 minutes on 2 cores (XSAM with a fixed alpha and Lookbehind are in the
# paper preset)
QUICK_METHODS = [
    "adamw",
    "sam",
    "normalized-k2",
    "normalized-k3",
    "projected-k3",
    "xsam-k3",
    "looksam-n5-k3",
    "msam",
]
# "can a cheaper method match multi-step SAM?": every method of the family, k = 1 and 3
FAMILY_METHODS = [
    "adamw",
    "sam",
    "normalized-k3",
    "gsam-k1",
    "gsam-k3",
    "wsam-k1",
    "wsam-k3",
    "friendly-k1",
    "friendly-k3",
    "looksam-n5-k1",
    "looksam-n5-k3",
    "every-n5-k3",
    "msam",
]
PAPER_METHODS = (
    ["adamw", "sam"]
    + [f"{r}-k{k}" for r in ("normalized", "projected", "accumulated", "mean") for k in (2, 3, 5)]
    + ["asam-k1", "asam-k3", "xsam-k2", "xsam-k3", "xsam-fixed-k3", "lookbehind-k2", "lookbehind-k3"]
)

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "tasks": ["digits", "rotten_tomatoes"],
        "methods": QUICK_METHODS,
        "rhos": [0.05],
        "seeds": [0, 1, 2],
        "budgets": ["epochs", "compute"],
        "workers": 2,
        "measure_examples": 256,
        "landscape_points": 15,
        "surface_points": 11,
    },
    "paper": {
        "tasks": ["cifar10", "cifar100", "sst2"],
        "methods": PAPER_METHODS,
        "rhos": [0.05, 0.1],
        "seeds": [0, 1, 2],
        "budgets": ["epochs", "compute"],
        "workers": 1,
        "measure_examples": 1024,
        "landscape_points": 31,
        "surface_points": 21,
    },
}

# the family: the quick preset's tasks, seeds and measures with every member of the SAM family
PRESETS["family"] = {**PRESETS["quick"], "methods": FAMILY_METHODS}
# noisy labels, where SAM's effect is large: SAM k=1 vs AdamW and multi-step vs k=1 at both budgets; many
# seeds (a run is seconds), lighter measures
PRESETS["noisy"] = {
    **PRESETS["quick"],
    "tasks": ["digits_noise20", "digits_noise40"],
    # late50-k1: SAM k=1 on the second half of the run only (arXiv 2410.10373's SAM late in training)
    "methods": ["adamw", "sam", "normalized-k2", "normalized-k3", "late50-k1"],
    "seeds": list(range(20)),
    "measure_examples": 128,
    "landscape_points": 11,
}
# fine-tuning pretrained models on few examples: AdamW, SAM k=1, normalized k=2 and 3 and SAM late in training,
# at both budgets. Sized for about an hour on the 2-core VM: a MiniLM step takes about a second there (the
# 22.7M-parameter model, two runs side by side), so the text tasks (full fine-tuning clean, LoRA with 20% noise)
# get 3 seeds and the ResNet ones 5, with lighter measures (64 examples, 10 Hessian-vector products, 4 probes).
# MiniLM gets rho 0.01: at the from-scratch studies' 0.05, SAM k=1 kept predicting the majority class through its
# 48 steps (seed 0, full fine-tuning and LoRA alike), while at 0.01 it learns as AdamW does
PRESETS["finetune"] = {
    **PRESETS["quick"],
    "tasks": ["rt_minilm_500", "rt_minilm_lora_500_noise20", "digits_from_mnist_500", "digits_from_mnist_500_noise20"],
    "methods": ["adamw", "sam", "normalized-k2", "normalized-k3", "late50-k1"],
    "seeds": [0, 1, 2],
    "task_seeds": {"digits_from_mnist_500": list(range(5)), "digits_from_mnist_500_noise20": list(range(5))},
    "task_rhos": {"rt_minilm_500": [0.01], "rt_minilm_lora_500_noise20": [0.01]},
    "measure_examples": 64,
    "landscape_points": 11,
    "hessian_iterations": 10,
    "trace_samples": 4,
}


@dataclass
class StudyConfig:
    """What the study runs. ``budgets``: "epochs" (every method the same epochs) and/or "compute"
    (epochs scaled by 2 / (passes per step), so every method makes the forward+backward passes of SAM
    k=1: 2/(k+1) for SAM, 2/(1+k/n) for SAM every n steps, 2 for MSAM and plain training)."""

    preset: str = "quick"
    tasks: list[str] = field(default_factory=lambda: list(PRESETS["quick"]["tasks"]))
    methods: list[str] = field(default_factory=lambda: list(QUICK_METHODS))
    rhos: list[float] = field(default_factory=lambda: [0.05])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: list[str] = field(default_factory=lambda: ["epochs", "compute"])
    workers: int = 2
    measure_examples: int = 256
    landscape_points: int = 21
    surface_points: int = 11
    hessian_iterations: int = 20  # power iterations for lambda_max (stops earlier at a 1% change)
    trace_samples: int = 8  # Hutchinson probes for tr(H)
    task_seeds: dict[str, list[int]] = field(default_factory=dict)  # a task's own seeds (default: ``seeds``)
    task_rhos: dict[str, list[float]] = field(default_factory=dict)  # a task's own radii (default: ``rhos``)
    training_overrides: dict[str, Any] = field(default_factory=dict)
    custom_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> StudyConfig:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        config = cls(preset=preset, **values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> StudyConfig:
        """A YAML or JSON file with any StudyConfig fields (``preset`` picks the starting point)."""
        import yaml

        text = Path(path).read_text()
        values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the study config must be a mapping of fields.")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown study fields {sorted(unknown)}; known: {sorted(known)}.")
        preset = values.pop("preset", "quick")
        return cls.from_preset(preset, **{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def task(self, name: str) -> TaskSpec:
        if name in self.custom_tasks:
            spec = self.custom_tasks[name]
            return TaskSpec(name, spec["kind"], spec.get("model", {}), spec.get("data", {}), spec.get("training", {}))
        if name not in TASKS:
            raise ValueError(f"Unknown task {name!r}; built in: {', '.join(TASKS)} (or define custom_tasks).")
        return TASKS[name]

    def validate(self) -> None:
        for name in self.tasks:
            self.task(name)
        for name in self.methods:
            parse_method(name)
        for budget in self.budgets:
            if budget not in ("epochs", "compute"):
                raise ValueError(f"budget {budget!r}: use epochs and/or compute.")
        if any(not r > 0 for rhos in (self.rhos, *self.task_rhos.values()) for r in rhos):
            raise ValueError(f"rhos={self.rhos}, task_rhos={self.task_rhos}: every rho must be > 0.")
        if self.workers < 1:
            raise ValueError("workers must be >= 1.")
        if not self.seeds or any(not seeds for seeds in self.task_seeds.values()):
            raise ValueError("seeds (and every task's own seeds) must not be empty.")

    def runs(self) -> list[RunSpec]:
        """The grid, without duplicates (k=1 is the same run under both budgets; k=0 ignores rho)."""
        seen: dict[str, RunSpec] = {}
        for task in self.tasks:
            spec = self.task(task)
            base_epochs = float({**spec.training, **self.training_overrides}.get("num_train_epochs", 1))
            for method_name in self.methods:
                method = parse_method(method_name)
                rhos = self.task_rhos.get(task, self.rhos)
                for rho in rhos if method.ascent_steps else [rhos[0]]:
                    for budget in self.budgets:
                        epochs = base_epochs * (2.0 / method.passes_per_step if budget == "compute" else 1.0)
                        for seed in self.task_seeds.get(task, self.seeds):
                            run = RunSpec(task, method_name, rho, seed, budget, round(epochs, 4), base_epochs)
                            seen.setdefault(run.run_id, run)
        return list(seen.values())


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    task: str
    method: str
    rho: float
    seed: int
    budget: str
    epochs: float
    base_epochs: float

    def in_budget(self, budget: str) -> bool:
        """Whether this run is the method's run under ``budget`` (k=1 is in both)."""
        passes = parse_method(self.method).passes_per_step
        want = self.base_epochs * (2.0 / passes if budget == "compute" else 1.0)
        return abs(self.epochs - round(want, 4)) < 1e-9

    @property
    def run_id(self) -> str:
        # the budget only matters through the epochs, so equal runs share one id
        key = json.dumps([self.task, self.method, self.rho, self.seed, self.epochs])
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        return f"{self.task}__{self.method}__rho{self.rho:g}__ep{self.epochs:g}__s{self.seed}__{digest}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "run_id": self.run_id}
