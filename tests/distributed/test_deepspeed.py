"""SAMTrainer under DeepSpeed ZeRO 0-3, 2 gloo processes on the CPU: several optimizer steps equal a
float64 synchronized-SAM reference computed from both ranks' batches (k in {1, 2}, normalized and
projected, ASAM on and off, descent last and mean); the logged norms are the reference's; the ranks
agree bit for bit; an ascent pass never becomes an optimizer step (DeepSpeed's step count equals the
Trainer's) and no ascent gradient reaches the update; resume from a checkpoint is exact.

The model is float32 (DeepSpeed's ZeRO optimizers keep fp32 masters), so the agreement with float64 is
float32 rounding: 2e-6 on weights of size ~0.5 after one step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..helpers import free_port
from ..reference_sam import NAMES, flatten, sam_gradient

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
LR, RHO = 0.1, 0.3
# every k, rule, ASAM switch and descent appears in the four
CONFIGS = [
    {"sam_ascent_steps": 1},
    {"sam_ascent_steps": 2, "sam_ascent_rule": "projected", "sam_adaptive": True},
    {"sam_ascent_steps": 2, "sam_descent": "mean", "sam_adaptive": True},
    {"sam_ascent_steps": 1, "sam_ascent_rule": "projected", "sam_descent": "mean"},
    # accumulation: each micro-batch its own perturbation from its all-ranks gradient, the descents summed
    {"sam_ascent_steps": 1, "gradient_accumulation_steps": 2},
    {"sam_ascent_steps": 2, "sam_ascent_rule": "projected", "sam_adaptive": True, "gradient_accumulation_steps": 3},
    {"sam_ascent_steps": 2, "sam_descent": "mean", "gradient_accumulation_steps": 2},
]


def _launch(out: Path, jobs: dict[str, dict], ranks: int = 2) -> dict[str, list[dict]]:
    """Run ``jobs`` one after the other in one launch of ``ranks`` processes (their start-up, DeepSpeed's import
    included, is paid once for all); returns each job's results, one per rank.

    A job: ``stage``, ``configs`` (the SAM configurations), ``precision`` (DeepSpeed config sections for its runs;
    keys with "_" are the worker's switches) and ``flags`` ("resume", "memory", "sft")."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_port", str(free_port()),
        str(ROOT / "tests" / "distributed" / "deepspeed_worker.py"), str(out), json.dumps(jobs),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(out / name / f"rank{r}.pt") for r in range(ranks)] for name in jobs}


# the SAM family members that run under ZeRO (ZeRO-2 and ZeRO-3 launches), in the trainer's flags and the
# float64 family reference's keys
FAMILY_CONFIGS = [
    ({"sam_descent": "gsam", "sam_gsam_alpha": 0.5, "sam_ascent_steps": 2, "sam_adaptive": True},
     {"descent": "gsam", "gsam_alpha": 0.5, "k": 2, "adaptive": True}),
    ({"sam_descent": "wsam", "sam_wsam_gamma": 0.6, "sam_wsam_decouple": False},
     {"descent": "wsam", "wsam_gamma": 0.6, "wsam_decouple": False}),
    ({"sam_direction": "friendly", "sam_friendly_sigma": 0.8, "sam_friendly_lambda": 0.5, "sam_ascent_steps": 2},
     {"direction": "friendly", "sigma": 0.8, "lam": 0.5, "k": 2}),
    ({"sam_rho_schedule": "lr", "sam_rho_min": 0.05, "lr_scheduler_type": "linear", "gradient_accumulation_steps": 2},
     {"rho_schedule": "linear"}),
    # SAM at steps 0 and 2, the stock step at 1 (its micro-batches accumulated by DeepSpeed itself)
    ({"sam_every_n_steps": 2, "sam_ascent_steps": 2, "gradient_accumulation_steps": 2}, {"every_n": 2, "k": 2}),
]  # fmt: skip

