"""SAM under DeepSpeed mixed precision, 2 gloo processes on the CPU: DeepSpeed's ``torch_autocast`` (bf16
compute over fp32 parameters) under ZeRO 0-3 (fp16 on ZeRO-2 and ZeRO-3) equals SAMTrainer with ``--bf16``
in one process on the joint batches, within bf16 tolerance, for k in {1, 2}; ``--bf16`` with ``bf16: auto``
is mapped onto it; bf16 parameter storage is refused with a message naming ``torch_autocast``.

Why a tolerance and not bit equality: under autocast each rank's Linear weight gradient leaves a bf16 matmul
(fp32 accumulation, bf16 output), so two half-batch gradients averaged are not the joint batch's gradient
rounded once. The tolerance is checked to be far below what a wrong driver gives (no SAM, or the ascent
gradient leaking into the update).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import set_seed

from ..helpers import WeightRecorder, sam_trainer
from ..reference_sam import NAMES, flatten, sam_gradient
from ..tiny import TinyNet
from .test_deepspeed import LR, RHO, _launch, assert_no_pass_became_a_step

pytest.importorskip("deepspeed")

# the second with diagnostics: sam/perturbation_fidelity over each rank's own partition
AUTOCAST_CONFIGS = [{"sam_ascent_steps": 1}, {"sam_ascent_steps": 2, "sam_adaptive": True, "sam_diagnostics": True}]
# relative L2 distance of the weights after 3 steps. Measured (torch 2.13, CPU): 1.6e-4 to 2.5e-4 from one-process
# --bf16, 2.1e-4 to 2.8e-4 from fp32 (one-process bf16 is 2.2e-4 to 2.8e-4 from fp32); no SAM: 6e-3 to 3e-2
BF16_TOLERANCE = 1e-3
CASES = {
    # DeepSpeed's default: Linear/Conv gradients reduced in bf16
    "zero2-bf16-comm": (2, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
    "zero3-bf16-comm": (3, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
    "zero0-bf16-comm": (0, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
    "zero1-bf16-comm": (1, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
    # --bf16 with bf16 "auto": SAMTrainer maps it onto torch_autocast with fp32 reduction
    "zero2-mapped-bf16": (2, {"bf16": {"enabled": "auto"}, "_bf16_flag": True}),
    # fp16: DeepSpeed's GradScaler inside the ZeRO optimizer scales every gradient SAM reads
    "zero2-fp16": (2, {"torch_autocast": {"enabled": True, "dtype": "float16"}}),
    # ZeRO-3 keeps its own GradScaler and partitioned gradients: the scale SAM reads comes from there
    "zero3-fp16": (3, {"torch_autocast": {"enabled": True, "dtype": "float16"}}),
}


# fp16 overflows, after the configurations above: rank 0's loss times inf at its first forward (the clean pass of
# step 0: an ascent gradient) or at its second (the descent of step 0); k = 1
OVERFLOW_CONFIGS = {"ascent": {"sam_ascent_steps": 1, "_poison": {"1": math.inf}},
                    "descent": {"sam_ascent_steps": 1, "_poison": {"2": math.inf}}}  # fmt: skip


@pytest.fixture(scope="module")
def precision_ranks(tmp_path_factory):
    """Every case of this module in one launch, and the refused bf16 storage."""
    jobs = {
        case: {
            "stage": stage,
            "configs": AUTOCAST_CONFIGS + (list(OVERFLOW_CONFIGS.values()) if case.endswith("fp16") else []),
            "precision": precision,
        }
        for case, (stage, precision) in CASES.items()
    }
    jobs["refused"] = {"stage": 2, "precision": {"bf16": {"enabled": True}, "_bf16_flag": True, "_refusal": True}}
    return _launch(tmp_path_factory.mktemp("precision"), jobs)


@pytest.fixture(scope="module", params=list(CASES), ids=str)
def autocast_ranks(request, precision_ranks):
    return request.param, precision_ranks[request.param]


def _one_process(tmp_path, runs: list[dict], config: dict, bf16: bool) -> torch.Tensor:
    """SAMTrainer in one process on the two ranks' joint batches, step by step."""
    rows = []
    for step in range(len(runs[0]["batches"])):
        for run in runs:
            batch = run["batches"][step]
            rows += [{"x": x, "labels": y} for x, y in zip(batch["x"], batch["labels"], strict=True)]
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    recorder = WeightRecorder()
    trainer = sam_trainer(
        tmp_path, model, rows, callbacks=[recorder], per_device_train_batch_size=6, max_steps=len(rows) // 6,
        learning_rate=LR, sam_rho=RHO, bf16=bf16, **config,
    )  # fmt: skip
    start = flatten({n: w.double() for n, w in model.state_dict().items()})
    assert torch.equal(start, flatten(runs[0]["before"][0])), "the same initial weights as the ranks"
    trainer.train()
    return flatten({n: w.double() for n, w in recorder.final.items()})


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_autocast_sam_equals_one_process_bf16(autocast_ranks, tmp_path):
    case, ranks = autocast_ranks
    for index, config in enumerate(AUTOCAST_CONFIGS):
        runs = [rank["results"][index] for rank in ranks]
        # the forward really ran under autocast, on both ranks
        dtype = "torch.float16" if case.endswith("fp16") else "torch.bfloat16"
        assert all(run["compute_dtypes"] == [dtype] for run in runs), (case, runs[0]["compute_dtypes"])
        for name in NAMES:  # one perturbation from the all-ranks gradient: the ranks agree bit for bit
            assert torch.equal(runs[0]["after"][name], runs[1]["after"][name]), (case, config)
        got = flatten(runs[0]["after"])
        fp32 = _one_process(tmp_path / f"fp32-{index}", runs, config, bf16=False)
        # (accelerate gives no fp16 on a CPU: the fp16 case is held to fp32, which fp16 rounds less than bf16)
        bf16 = fp32 if case.endswith("fp16") else _one_process(tmp_path / f"bf16-{index}", runs, config, bf16=True)
        no_sam = _one_process(tmp_path / f"plain-{index}", runs, {"sam_ascent_steps": 0}, bf16=True)
        assert _distance(got, bf16) < BF16_TOLERANCE, (case, config, _distance(got, bf16))
        # from fp32 it differs by bf16 rounding only, as one-process --bf16 does
        assert _distance(got, fp32) < BF16_TOLERANCE, (case, config, _distance(got, fp32))
        # what a driver without SAM would give lies far outside the tolerance
        assert _distance(no_sam, bf16) > 4 * BF16_TOLERANCE, _distance(no_sam, bf16)


