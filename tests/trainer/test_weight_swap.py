"""The buffer swap inside SAMTrainer: the perturbed passes run on the spare buffers and the parameters
point at w's own storage again after every step, after an error in any pass and after an fp16 ascent
overflow; torch.compile does not recompile per step; the launch picks the copy way where a swap is
unsafe; and training is bit-for-bit the same either way (the copy way is the reference-checked path)."""

from __future__ import annotations

import types

import pytest
import torch
import torch._dynamo.utils
from transformers import TrainerCallback, set_seed

from hf_sam.trainer.checks import perturbed_weights_mode

from ..helpers import WeightRecorder, sam_trainer
from ..tiny import TinyNet, make_data
from .test_compile import CompileNet


def _storages(model) -> list[int]:
    return [p.untyped_storage().data_ptr() for p in model.parameters()]


def _inputs(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}


class PassStorages:
    """Records, at every forward pass, the storages the model's parameters point at."""

    def __init__(self, model) -> None:
        self.seen: list[list[int]] = []
        model.register_forward_pre_hook(lambda module, args: self.seen.append(_storages(module)))


@pytest.mark.parametrize("k", [1, 3])
def test_the_perturbed_passes_run_on_the_spare_buffers(tmp_path, k):
    set_seed(0)
    model = TinyNet(batchnorm=True)
    rows = make_data(4)
    homes = _storages(model)
    before = [p.detach().clone() for p in model.parameters()]
    passes = PassStorages(model)
    trainer = sam_trainer(tmp_path, model, rows, sam_ascent_steps=k, sam_rho=0.3)
    trainer.training_step(model, _inputs(rows))
    assert trainer.sam_run.engine.perturbed_weights == "swap"
    clean, *perturbed = passes.seen
    assert clean == homes and len(perturbed) == k
    assert all(not set(s) & set(homes) for s in perturbed)
    assert _storages(model) == homes
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_error_in_any_pass_points_the_parameters_back(tmp_path, where):
    k = 2
    for failing_call in range(1, k + 2):
        set_seed(0)
        model = TinyNet()
        rows = make_data(4)
        homes = _storages(model)
        before = [p.detach().clone() for p in model.parameters()]
        trainer = sam_trainer(tmp_path, model, rows, sam_ascent_steps=k, sam_rho=0.3)
        model.fail_on = {failing_call: where}
        with pytest.raises(RuntimeError, match="injected"):
            trainer.training_step(model, _inputs(rows))
        assert _storages(model) == homes, f"call {failing_call}"
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_an_fp16_ascent_overflow_points_the_parameters_back(tmp_path):
    set_seed(0)
    model = TinyNet()
    rows = make_data(4)
    homes = _storages(model)
    model.poison = {2: float("inf")}  # the second of three ascent passes overflows
    passes = PassStorages(model)
    trainer = sam_trainer(tmp_path, model, rows, fp16=True, sam_ascent_steps=3, sam_rho=0.3)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.accelerator.native_amp = True
    before = [p.detach().clone() for p in model.parameters()]
    trainer.training_step(model, _inputs(rows))
    assert trainer.sam_run.engine.skipped
    assert all(not set(s) & set(homes) for s in passes.seen[1:]), "the passes after the drop ran on the buffers"
    assert _storages(model) == homes
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


class GraphCount(TrainerCallback):
    """dynamo's count of compiled graphs at the end of every optimizer step."""

    def __init__(self) -> None:
        self.graphs: list[int] = []
        self.trainer = None
        self.ways: set[str] = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        self.ways.add(self.trainer.sam_run.engine.perturbed_weights)


def test_compile_does_not_recompile_per_step_with_the_swap(tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    set_seed(0)
    model = CompileNet()
    count = GraphCount()
    trainer = sam_trainer(
        tmp_path,
        model,
        make_data(24, dtype=torch.float32),
        [count],
        max_steps=6,
        sam_ascent_steps=2,
        sam_rho=0.3,
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    count.trainer = trainer
    trainer.train()
    assert count.ways == {"swap"}
    assert count.graphs[0] >= 1, "the model ran compiled"
    # every pass of every step alternates between w's storage and the buffers: no new graph after step 1
    assert count.graphs == [count.graphs[0]] * 6, count.graphs


def _launch(mode="auto", deepspeed=False, compile_mode=None):
    return types.SimpleNamespace(
        sam_config=types.SimpleNamespace(perturbed_weights=mode),
        is_deepspeed_enabled=deepspeed,
        args=types.SimpleNamespace(torch_compile=compile_mode is not None, torch_compile_mode=compile_mode),
    )


def test_the_launch_copies_where_the_storage_must_stay():
    assert perturbed_weights_mode(_launch()) == "auto"  # the engine decides from the parameters
    assert perturbed_weights_mode(_launch(compile_mode="default")) == "auto"
    assert perturbed_weights_mode(_launch(deepspeed=True)) == "copy"
    assert perturbed_weights_mode(_launch(compile_mode="reduce-overhead")) == "copy"
    assert perturbed_weights_mode(_launch("copy")) == "copy"
    with pytest.raises(ValueError, match="DeepSpeed"):
        perturbed_weights_mode(_launch("swap", deepspeed=True))
    with pytest.raises(ValueError, match="CUDA graphs"):
        perturbed_weights_mode(_launch("swap", compile_mode="max-autotune"))


def test_a_bad_value_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="sam_perturbed_weights='inplace' is invalid"):
        sam_trainer(tmp_path, TinyNet(), make_data(4), sam_perturbed_weights="inplace")


CONFIGS = [
    {"sam_ascent_steps": 2, "sam_ascent_rule": "projected", "sam_step_mult": 0.8, "sam_adaptive": True},
    {"sam_ascent_steps": 2, "gradient_accumulation_steps": 2, "sam_descent": "mean"},
    {"sam_ascent_steps": 1, "sam_descent": "wsam"},
    {"sam_ascent_steps": 2, "sam_every_n_steps": 2, "sam_reuse_alpha": 0.5},
    {"sam_ascent_steps": 1, "sam_method": "msam", "optim": "adamw_torch"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k[4:]}={v}" for k, v in c.items()))
def test_swap_and_copy_train_the_same_bit_for_bit(tmp_path, config):
    finals = {}
    for way in ("swap", "copy"):
        set_seed(0)
        model = TinyNet(batchnorm=True)
        rec = WeightRecorder()
        trainer = sam_trainer(
            tmp_path / way, model, make_data(16), [rec], max_steps=4, sam_rho=0.3, sam_perturbed_weights=way, **config
        )
        trainer.train()
        finals[way] = (rec.final, {n: b.clone() for n, b in model.named_buffers()})
    (w_swap, b_swap), (w_copy, b_copy) = finals["swap"], finals["copy"]
    assert all(torch.equal(w_swap[n], w_copy[n]) for n in w_copy)
    assert all(torch.equal(b_swap[n], b_copy[n]) for n in b_copy)  # BatchNorm: from the clean pass either way
