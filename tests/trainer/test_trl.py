"""TRL's SFTTrainer and DPOTrainer with SAM: TRL's side effects once per micro-batch, the SAM update
against a float64 reference, the reference model once per micro-batch, TRL's config defaults kept."""

from dataclasses import fields

import pytest
import torch
from transformers import HfArgumentParser

trl = pytest.importorskip("trl")

from hf_sam import SAMArgumentsMixin, SAMDPOConfig, SAMDPOTrainer, SAMSFTConfig, SAMSFTTrainer, SAMTrainer  # noqa: E402
from hf_sam.tasks.instructions import arithmetic_dataset, word_tokenizer  # noqa: E402

from ..helpers import LogRecorder  # noqa: E402
from ..reference_func import loss_of, sam_gradient, token_ce_sum, trainable  # noqa: E402
from ..tiny_lm import gpt2  # noqa: E402

TRL_ARGS = dict(
    per_device_train_batch_size=4,
    report_to=[],
    use_cpu=True,
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
    dataloader_num_workers=0,
)


def _sft(tmp_path, k, steps, lr, callbacks=(), trainer_cls=SAMSFTTrainer, **extra):
    args = SAMSFTConfig(
        output_dir=str(tmp_path), max_steps=steps, learning_rate=lr, sam_ascent_steps=k, sam_rho=0.3,
        **{**TRL_ARGS, **extra},
    )  # fmt: skip
    data = arithmetic_dataset()["train"].select(range(4 * steps))
    return trainer_cls(
        model=gpt2(dtype=torch.float32), args=args, train_dataset=data, processing_class=word_tokenizer(),
        callbacks=list(callbacks),
    )  # fmt: skip


TRL_SFT_METRICS = ("loss", "entropy", "mean_token_accuracy", "num_tokens")


def test_sft_metrics_and_token_counts_come_once_per_micro_batch(tmp_path):
    """learning_rate 0: SAM and plain SFT see the same weights at every step, so every metric TRL logs
    (from the clean pass) must be the same; k=2 would triple num_tokens if every pass counted."""
    logs = {}
    for k in (0, 2):
        rec = LogRecorder()
        trainer = _sft(tmp_path / str(k), k, 5, 0.0, [rec], gradient_accumulation_steps=2)
        trainer.train()
        logs[k] = [entry for entry in rec.logs if "loss" in entry]
        assert trainer._total_train_tokens > 0
    assert len(logs[0]) == len(logs[2]) == 5
    for plain, sam in zip(logs[0], logs[2], strict=True):
        for key in TRL_SFT_METRICS:
            assert sam[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
        assert sam["sam/sharpness"] != 0.0  # the extra passes did run, at other weights


def test_sft_update_matches_float64_reference(tmp_path):
    class Seeing(SAMSFTTrainer):  # a user's subclass of a SAM trainer: its training_step runs once per batch
        seen: list = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({key: value.clone() for key, value in inputs.items() if torch.is_tensor(value)})
            return super().training_step(model, inputs, num_items_in_batch)

    # bf16 off: TRL's default turns bf16 autocast on, which a float64 reference cannot follow
    trainer = _sft(tmp_path, 2, 1, 0.1, trainer_cls=Seeing, optim="sgd", lr_scheduler_type="constant",
                   max_grad_norm=0.0, weight_decay=0.0, bf16=False)  # fmt: skip
    model = trainer.model.double()
    w = trainable(model)
    trainer.train()
    assert len(Seeing.seen) == 1
    batch = Seeing.seen[0]
    # TRL turns activation checkpointing on: its recomputation in backward would read the module's own
    # (trained) weights instead of the reference's, so the reference runs without it
    model.gradient_checkpointing_disable()
    count = int((batch["labels"][:, 1:] != -100).sum())

    def forward(run):
        logits = run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_ce_sum(logits, batch["labels"], shift=True) / count

    g = sam_gradient(loss_of(model, forward), w, 2, 0.3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - 0.1 * g[n], rtol=0, atol=1e-6, msg=n)


def test_sam_config_keeps_every_trl_default(tmp_path):
    plain = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True).to_dict()
    combined = SAMSFTConfig(output_dir=str(tmp_path), use_cpu=True).to_dict()
    assert {key: combined[key] for key in plain} == plain
    # TRL's defaults, not the Trainer's (5e-5, 500, bf16 off)
    assert (plain["learning_rate"], plain["logging_steps"], plain["bf16"]) == (2e-5, 10, True)
    (parsed,) = HfArgumentParser(SAMSFTConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--sam_ascent_steps",
            "3",
            "--sam_rho",
            "0.1",
            "--max_length",
            "64",
        ]
    )
    assert (parsed.sam_config.ascent_steps, parsed.sam_config.rho, parsed.max_length) == (3, 0.1, 64)
    assert parsed.learning_rate == 2e-5
    dpo = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True).to_dict()
    assert {key: SAMDPOConfig(output_dir=str(tmp_path), use_cpu=True).to_dict()[key] for key in dpo} == dpo
    assert {f.name for f in fields(SAMSFTConfig)} - {f.name for f in fields(trl.SFTConfig)} == {
        f.name for f in fields(SAMArgumentsMixin)
    }