# XSAM with a fixed alpha (the dynamic choice is refused under DeepSpeed), against reference_sam.xsam_gradient
XSAM_CONFIG = {"sam_descent": "xsam", "sam_xsam_alpha": 0.5, "sam_ascent_steps": 2}

# the key cases again on 4 ranks (2 cores: slower, so fewer): ZeRO-2 and ZeRO-3 with accumulation
FOUR_RANK_CONFIGS = [CONFIGS[5], CONFIGS[6]]


# ZeRO-3 with DeepSpeed's default persistence threshold (small parameters kept whole on every rank)
PERSISTENT_CONFIGS = [CONFIGS[1], CONFIGS[5]]


# the jobs of the tests that are not parametrized by zero_ranks
JOB_OF_TEST = {
    "test_zero3_with_persistent_parameters_matches_the_reference": "zero3-persistent",
    "test_trl_sft_under_zero3_with_accumulation_equals_one_process": "sft",
}


def _asked_jobs(session: pytest.Session) -> set[str]:
    """The jobs the selected tests of this module use: a run of some of them launches only theirs."""
    asked = set()
    for item in session.items:
        if Path(item.path) != Path(__file__):
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "zero_ranks" in callspec.params:
            asked.add(f"zero{callspec.params['zero_ranks']}")
        elif item.originalname in JOB_OF_TEST:
            asked.add(JOB_OF_TEST[item.originalname])
    return asked


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    """The 2-rank jobs of the selected tests, in one launch: each stage's configurations (ZeRO-2 and ZeRO-3 also
    the family, XSAM, the resumes and the allocation tracking), ZeRO-3 with persistent parameters, TRL's SFT."""
    jobs = {
        f"zero{stage}": {
            "stage": stage,
            "configs": CONFIGS + ([sam for sam, _ in FAMILY_CONFIGS] + [XSAM_CONFIG] if stage in (2, 3) else []),
            "flags": ["resume", "memory"] if stage in (2, 3) else [],
        }
        for stage in range(4)
    }
    jobs["zero3-persistent"] = {"stage": 3, "configs": PERSISTENT_CONFIGS, "precision": {"_persistent": True}}
    jobs["sft"] = {"stage": 3, "flags": ["sft"]}
    asked = _asked_jobs(request.session)
    if importlib.util.find_spec("trl") is None:  # (its test skips)
        asked.discard("sft")
    return _launch(tmp_path_factory.mktemp("zero-2ranks"), {n: job for n, job in jobs.items() if n in asked})


@pytest.fixture(scope="module")
def four_ranks(request, tmp_path_factory):
    asked = _asked_jobs(request.session)
    jobs = {f"zero{stage}x4": {"stage": stage, "configs": FOUR_RANK_CONFIGS} for stage in (2, 3)}
    return _launch(tmp_path_factory.mktemp("zero-4ranks"), {n: job for n, job in jobs.items() if n in asked}, 4)


@pytest.fixture(scope="module", params=[0, 1, 2, 3, "2x4", "3x4"], ids=lambda s: f"zero{s}")
def zero_ranks(request):
    if isinstance(request.param, str):  # 4 ranks
        return int(request.param[0]), request.getfixturevalue("four_ranks")[f"zero{request.param}"]
    return request.param, request.getfixturevalue("two_ranks")[f"zero{request.param}"]


def _reference(config: dict):
    return dict(
        k=config.get("sam_ascent_steps", 1),
        rule=config.get("sam_ascent_rule", "normalized"),
        adaptive=config.get("sam_adaptive", False),
        descent=config.get("sam_descent", "last"),
    )


def test_updates_match_the_synchronized_float64_reference(zero_ranks):
    stage, ranks = zero_ranks
    assert_updates_match(stage, ranks, CONFIGS if len(ranks) == 2 else FOUR_RANK_CONFIGS)


