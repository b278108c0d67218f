"""Bad input fails before training with a message naming the field; unsupported set-ups are refused."""

import re

import pytest
import torch
from transformers import HfArgumentParser, set_seed

from hf_sam import SAMConfig, SAMTrainingArguments

from ..helpers import BASE_ARGS, sam_trainer
from ..tiny import TinyNet, make_data

# (field, value, words the message must contain)
INVALID = [
    ("sam_ascent_steps", -1, ">= 0"),
    ("sam_ascent_steps", 1.5, "integer"),
    ("sam_rho", 0.0, "> 0"),
    ("sam_rho", -0.1, "> 0"),
    ("sam_rho", float("nan"), "finite"),
    ("sam_ascent_rule", "sgd", "normalized, projected, accumulated"),
    ("sam_descent", "first", "last, mean"),
    ("sam_step_mult", 0.0, "> 0"),
    ("sam_adaptive_eta", -0.01, ">= 0"),
    ("sam_adaptive", "yes", "True or False"),
]
CONFLICTS = [
    ({"sam_step_mult": 2.0}, "sam_step_mult", "projected"),
    ({"sam_ascent_steps": 0, "sam_descent": "mean"}, "sam_descent", "sam_ascent_steps >= 1"),
    ({"sam_ascent_steps": 0, "sam_adaptive": True}, "sam_adaptive", "sam_ascent_steps >= 1"),
    ({"sam_adaptive_eta": 0.1}, "sam_adaptive_eta", "sam_adaptive=True"),
]


@pytest.mark.parametrize("field,value,words", INVALID)
def test_invalid_values_name_the_field(tmp_path, field, value, words):
    with pytest.raises(ValueError) as err:
        SAMTrainingArguments(output_dir=str(tmp_path), **{field: value})
    assert field in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("kwargs,field,words", CONFLICTS)
def test_conflicting_options_are_refused(tmp_path, kwargs, field, words):
    with pytest.raises(ValueError) as err:
        SAMTrainingArguments(output_dir=str(tmp_path), **kwargs)
    assert field in str(err.value) and words in str(err.value)


def test_config_without_prefix_names_plain_field():
    with pytest.raises(ValueError, match="^rho=0"):
        SAMConfig(rho=0.0)
    assert SAMConfig(ascent_steps=0, rho=0.0).ascent_steps == 0  # rho is unused without ascent


def test_every_config_field_is_a_sam_field_with_the_same_default():
    import dataclasses

    from hf_sam.trainer.args import SAMArgumentsMixin

    config = {f.name: f.default for f in dataclasses.fields(SAMConfig)}
    arguments = {f.name.removeprefix("sam_"): f.default for f in dataclasses.fields(SAMArgumentsMixin)}
    assert arguments == config


def test_every_sam_field_is_a_cli_flag(tmp_path):
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--sam_ascent_steps",
            "3",
            "--sam_rho",
            "0.1",
            "--sam_ascent_rule",
            "projected",
            "--sam_step_mult",
            "0.5",
            "--sam_adaptive",
            "--sam_adaptive_eta",
            "0.02",
            "--sam_descent",
            "mean",
            "--sam_sync_ascent",
            "true",
        ]
    )
    assert args.sam_config == SAMConfig(
        ascent_steps=3,
        rho=0.1,
        ascent_rule="projected",
        step_mult=0.5,
        adaptive=True,
        adaptive_eta=0.02,
        descent="mean",
        sync_ascent=True,
    )


@pytest.mark.parametrize(
    "argv",
    [["--sam_rho", "abc"], ["--sam_ascent_steps", "two"], ["--sam_ascent_rule", "sgd"], ["--sam_descent", "best"]],
)
def test_cli_type_errors_exit_before_training(tmp_path, argv, capsys):
    parser = HfArgumentParser(SAMTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])
    assert argv[0].lstrip("-") in capsys.readouterr().err


