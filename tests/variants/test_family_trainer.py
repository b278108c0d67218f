"""The SAM family inside the Trainer: what each step costs in passes, checkpoints that resume exactly,
and every value or combination a method does not define refused before any weight moves."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from transformers import set_seed

from hf_sam import SAMConfig, SAMTrainingArguments
from hf_sam.trainer.checks import check_launch

from ..helpers import BASE_ARGS, LogRecorder, sam_trainer
from ..tiny import TinyNet, make_data


def forwards(tmp_path, steps, grad_accum=1, **sam) -> tuple[int, list[dict]]:
    set_seed(0)
    model = TinyNet()
    logs = LogRecorder()
    trainer = sam_trainer(
        tmp_path, model, make_data(n=4 * steps * grad_accum), [logs], max_steps=steps,
        gradient_accumulation_steps=grad_accum, optim_args="momentum=0.9", **sam,
    )  # fmt: skip
    trainer.train()
    return model.calls, [entry for entry in logs.logs if "loss" in entry]


def test_every_n_steps_runs_the_passes_it_promises(tmp_path):
    """n = 4, k = 2, 8 steps: two full steps of 3 passes and six one-pass steps = 12 forwards."""
    calls, logs = forwards(tmp_path, 8, sam_every_n_steps=4, sam_ascent_steps=2, sam_reuse_alpha=0.5)
    assert calls == 2 * 3 + 6
    assert [entry["sam/passes"] for entry in logs] == [3, 1, 1, 1, 3, 1, 1, 1]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_msam_runs_one_forward_per_micro_batch(tmp_path, grad_accum):
    calls, logs = forwards(tmp_path, 3, grad_accum=grad_accum, sam_method="msam")
    assert calls == 3 * grad_accum
    assert all(entry["sam/passes"] == grad_accum for entry in logs)
    # no momentum before the first optimizer step: no perturbation; then rho (the mean over the micro-batches)
    assert [entry["sam/perturbation_norm"] for entry in logs] == pytest.approx([0.0, 0.05, 0.05], rel=1e-15, abs=0)


@pytest.mark.parametrize("k", [1, 3])
def test_sam_logs_its_passes(tmp_path, k):
    calls, logs = forwards(tmp_path, 2, grad_accum=2, sam_ascent_steps=k)
    assert calls == 2 * 2 * (k + 1)
    assert all(entry["sam/passes"] == 2 * (k + 1) for entry in logs)


RESUMABLE = {
    "friendly": {"sam_direction": "friendly", "sam_ascent_steps": 2},
    # n = 3: step 2 (the first after the resume) is a one-pass step that reuses the g_v saved at step 0
    "looksam": {"sam_every_n_steps": 3, "sam_reuse_alpha": 0.8, "sam_reuse_granularity": "tensor"},
    "rho-schedule": {"sam_descent": "gsam", "sam_rho_schedule": "lr", "sam_rho_min": 0.01,
                     "lr_scheduler_type": "cosine"},
    "wsam": {"sam_descent": "wsam", "optim": "adamw_torch"},
    "msam": {"sam_method": "msam", "optim": "adamw_torch"},
}  # fmt: skip


@pytest.mark.parametrize("method", list(RESUMABLE))
def test_stateful_methods_resume_exactly(tmp_path, method):
    """Save at step 2, resume to 4: the weights equal 4 steps straight, bit for bit (and differ from a
    resume that forgot the state, for the methods that keep one)."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, optim_args="momentum=0.9", sam_rho=0.3,
                  **RESUMABLE[method])  # fmt: skip
    set_seed(0)
    full = sam_trainer(tmp_path / "a", TinyNet(), make_data(16), **common)
    full.train()
    set_seed(0)
    resumed = sam_trainer(tmp_path / "a", TinyNet(), make_data(16), **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True))
    if method in ("friendly", "looksam"):
        for saved in (tmp_path / "a" / "checkpoint-2").glob("sam_state_rank*.pt"):
            saved.unlink()
        set_seed(0)
        forgetful = sam_trainer(tmp_path / "a", TinyNet(), make_data(16), **common)
        forgetful.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
        assert not all(
            torch.equal(a, b) for a, b in zip(full.model.parameters(), forgetful.model.parameters(), strict=True)
        ), "the saved state should matter"