def test_zero3_with_persistent_parameters_matches_the_reference(two_ranks):
    """DeepSpeed's default stage3_param_persistence_threshold keeps small parameters whole on every rank (all
    of TinyNet's): after each move SAM re-gathers them from the partitions, as ZeRO-3's step does."""
    ranks = two_ranks["zero3-persistent"]
    assert all(run["persistent"] == len(NAMES) for rank in ranks for run in rank["results"])
    assert_updates_match(3, ranks, PERSISTENT_CONFIGS)
    assert_no_pass_became_a_step(ranks, "zero3 persistent")


def assert_updates_match(stage: int, ranks: list[dict], configs: list[dict]) -> None:
    """Every run's steps equal the float64 synchronized-SAM reference on the joint micro-batches."""
    for index, config in enumerate(configs):  # (the family configurations after these: their own test)
        runs = [rank["results"][index] for rank in ranks]
        # ranks that trained on different parts of every step's batch
        assert not torch.equal(runs[0]["batches"][0]["x"], runs[1]["batches"][0]["x"])
        for name in NAMES:  # one perturbation from the all-ranks gradient: the ranks agree bit for bit
            assert all(torch.equal(runs[0]["after"][name], run["after"][name]) for run in runs), (stage, config)
        before = runs[0]["before"]
        shapes = {n: tuple(before[0][n].shape) for n in NAMES}
        afters = before[1:] + [runs[0]["after"]]
        micro = config.get("gradient_accumulation_steps", 1)
        assert len(runs[0]["batches"]) == micro * len(before)
        for step, (start, end) in enumerate(zip(before, afters, strict=True)):
            # each micro-batch of the step: SAM from both ranks' rows, at the step's weights; their mean
            g, clean, norms = 0, 0, []
            for m in range(micro):
                x = torch.cat([r["batches"][step * micro + m]["x"] for r in runs]).double()
                y = torch.cat([r["batches"][step * micro + m]["labels"] for r in runs])
                g_m, first_norm, d_norm = sam_gradient(
                    flatten(start), shapes, x, y, norms=True, rho=RHO, **_reference(config)
                )
                g = g + g_m / micro
                clean = clean + sam_gradient(flatten(start), shapes, x, y, 0, RHO) / micro
                norms.append((float(first_norm), float(d_norm)))
            want = flatten(start) - LR * g
            torch.testing.assert_close(flatten(end), want, rtol=0, atol=2e-6, msg=f"zero{stage} {config} step {step}")
            # what a wrong driver would give is far outside the tolerance: the clean gradient alone (no SAM), or
            # an ascent gradient left in the engine's buffers and added to the descent gradient
            assert (flatten(start) - LR * clean - want).abs().max() > 1e-4
            assert (flatten(start) - LR * (g + clean) - want).abs().max() > 5e-3
            # logged: the micro-batches' norms averaged (the loss divided by the accumulation steps cancels)
            logged_grad, logged_d = runs[0]["norms"][step]
            assert logged_grad == pytest.approx(sum(n[0] for n in norms) / micro / micro, rel=1e-5)
            assert logged_d == pytest.approx(sum(n[1] for n in norms) / micro, rel=1e-5)


def assert_no_pass_became_a_step(ranks: list[dict], label: object) -> None:
    """DeepSpeed's own step count equals the Trainer's on every rank and run: no SAM pass stepped."""
    for rank in ranks:
        for run in rank["results"]:
            assert run["engine_steps"] == run["trainer_steps"] == len(run["before"]), label


def test_ascent_passes_are_not_optimizer_steps(zero_ranks):
    stage, ranks = zero_ranks
    assert_no_pass_became_a_step(ranks, stage)


def _largest_difference(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in NAMES)


