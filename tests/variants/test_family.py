"""The SAM family through SAMTrainer against the float64 reference of tests/reference_family.py, written
from the formulas alone: GSAM, WSAM (coupled, decoupled), F-SAM, SAM every n steps and LookSAM (global,
per tensor), MSAM and the rho schedule; k in {1, 2, 3}, every ascent rule, ASAM on and off, several
optimizer steps (the state across steps matters), SGD with momentum and AdamW, gradient accumulation.

Driven only through the public API (SAMTrainingArguments, SAMTrainer.train) and a callback that records
the weights before every optimizer step.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import set_seed

from ..helpers import WeightRecorder, sam_trainer
from ..reference_family import simulate
from ..reference_sam import NAMES, flatten
from ..tiny import TinyNet, batch_of, make_data

LR, RHO, STEPS, BATCH, MOMENTUM = 0.1, 0.3, 3, 4, 0.9
OPTIMIZERS = {
    "sgd": ({"optim": "sgd", "optim_args": f"momentum={MOMENTUM}"}, {"name": "sgd", "lr": LR, "momentum": MOMENTUM}),
    "adamw": (
        {"optim": "adamw_torch", "learning_rate": 0.01},
        {"name": "adamw", "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8},
    ),
}
# the trainer's flag -> the reference's key, for every knob a case may set
FLAGS = {
    "sam_ascent_steps": "k", "sam_ascent_rule": "rule", "sam_adaptive": "adaptive", "sam_descent": "descent",
    "sam_gsam_alpha": "gsam_alpha", "sam_wsam_gamma": "wsam_gamma", "sam_wsam_decouple": "wsam_decouple",
    "sam_direction": "direction", "sam_friendly_sigma": "sigma", "sam_friendly_lambda": "lam",
    "sam_every_n_steps": "every_n", "sam_reuse_alpha": "reuse_alpha", "sam_reuse_granularity": "granularity",
    "sam_method": "method",
}  # fmt: skip
METHODS = {
    "gsam": {"sam_descent": "gsam", "sam_gsam_alpha": 0.5},
    "wsam-coupled": {"sam_descent": "wsam", "sam_wsam_gamma": 0.6, "sam_wsam_decouple": False},
    "wsam-decoupled": {"sam_descent": "wsam", "sam_wsam_gamma": 0.6},
    "friendly": {"sam_direction": "friendly", "sam_friendly_sigma": 0.8, "sam_friendly_lambda": 0.5},
    "every-n": {"sam_every_n_steps": 2},
    "looksam-global": {"sam_every_n_steps": 2, "sam_reuse_alpha": 0.7},
    "looksam-tensor": {"sam_every_n_steps": 2, "sam_reuse_alpha": 0.7, "sam_reuse_granularity": "tensor"},
}


def run_and_compare(tmp_path, optimizer: str, grad_accum: int = 1, steps: int = STEPS, schedule=None, **sam):
    """Train ``steps`` optimizer steps with SAMTrainer and compare every step with the reference."""
    set_seed(0)
    model = TinyNet()
    data = make_data(n=BATCH * grad_accum * steps)
    trainer_optim, reference_optim = OPTIMIZERS[optimizer]
    recorder = WeightRecorder()
    extra = {}
    cfg = {"rho": RHO, **{FLAGS[k]: v for k, v in sam.items()}}
    if schedule is not None:  # (rho_min, lr_min, lr_max) under a linear decay to 0 over the run
        extra = {"lr_scheduler_type": "linear", "sam_rho_schedule": "lr", "sam_rho_min": schedule}
        lr = reference_optim["lr"]
        reference_optim = {**reference_optim, "lrs": [lr * (steps - t) / steps for t in range(steps)]}
        cfg["rho_schedule"] = (schedule, 0.0, lr)
    trainer = sam_trainer(
        tmp_path,
        model,
        data,
        [recorder],
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=grad_accum,
        sam_rho=RHO,
        **trainer_optim,
        **extra,
        **sam,
    )
    trainer.train()
    start = recorder.before[0]
    shapes = {n: tuple(start[n].shape) for n in NAMES}
    batches = [
        [batch_of(data[(t * grad_accum + m) * BATCH : (t * grad_accum + m + 1) * BATCH]) for m in range(grad_accum)]
        for t in range(steps)
    ]
    want = simulate(flatten(start), shapes, batches, cfg, reference_optim)
    got = [flatten(w) for w in recorder.before[1:] + [recorder.final]]
    previous = flatten(start)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (b - previous).abs().max() > 1e-4, f"step {t}: the reference should move the weights"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"step {t}")
        previous = b
    return trainer


CASES = [
    (method, k, rule, adaptive)
    for method, k, rule, adaptive in itertools.product(
        METHODS, [1, 2, 3], ["normalized", "projected", "accumulated"], [False, True]
    )
]


@pytest.mark.parametrize("method,k,rule,adaptive", CASES, ids=[f"{m}-k{k}-{r}-asam{int(a)}" for m, k, r, a in CASES])
def test_family_matches_float64_reference(tmp_path, method, k, rule, adaptive):
    # both optimizers over the grid: SGD with momentum and AdamW alternate between neighbouring cases
    optimizer = "sgd" if (k + adaptive + ["normalized", "projected", "accumulated"].index(rule)) % 2 else "adamw"
    steps = 4 if METHODS[method].get("sam_every_n_steps") else STEPS  # two SAM steps and two one-pass steps
    run_and_compare(
        tmp_path, optimizer, steps=steps, sam_ascent_steps=k, sam_ascent_rule=rule, sam_adaptive=adaptive,
        **METHODS[method],
    )  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_msam_matches_float64_reference(tmp_path, optimizer, adaptive):
    run_and_compare(tmp_path, optimizer, steps=4, sam_method="msam", sam_adaptive=adaptive)


@pytest.mark.parametrize("method", ["gsam", "wsam-decoupled", "friendly", "looksam-tensor"])
def test_family_with_gradient_accumulation(tmp_path, method):
    steps = 4 if METHODS[method].get("sam_every_n_steps") else STEPS
    run_and_compare(tmp_path, "sgd", grad_accum=2, steps=steps, sam_ascent_steps=2, **METHODS[method])


def test_msam_with_gradient_accumulation(tmp_path):
    run_and_compare(tmp_path, "adamw", grad_accum=3, steps=3, sam_method="msam")


@pytest.mark.parametrize("method", ["sam", "gsam", "looksam-global", "msam"])
def test_rho_schedule_follows_the_learning_rate(tmp_path, method):
    sam = {"sam": {}, "msam": {"sam_method": "msam"}}.get(method, METHODS.get(method, {}))
    k = {} if method == "msam" else {"sam_ascent_steps": 2}
    run_and_compare(tmp_path, "sgd", steps=4, schedule=0.05, **k, **sam)


def test_the_variants_really_differ():
    """Guard against a reference that cannot tell the methods apart: each moves the weights elsewhere
    than plain SAM and than the others."""
    set_seed(0)
    start = flatten({n: p.detach() for n, p in TinyNet().named_parameters()})
    shapes = {n: tuple(p.shape) for n, p in TinyNet().named_parameters()}
    data = make_data(n=BATCH * 4)
    batches = [[batch_of(data[t * BATCH : (t + 1) * BATCH])] for t in range(4)]
    opt = OPTIMIZERS["sgd"][1]
    ends = {"sam": simulate(start, shapes, batches, {"rho": RHO}, opt)[-1]}
    for name, sam in {**METHODS, "msam": {"sam_method": "msam"}}.items():
        ends[name] = simulate(start, shapes, batches, {"rho": RHO, **{FLAGS[k]: v for k, v in sam.items()}}, opt)[-1]
    names = list(ends)
    for a, b in itertools.combinations(names, 2):
        assert (ends[a] - ends[b]).abs().max() > 1e-5, f"{a} and {b} end at the same weights"


def test_friendly_momentum_that_does_not_fit_is_refused():
    """A resume whose saved F-SAM momentum has other shapes than the parameters (another model, or under ZeRO or
    FSDP2 another number of processes, each holding its own part) stops with the reason, instead of adding a
    momentum of the wrong layout."""
    from hf_sam import MultiStepAscent

    model = TinyNet()
    engine = MultiStepAscent(model.parameters(), direction="friendly")
    engine.load_state_dict({"direction": {"momentum": [torch.zeros(3) for _ in model.parameters()]}})
    x, y = batch_of(make_data(4))
    loss = lambda: torch.nn.functional.cross_entropy(model(x)["logits"], y)  # noqa: E731
    with pytest.raises(ValueError, match="same number of processes"):
        engine.step(loss)
    fitting = MultiStepAscent(model.parameters(), direction="friendly")
    fitting.load_state_dict({"direction": {"momentum": [torch.zeros_like(p) for p in model.parameters()]}})
    fitting.step(loss)  # the same shapes are taken