def test_cli_value_errors_name_the_field(tmp_path):
    parser = HfArgumentParser(SAMTrainingArguments)
    with pytest.raises(ValueError, match="sam_rho"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_rho", "-1"])


def test_low_precision_weights_are_refused(tmp_path):
    set_seed(0)
    model = TinyNet(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        sam_trainer(tmp_path, model, make_data(4, dtype=torch.bfloat16))
    # plain training (k=0) does not perturb, so it is allowed
    sam_trainer(tmp_path, model, make_data(4, dtype=torch.bfloat16), sam_ascent_steps=0)


def test_data_parallel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(SAMTrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="DataParallel"):
        sam_trainer(tmp_path, TinyNet(), make_data(4))


def _deepspeed_trainer(ds_config=None, accumulation=1, bf16=False, fp16=False, user_config=None, **config):
    """The attributes the DeepSpeed checks read, as a trainer under accelerate's DeepSpeed would have them:
    ``ds_config`` as filled by transformers and accelerate, ``user_config`` as the user wrote it."""
    from types import SimpleNamespace

    from hf_sam import SAMConfig

    plugin = SimpleNamespace(
        deepspeed_config={"zero_optimization": {"stage": 2}, **(ds_config or {})},
        hf_ds_config=SimpleNamespace(_dtype=torch.bfloat16 if bf16 else torch.float32),
    )
    return SimpleNamespace(
        is_deepspeed_enabled=True,
        is_fsdp_enabled=False,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        sam_config=SAMConfig(ascent_steps=2, **{"sync_ascent": True, **config}),
        args=SimpleNamespace(
            gradient_accumulation_steps=accumulation,
            n_gpu=1,
            fsdp=False,
            world_size=2,
            bf16=bf16,
            fp16=fp16,
            deepspeed=user_config if user_config is not None else ds_config or {},
        ),
    )


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"sync_ascent": False}, "needs --sam_sync_ascent true"),
        ({"ds_config": {"bf16": {"enabled": True}}}, "bf16 parameter storage"),
        ({"ds_config": {"bf16": {"enabled": True}}, "bf16": True}, '"torch_autocast": {"enabled": true'),
        # --fp16 with fp16 "auto", as accelerate fills it
        (
            {"ds_config": {"fp16": {"enabled": True}}, "fp16": True, "user_config": {"fp16": {"enabled": "auto"}}},
            "fp16 parameter storage",
        ),
        ({"ds_config": {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}}, "offload_param"),
        ({"descent": "xsam"}, "fixed --sam_xsam_alpha"),  # the dynamic alpha: losses at weights ZeRO never gathers
        ({"descent": "wsam"}, "sam_wsam_decouple false"),  # decoupled: moves the module's weights after ZeRO's step
        ({"every_n_steps": 2, "reuse_alpha": 0.5}, "LookSAM"),  # the reuse writes into ZeRO's gradient partitions
        ({"method": "lookbehind", "sync_ascent": True}, "sam_method='lookbehind'"),
    ],
)
def test_deepspeed_set_ups_sam_cannot_make_exact_are_refused(kwargs, words):
    from hf_sam.trainer.checks import check_launch

    if kwargs.get("method") == "lookbehind":  # Lookbehind refuses a synchronized ascent itself
        kwargs = {"method": "lookbehind"}
        words = "sam_method='lookbehind'"
        trainer = _deepspeed_trainer(**kwargs, sync_ascent=False)
        trainer.sam_config.sync_ascent = True  # past its own validation, as a user's config object could be
    else:
        trainer = _deepspeed_trainer(**kwargs)
    with pytest.raises(ValueError, match=re.escape(words)):
        check_launch(trainer)