def test_fp16_gradients_carry_deepspeeds_loss_scale_and_the_logs_do_not(autocast_ranks):
    """Under fp16 the ascent gradients SAM reads are scaled by DeepSpeed's GradScaler (2^16 at first); the
    logged sam/grad_norm is the unscaled norm of the float64 reference, not 2^16 times it."""
    case, ranks = autocast_ranks
    if not case.endswith("fp16"):
        pytest.skip("the fp16 case")
    for index, config in enumerate(AUTOCAST_CONFIGS):
        runs = [rank["results"][index] for rank in ranks]
        assert runs[0]["loss_scale"] is not None and runs[0]["loss_scale"] > 1.0
        start = runs[0]["before"][0]
        shapes = {n: tuple(start[n].shape) for n in NAMES}
        x = torch.cat([r["batches"][0]["x"] for r in runs]).double()
        y = torch.cat([r["batches"][0]["labels"] for r in runs])
        k = config.get("sam_ascent_steps", 1)
        _, first_norm, _ = sam_gradient(
            flatten(start), shapes, x, y, k, RHO, adaptive=config.get("sam_adaptive", False), norms=True
        )
        assert runs[0]["norms"][0][0] == pytest.approx(float(first_norm), rel=1e-2)


def test_ascent_passes_are_not_optimizer_steps_under_autocast(autocast_ranks):
    case, ranks = autocast_ranks
    assert_no_pass_became_a_step(ranks, case)