def test_wrong_base_order_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"class X\(SAMMixin, SFTTrainer\)"):

        class X(trl.SFTTrainer, SAMTrainer):
            pass

    with pytest.raises(TypeError, match="SAMArgumentsMixin before"):

        class C(trl.SFTConfig, SAMArgumentsMixin):
            pass


def test_sam_config_reaches_a_trainer_with_trl_arguments(tmp_path):
    """The two routes for the SAM knobs, sam_config=SAMConfig(...) with TRL's own SFTConfig and the
    combined SAMSFTConfig, train the same weights bit for bit; without SAM the weights differ."""
    from hf_sam import SAMConfig, SAMMixin

    class MySFT(SAMMixin, trl.SFTTrainer):
        pass

    data = arithmetic_dataset()["train"].select(range(8))
    common = dict(max_steps=2, learning_rate=1e-2, bf16=False, **TRL_ARGS)
    finals = {}
    for route in ("sam_config", "combined", "plain"):
        if route == "sam_config":
            args = trl.SFTConfig(output_dir=str(tmp_path / route), **common)
            extra = {"sam_config": SAMConfig(ascent_steps=3, rho=0.2)}
            cls = MySFT
        else:
            k = 3 if route == "combined" else 0
            args = SAMSFTConfig(output_dir=str(tmp_path / route), sam_ascent_steps=k, sam_rho=0.2, **common)
            extra, cls = {}, SAMSFTTrainer
        trainer = cls(
            model=gpt2(dtype=torch.float32), args=args, train_dataset=data, processing_class=word_tokenizer(),
            **extra,
        )  # fmt: skip
        trainer.train()
        finals[route] = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(finals["sam_config"], finals["combined"], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(finals["sam_config"], finals["plain"], strict=True))


def _preferences(n):
    rows = arithmetic_dataset()["train"].select(range(n))
    wrong = lambda c: f" {(int(c) + 3) % 19}"  # noqa: E731
    return rows.map(lambda r: {"chosen": r["completion"], "rejected": wrong(r["completion"])}).remove_columns(
        "completion"
    )


def test_dpo_reference_once_per_micro_batch_and_metrics_from_the_clean_pass(tmp_path):
    logs, ref_calls = {}, {}
    for k in (0, 2):
        ref = gpt2(dtype=torch.float32, seed=1)
        calls = []
        ref.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        rec = LogRecorder()
        args = SAMDPOConfig(
            output_dir=str(tmp_path / str(k)), max_steps=3, learning_rate=0.0, sam_ascent_steps=k, sam_rho=0.3,
            gradient_accumulation_steps=2, **{**TRL_ARGS, "per_device_train_batch_size": 2},
        )  # fmt: skip
        SAMDPOTrainer(
            model=gpt2(dtype=torch.float32), ref_model=ref, args=args, train_dataset=_preferences(12),
            processing_class=word_tokenizer(), callbacks=[rec],
        ).train()  # fmt: skip
        logs[k] = [entry for entry in rec.logs if "loss" in entry]
        ref_calls[k] = len(calls)
    assert ref_calls[2] == ref_calls[0] == 3 * 2  # one reference forward per micro-batch
    keys = [key for key in logs[0][0] if key.startswith(("rewards/", "logps/", "logits/")) or key == "loss"]
    assert "rewards/margins" in keys and "num_tokens" in logs[2][0]
    for plain, sam in zip(logs[0], logs[2], strict=True):
        for key in [*keys, "num_tokens"]:
            assert sam[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