def test_deepspeed_set_ups_sam_makes_exact_are_accepted():
    from hf_sam.trainer.checks import check_launch

    for config in ({}, {"descent": "mean", "adaptive": True}, {"ascent_rule": "projected"}):
        check_launch(_deepspeed_trainer(**config))
    check_launch(_deepspeed_trainer(ds_config={"bf16": {"enabled": False}}))  # "auto" with --bf16 off: fp32
    check_launch(_deepspeed_trainer(ds_config={"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    check_launch(_deepspeed_trainer(ds_config={"torch_autocast": {"enabled": True, "dtype": "float16"}}))
    check_launch(_deepspeed_trainer(accumulation=3))  # each micro-batch its own synchronized ascent
    # the family members every rank can run on the full all-ranks gradients
    for config in ({"descent": "gsam"}, {"descent": "wsam", "wsam_decouple": False}, {"direction": "friendly"},
                   {"rho_schedule": "lr"}, {"descent": "xsam", "xsam_alpha": 0.5}, {"every_n_steps": 2}):  # fmt: skip
        check_launch(_deepspeed_trainer(**config))


@pytest.mark.parametrize("user", [{"bf16": {"enabled": "auto"}}, {}], ids=["auto", "absent"])
def test_deepspeed_bf16_flag_is_mapped_onto_torch_autocast(user):
    """--bf16 with bf16 "auto" (or no bf16 section, which accelerate adds as enabled) becomes torch_autocast
    with fp32 reduction, and the Trainer stops casting float inputs to bf16."""
    from hf_sam.trainer.checks import check_launch

    trainer = _deepspeed_trainer(ds_config={"bf16": {"enabled": True}}, bf16=True, user_config=user)
    check_launch(trainer)
    plugin = trainer.accelerator.state.deepspeed_plugin
    assert plugin.deepspeed_config["bf16"] == {"enabled": False}
    assert plugin.deepspeed_config["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []
    }  # fmt: skip
    assert plugin.hf_ds_config._dtype == torch.float32


class _FakeFSDPTrainer:
    """The attributes check_launch reads, as a trainer under accelerate's FSDP would have them."""

    is_deepspeed_enabled = False
    is_fsdp_enabled = True

    def __init__(self, version, sync, accumulation):
        from types import SimpleNamespace

        from hf_sam import SAMConfig

        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
        self.sam_config = SAMConfig(ascent_steps=2, sync_ascent=sync)
        self.args = SimpleNamespace(gradient_accumulation_steps=accumulation, n_gpu=1, fsdp=True)


@pytest.mark.parametrize(
    "version,sync,accumulation,message",
    [
        (1, True, 1, "FSDP version 2 only"),
        (2, False, 1, "needs --sam_sync_ascent true"),
        (2, True, 2, None),  # accumulation: every pass reduce-scatters (hf_sam.trainer.launch)
        (2, True, 1, None),
    ],
)
def test_fsdp_set_ups(version, sync, accumulation, message):
    from hf_sam.trainer.checks import check_launch

    trainer = _FakeFSDPTrainer(version, sync, accumulation)
    if message is None:
        check_launch(trainer)
    else:
        with pytest.raises(ValueError, match=message):
            check_launch(trainer)


def test_fsdp_flag_on_cpu_warns_that_it_is_not_active(caplog):
    """Under a CPU multi-process launch the Trainer accepts --fsdp and trains with DDP instead."""
    import logging

    from hf_sam.trainer.checks import check_launch

    trainer = _FakeFSDPTrainer(2, False, 1)
    trainer.is_fsdp_enabled = False
    trainer.args.world_size = 2
    with caplog.at_level(logging.WARNING, logger="hf_sam.trainer.checks"):
        check_launch(trainer)
    assert "FSDP is not active" in caplog.text and "with DDP" in caplog.text


@pytest.mark.parametrize("sync,accumulation", [(False, 1), (True, 2)])
def test_xsam_under_ddp_needs_a_synchronized_ascent_and_no_accumulation(sync, accumulation):
    from types import SimpleNamespace

    from hf_sam import SAMConfig
    from hf_sam.trainer.checks import check_launch

    trainer = _FakeFSDPTrainer(2, sync, accumulation)
    trainer.is_fsdp_enabled = False
    trainer.sam_config = SAMConfig(ascent_steps=2, sync_ascent=sync, descent="xsam")
    trainer.args = SimpleNamespace(gradient_accumulation_steps=accumulation, n_gpu=1, fsdp=False, world_size=2)
    with pytest.raises(ValueError, match="sam_descent='xsam' with several processes"):
        check_launch(trainer)


@pytest.mark.parametrize(
    "kwargs,field,words",
    [
        ({"sam_xsam_alpha": 0.5}, "sam_xsam_alpha", "used only by sam_descent='xsam'"),
        ({"sam_descent": "xsam", "sam_xsam_alpha": -1.0}, "sam_xsam_alpha", ">= 0"),
        ({"sam_descent": "xsam", "sam_xsam_alpha_max": 0.0}, "sam_xsam_alpha_max", "> 0"),
        ({"sam_method": "lookbehind", "sam_adaptive": True}, "sam_adaptive", "own ascent and descent"),
        ({"sam_method": "lookbehind", "sam_lookbehind_alpha": 1.5}, "sam_lookbehind_alpha", "(0, 1]"),
        ({"sam_lookbehind_alpha": 0.3}, "sam_lookbehind_alpha", "used only by sam_method='lookbehind'"),
    ],
)
def test_method_options_are_checked(tmp_path, kwargs, field, words):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        SAMTrainingArguments(output_dir=str(tmp_path), **{**BASE_ARGS, **kwargs})
    assert words in str(info.value)


IN_BACKWARD = ["lomo", "adalomo", "galore_adamw_layerwise", "galore_adafactor_layerwise", "apollo_adamw_layerwise"]


@pytest.mark.parametrize("optim", IN_BACKWARD)
def test_optimizers_that_step_inside_backward_are_refused_by_name(tmp_path, optim):
    """Refused when the arguments are validated, before the optimizer's package (lomo-optim, galore-torch) is
    asked for; with SAM off the same arguments are the stock Trainer's."""
    with pytest.raises(ValueError, match=rf"optim='{optim}' steps the optimizer inside backward") as error:
        SAMTrainingArguments(output_dir=str(tmp_path), optim=optim, sam_ascent_steps=2, use_cpu=True)
    assert "k + 1" in str(error.value) and "sam_ascent_steps=0" in str(error.value)
    assert SAMTrainingArguments(output_dir=str(tmp_path), optim=optim, sam_ascent_steps=0, use_cpu=True).optim == optim
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMTrainer

    plain = TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True)
    with pytest.raises(ValueError, match=rf"optim='{optim}' steps the optimizer inside backward"):
        SAMTrainer(model=TinyNet(), args=plain, sam_config=SAMConfig(ascent_steps=1))
    assert isinstance(Trainer(model=TinyNet(), args=plain), Trainer)


class _StepsInBackward(torch.optim.Optimizer):
    """A user's optimizer-in-backward, in the two shapes they take: one optimizer per parameter stepped by a
    post-accumulate-grad hook (PyTorch's tutorial, transformers' layer-wise GaLore), or the optimizer's own
    method as a tensor hook that updates the parameter as its gradient arrives (LOMO)."""

    def __init__(self, params, shape: str) -> None:
        params = list(params)
        super().__init__(params, {"lr": 0.1})
        if shape == "per-parameter":
            per_param = {p: torch.optim.SGD([p], lr=0.1) for p in params}

            def step_this_one(p):
                per_param[p].step()
                per_param[p].zero_grad()

            for p in params:
                p.register_post_accumulate_grad_hook(step_this_one)
        else:
            for p in params:
                p.register_hook(lambda g, p=p: self.update(p, g))
                p.register_hook(self.fused_update)

    @torch.no_grad()
    def update(self, p, g):
        p.add_(g, alpha=-0.1)

    def fused_update(self, g):
        return g

    def step(self, closure=None):  # the updates happened inside backward
        return None


@pytest.mark.parametrize("shape", ["per-parameter", "fused"])
def test_an_optimizer_stepping_in_a_gradient_hook_is_refused_before_any_weight_moves(tmp_path, shape):
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = _StepsInBackward(model.parameters(), shape)
    trainer = sam_trainer(tmp_path, model, make_data(8, dtype=torch.float32), sam_ascent_steps=2)
    trainer.optimizer = optimizer
    with pytest.raises(ValueError, match="steps the optimizer inside backward") as error:
        trainer.train()
    assert "on the trainable parameter" in str(error.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a weight moved before the refusal"


def test_a_gradient_hook_without_an_optimizer_is_not_refused(tmp_path):
    set_seed(0)
    model = TinyNet(dtype=torch.float32)
    seen = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.norm()))
    trainer = sam_trainer(tmp_path, model, make_data(8, dtype=torch.float32), sam_ascent_steps=2)
    trainer.train()
    assert trainer.state.global_step == 1 and seen