def test_bf16_flag_is_mapped_onto_torch_autocast(autocast_ranks):
    case, ranks = autocast_ranks
    if case != "zero2-mapped-bf16":
        pytest.skip("the mapping case")
    for rank in ranks:
        for run in rank["results"]:
            assert run["ds_precision"]["bf16"] == {"enabled": False}
            assert run["ds_precision"]["torch_autocast"]["enabled"] is True
            assert run["ds_precision"]["torch_autocast"]["lower_precision_safe_modules"] == []


def test_bf16_parameter_storage_is_refused_naming_torch_autocast(precision_ranks):
    message = precision_ranks["refused"][0]["refusal"]
    assert "bf16 parameter storage" in message and '"torch_autocast": {"enabled": true' in message, message


def test_fp16_overflow_in_an_ascent_drops_it_and_in_a_descent_skips_the_step(autocast_ranks):
    """An inf in one rank's ascent gradient makes the all-ranks norm inf on every rank: both drop the
    perturbation and descend at w, so step 0 is the plain gradient step of the joint batch (as under DDP). An
    inf in a descent gradient reaches DeepSpeed's step, which skips it: the weights stay where they were.
    Both ranks agree bit for bit and stay finite; steps 1 and 2 are SAM again."""
    case, ranks = autocast_ranks
    if not case.endswith("fp16"):
        pytest.skip("the fp16 cases")
    clean_scale = ranks[0]["results"][0]["loss_scale"]
    for offset, where in enumerate(OVERFLOW_CONFIGS):
        runs = [rank["results"][len(AUTOCAST_CONFIGS) + offset] for rank in ranks]
        for name in NAMES:
            assert torch.equal(runs[0]["after"][name], runs[1]["after"][name]), (case, where)
        assert all(torch.isfinite(w).all() for w in runs[0]["after"].values()), (case, where)
        start, after_first = runs[0]["before"][0], runs[0]["before"][1]
        shapes = {n: tuple(start[n].shape) for n in NAMES}
        x = torch.cat([r["batches"][0]["x"] for r in runs]).double()
        y = torch.cat([r["batches"][0]["labels"] for r in runs])
        plain = flatten(start) - LR * sam_gradient(flatten(start), shapes, x, y, 0, RHO)
        sam = flatten(start) - LR * sam_gradient(flatten(start), shapes, x, y, 1, RHO)
        got = flatten(after_first)
        if where == "ascent":
            assert _distance(got, plain) < BF16_TOLERANCE / 10, (case, _distance(got, plain))
            assert _distance(got, sam) > BF16_TOLERANCE, (case, _distance(got, sam))  # not a SAM step
            assert runs[0]["skipped_steps"] == 0 and runs[0]["loss_scale"] == clean_scale  # no step was skipped
        else:
            assert torch.equal(got, flatten(start)), case  # the step was skipped
            # DeepSpeed counted it; its loss scaler lowers the scale only after `hysteresis` (2) overflows in a row
            assert runs[0]["skipped_steps"] == 1 and runs[0]["loss_scale"] <= clean_scale, case
            assert (flatten(runs[0]["after"]) - got).abs().max() > 1e-4  # steps 1 and 2 moved the weights again


def test_perturbation_fidelity_is_logged_over_each_ranks_partition(autocast_ranks):
    """With diagnostics under autocast, sam/perturbation_fidelity (what the lowered kernels see of the
    perturbation, a cosine) is logged at every logging step under every ZeRO stage, measured over the rank's own
    partition: a finite cosine in (0, 1], below 1 in bf16 (the lowered kernels cannot see all of it)."""
    case, ranks = autocast_ranks
    run = ranks[0]["results"][1]
    assert len(run["fidelity"]) == len(run["before"]), case
    assert all(0.0 < value <= 1.0 + 1e-9 for value in run["fidelity"]), (case, run["fidelity"])
    if "bf16" in case:
        assert min(run["fidelity"]) < 0.9999, (case, run["fidelity"])
    assert ranks[0]["results"][0]["fidelity"] == []  # not without diagnostics