def test_resume_under_deepspeed_is_exact(zero_ranks):
    stage, ranks = zero_ranks
    if stage not in (2, 3) or len(ranks) != 2:
        pytest.skip("resume is checked on ZeRO-2 and ZeRO-3, 2 ranks")
    for rank in ranks:
        assert set(rank["resume"]) == {"sam", "friendly"}
        runs = rank["resume"]["sam"]
        for name in NAMES:
            assert torch.equal(runs["straight"][name], runs["resumed"][name]), (stage, name)
        # F-SAM (k=1): its momentum comes back from the checkpoint bit for bit, and so do the weights; without the
        # saved momentum they land far away
        runs = rank["resume"]["friendly"]
        for name in NAMES:
            assert torch.equal(runs["straight"][name], runs["resumed"][name]), (stage, "friendly", name)
        forgetful = _largest_difference(runs["straight"], runs["forgetful"])
        assert forgetful > 1e-4, (stage, forgetful)


def test_sam_allocates_no_full_size_copy_under_zero(zero_ranks):
    """Under ZeRO-2 and ZeRO-3 (k=2, ASAM, descent mean, accumulation 2) no operator in SAM's passes creates
    a tensor bigger than the rank's partition of the largest parameter: no full snapshot, no full gradient,
    no gathered parameters (DeepSpeed's own backward and step not counted). The full-size copies SAM made
    before partition-wise SAM (safe_get_full_grad, GatheredParameters) would fail this."""
    stage, ranks = zero_ranks
    if stage not in (2, 3) or len(ranks) != 2:
        pytest.skip("checked on ZeRO-2 and ZeRO-3, 2 ranks")
    for rank in ranks:
        memory = rank["memory"]
        assert memory["engine_steps"] == 3  # the run took its steps
        # a full-size copy of the largest parameter would not fit under the bound
        assert memory["largest_slot"] < memory["largest_param"], memory
        assert memory["largest_allocation"] <= memory["largest_slot"], (stage, memory)
        # the tracker is not blind: SAM's snapshot of its largest part is among what it saw
        assert memory["largest_allocation"] >= memory["largest_part"], (stage, memory)


def test_family_under_zero_matches_the_float64_family_reference(zero_ranks):
    """GSAM with ASAM, coupled WSAM, F-SAM and the rho schedule (with accumulation) under ZeRO-2 and ZeRO-3
    equal one process of the family's float64 reference on the joint micro-batches."""
    from ..reference_family import simulate

    stage, ranks = zero_ranks
    if stage not in (2, 3) or len(ranks) != 2:
        pytest.skip("the family runs under ZeRO-2 and ZeRO-3 on 2 ranks")
    for offset, (sam, cfg) in enumerate(FAMILY_CONFIGS):
        runs = [rank["results"][len(CONFIGS) + offset] for rank in ranks]
        for name in NAMES:
            assert torch.equal(runs[0]["after"][name], runs[1]["after"][name]), (stage, sam)
        micro = sam.get("gradient_accumulation_steps", 1)
        steps = len(runs[0]["before"])
        batches = [
            [
                (
                    torch.cat([r["batches"][t * micro + m]["x"] for r in runs]).double(),
                    torch.cat([r["batches"][t * micro + m]["labels"] for r in runs]),
                )
                for m in range(micro)
            ]
            for t in range(steps)
        ]
        start = runs[0]["before"][0]
        shapes = {n: tuple(start[n].shape) for n in NAMES}
        opt = {"name": "sgd", "lr": LR}
        reference = {"rho": RHO, **cfg}
        if cfg.get("rho_schedule") == "linear":  # the Trainer's linear decay to 0 over the run
            opt["lrs"] = [LR * (steps - t) / steps for t in range(steps)]
            reference["rho_schedule"] = (sam["sam_rho_min"], 0.0, LR)
        want = simulate(flatten(start), shapes, batches, reference, opt)
        got = [flatten(w) for w in runs[0]["before"][1:]] + [flatten(runs[0]["after"])]
        for t, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=f"zero{stage} {sam} step {t}")
        assert (want[-1] - flatten(start)).abs().max() > 1e-3


