"""PEFT/LoRA under SAM: only the trainable tensors move (their update equals a float64 SAM over them),
the frozen base stays bit-identical, a 16-bit frozen base is accepted and 16-bit trainable tensors are
refused by name until upcast."""

import pytest
import torch

peft = pytest.importorskip("peft")

from hf_sam import upcast_trainable_parameters  # noqa: E402

from ..helpers import LogRecorder, WeightRecorder, sam_trainer  # noqa: E402
from ..reference_func import loss_of, sam_gradient, trainable  # noqa: E402
from ..tiny_lm import bert_classifier, token_rows  # noqa: E402


def _lora(model):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    return peft.get_peft_model(model, config)


def _rows(n=4):
    rows = token_rows(n, 8, seed=5)
    return [{**r, "labels": torch.tensor(i % 2)} for i, r in enumerate(rows)]


def test_lora_update_matches_float64_reference_and_base_is_untouched(tmp_path):
    model = _lora(bert_classifier())
    # LoRA's B starts at zero, which would make the adapters' gradient trivial: give it values
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    rows = _rows()
    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    w = trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(run):
        logits = run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    g = sam_gradient(loss_of(model, loss), w, 2, 0.2)
    rec = WeightRecorder()
    sam_trainer(tmp_path, model, rows, [rec], sam_ascent_steps=2, sam_rho=0.2, label_names=["labels"]).train()
    for n, value in frozen.items():
        assert torch.equal(rec.final[n], value), n
    for n in names:
        torch.testing.assert_close(rec.final[n], w[n] - 0.1 * g[n], rtol=0, atol=1e-12, msg=n)


def test_bf16_base_with_fp32_adapters_is_accepted_and_only_adapters_move(tmp_path):
    model = bert_classifier(dtype=torch.bfloat16)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])  # no modules_to_save
    model = peft.get_peft_model(model, config)
    for n, p in model.named_parameters():
        if "classifier" in n:
            p.requires_grad_(False)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and all(model.get_parameter(n).dtype == torch.float32 for n in trainable_names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rec = WeightRecorder()
    sam_trainer(tmp_path, model, _rows(), [rec], sam_ascent_steps=2, sam_rho=0.2, bf16=True, max_steps=2).train()
    assert all(torch.equal(rec.final[n], frozen[n]) for n in frozen)
    assert any(not torch.equal(rec.final[n], rec.before[0][n]) for n in trainable_names)


def test_trainable_16_bit_tensors_are_named_and_upcast_fixes_them(tmp_path):
    # task_type SEQ_CLS makes PEFT keep a trainable copy of the classifier, in the base's bf16
    model = _lora(bert_classifier(dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"classifier\.modules_to_save\.default\.weight \(bfloat16\)") as info:
        sam_trainer(tmp_path, model, _rows(), sam_ascent_steps=1)
    assert "upcast_trainable_parameters" in str(info.value)
    cast = upcast_trainable_parameters(model)
    assert cast and all("classifier" in n for n in cast)
    assert next(model.base_model.model.bert.parameters()).dtype == torch.bfloat16  # the base stays 16-bit
    sam_trainer(tmp_path, model, _rows(), sam_ascent_steps=1, bf16=True).train()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_with_lora_is_accepted_and_stays_frozen(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    bert_classifier(dtype=torch.float32).save_pretrained(tmp_path / "base")
    quantization = (
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
        if bits == 8
        else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"]
        )
    )
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    )
    model = _lora(base)
    assert any(p.dtype in (torch.int8, torch.uint8) for p in model.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rec, logs = WeightRecorder(), LogRecorder()
    sam_trainer(tmp_path / "run", model, _rows(), [rec, logs], sam_ascent_steps=2, sam_rho=0.2, max_steps=2).train()
    assert all(torch.equal(rec.final[n], frozen[n]) for n in frozen)
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(rec.final[n], rec.before[0][n])
    ]
    assert any("lora_" in n for n in moved)
    # measured as p - w in the fp32 adapters: ||d|| = rho up to fp32 rounding of the difference
    norms = [entry["sam/perturbation_norm"] for entry in logs.logs if "sam/sharpness" in entry]
    assert len(norms) == 2 and all(n == pytest.approx(0.2, rel=1e-3) for n in norms)