# (fields, the field the message names, words it must contain)
INVALID = [
    ({"sam_descent": "wsam", "sam_wsam_gamma": 1.0}, "sam_wsam_gamma", "[0, 1)"),
    ({"sam_direction": "friendly", "sam_friendly_lambda": 1.0}, "sam_friendly_lambda", "[0, 1)"),
    ({"sam_direction": "friendly", "sam_friendly_sigma": -0.1}, "sam_friendly_sigma", ">= 0"),
    ({"sam_every_n_steps": 0}, "sam_every_n_steps", ">= 1"),
    ({"sam_every_n_steps": 2, "sam_reuse_alpha": -0.5}, "sam_reuse_alpha", ">= 0"),
    ({"sam_descent": "gsam", "sam_gsam_alpha": -1.0}, "sam_gsam_alpha", ">= 0"),
    ({"sam_direction": "sideways"}, "sam_direction", "gradient, friendly"),
    ({"sam_every_n_steps": 2, "sam_reuse_granularity": "layer"}, "sam_reuse_granularity", "global, tensor"),
    ({"sam_rho_schedule": "cosine"}, "sam_rho_schedule", "constant, lr"),
    ({"sam_rho_schedule": "lr", "sam_rho_min": 0.5}, "sam_rho_min", "<= sam_rho"),
    ({"sam_method": "msam", "sam_ascent_steps": 2}, "sam_ascent_steps", "sam_method='msam'"),
    ({"sam_method": "msam", "sam_every_n_steps": 2}, "sam_every_n_steps", "sam_method='msam'"),
    ({"sam_method": "msam", "sam_descent": "gsam"}, "sam_descent", "sam_method='msam'"),
    ({"sam_method": "lookbehind", "sam_direction": "friendly"}, "sam_direction", "sam_method='lookbehind'"),
    ({"sam_direction": "friendly", "sam_descent": "mean"}, "sam_direction", "sam_descent='last'"),
    ({"sam_every_n_steps": 3, "sam_descent": "xsam"}, "sam_every_n_steps", "sam_descent"),
    ({"sam_gsam_alpha": 0.1}, "sam_gsam_alpha", "used only by sam_descent='gsam'"),
    ({"sam_wsam_decouple": False}, "sam_wsam_decouple", "used only by sam_descent='wsam'"),
    ({"sam_reuse_alpha": 0.5}, "sam_reuse_alpha", "used only by sam_every_n_steps > 1"),
    ({"sam_rho_min": 0.01}, "sam_rho_min", "used only by sam_rho_schedule='lr'"),
    ({"sam_ascent_steps": 0, "sam_descent": "gsam"}, "sam_descent", "sam_ascent_steps >= 1"),
]


@pytest.mark.parametrize("fields,field,words", INVALID, ids=[f"{f}-{w}" for _, f, w in INVALID])
def test_family_values_and_combinations_are_refused(tmp_path, fields, field, words):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        SAMTrainingArguments(output_dir=str(tmp_path), **{**BASE_ARGS, **fields})
    assert words in str(info.value)


def test_msam_refuses_an_optimizer_without_momentum_before_any_weight_moves(tmp_path):
    set_seed(0)
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = sam_trainer(tmp_path, model, make_data(8), max_steps=2, sam_method="msam")  # plain SGD
    with pytest.raises(ValueError, match="SGD has none"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _launch(world_size=1, accumulation=1, fp16=False, **config):
    """A stand-in trainer for the launch checks (what they read: the config and the arguments)."""
    return SimpleNamespace(
        sam_config=SAMConfig(**config),
        args=SimpleNamespace(
            gradient_accumulation_steps=accumulation, n_gpu=1, fsdp=False, world_size=world_size, fp16=fp16
        ),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
    )


@pytest.mark.parametrize(
    "config,flag",
    [
        ({"descent": "gsam"}, "sam_descent='gsam'"),
        ({"descent": "wsam"}, "sam_descent='wsam'"),
        ({"direction": "friendly"}, "sam_direction='friendly'"),
        ({"every_n_steps": 2, "reuse_alpha": 0.5}, "sam_reuse_alpha=0.5"),
    ],
)
def test_methods_that_combine_g_and_g_s_need_one_gradient_for_all_ranks(config, flag):
    with pytest.raises(ValueError, match=re.escape(flag) + ".*--sam_sync_ascent true"):
        check_launch(_launch(world_size=2, **config))
    with pytest.raises(ValueError, match=re.escape(flag) + ".*gradient accumulation"):
        check_launch(_launch(world_size=2, accumulation=2, sync_ascent=True, **config))
    check_launch(_launch(world_size=2, sync_ascent=True, **config))  # exact: allowed
    check_launch(_launch(world_size=1, accumulation=2, **config))  # one process: allowed


def test_methods_without_g_run_per_device_under_ddp():
    check_launch(_launch(world_size=2, every_n_steps=2))  # SAM every n steps, no reuse
    check_launch(_launch(world_size=2, accumulation=2, method="msam"))


def test_a_second_train_call_reads_its_own_learning_rate_bounds(tmp_path):
    """The rho schedule's bounds belong to one run: a second train() call with another learning rate (a
    hyperparameter-search trial) trains as a fresh trainer with that learning rate does."""
    sam = dict(sam_rho_schedule="lr", sam_rho_min=0.01, sam_rho=0.3, sam_ascent_steps=2, lr_scheduler_type="linear")
    set_seed(0)
    model = TinyNet()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = sam_trainer(tmp_path / "a", model, make_data(16), max_steps=4, learning_rate=0.1, **sam)
    trainer.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    trainer.args.learning_rate = 0.05
    trainer.optimizer, trainer.lr_scheduler = None, None
    trainer.train()
    fresh = TinyNet()
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(start[n])
    sam_trainer(tmp_path / "b", fresh, make_data(16), max_steps=4, learning_rate=0.05, **sam).train()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