def test_xsam_with_a_fixed_alpha_under_zero_matches_the_float64_reference(zero_ranks):
    """XSAM (alpha 0.5, k=2) under ZeRO-2 and ZeRO-3: every step equals ||g_k|| u(alpha) from the paper's
    formula on both ranks' rows, and differs from SAM's own descent by far more than the tolerance."""
    from ..reference_sam import xsam_gradient

    stage, ranks = zero_ranks
    if stage not in (2, 3) or len(ranks) != 2:
        pytest.skip("XSAM is checked on ZeRO-2 and ZeRO-3, 2 ranks")
    runs = [rank["results"][len(CONFIGS) + len(FAMILY_CONFIGS)] for rank in ranks]
    for name in NAMES:
        assert torch.equal(runs[0]["after"][name], runs[1]["after"][name]), stage
    before = runs[0]["before"]
    shapes = {n: tuple(before[0][n].shape) for n in NAMES}
    for step, (start, end) in enumerate(zip(before, before[1:] + [runs[0]["after"]], strict=True)):
        x = torch.cat([r["batches"][step]["x"] for r in runs]).double()
        y = torch.cat([r["batches"][step]["labels"] for r in runs])
        g, _ = xsam_gradient(flatten(start), shapes, x, y, 2, RHO, XSAM_CONFIG["sam_xsam_alpha"])
        want = flatten(start) - LR * g
        torch.testing.assert_close(flatten(end), want, rtol=0, atol=2e-6, msg=f"zero{stage} xsam step {step}")
        sam = flatten(start) - LR * sam_gradient(flatten(start), shapes, x, y, 2, RHO)
        assert (sam - want).abs().max() > 1e-4


def _relative(a: dict, b: dict) -> float:
    """Relative L2 distance between two sets of named weights."""
    x, y = (torch.cat([w[n].double().reshape(-1) for n in sorted(a)]) for w in (a, b))
    return float((x - y).norm() / y.norm())


def test_trl_sft_under_zero3_with_accumulation_equals_one_process(two_ranks, tmp_path):
    """TRL's SFTTrainer with SAM (k = 2) under ZeRO-3 with accumulation 2 on 2 ranks, the fine-tuning set-up of a
    large model in miniature (a tiny GPT-2 with tied embeddings, the bundled instructions), equals SAMSFTTrainer
    in one process on the joint micro-batches (whose update test_trl checks against float64): fp32 to float32
    rounding, TRL's default bf16 (mapped onto torch_autocast) to bf16 rounding. SFT without SAM lies far outside."""
    pytest.importorskip("trl")
    from hf_sam import SAMSFTConfig, SAMSFTTrainer
    from hf_sam.tasks.instructions import word_tokenizer

    from ..tiny_lm import gpt2
    from .sft_setup import SFT_ARGS, sft_data

    ranks = two_ranks["sft"]

    def one_process(precision: str, **sam) -> dict:
        args = SAMSFTConfig(
            output_dir=str(tmp_path / f"one-{precision}-{len(sam)}"), bf16=precision == "bf16",
            per_device_train_batch_size=SFT_ARGS["micro_batch"], **{**SFT_ARGS["common"], **sam},
        )  # fmt: skip
        model = gpt2(dtype=torch.float32)
        SAMSFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=word_tokenizer()).train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    # bf16: measured 6.2e-4 on torch 2.13 and 1.1e-3 on torch 2.6 (the floor), SFT without SAM 5.7e-2
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 3e-3)):
        runs = [rank[precision] for rank in ranks]
        assert all(run["engine_steps"] == run["trainer_steps"] == 3 for run in runs), precision
        assert not torch.equal(runs[0]["seen"][0], runs[1]["seen"][0])  # the ranks trained on different rows
        for name in runs[0]["after"]:
            assert torch.equal(runs[0]["after"][name], runs[1]["after"][name]), (precision, name)
        want = one_process(precision)
        assert set(runs[0]["after"]) == set(want)
        distance = _relative(runs[0]["after"], want)
        assert distance < tolerance, (precision, distance)
        no_sam = one_process(precision, sam_ascent_steps=0)
        assert _relative(no_sam, want) > 15 * tolerance, (precision, _relative(no_sam, want))
