"""scripts/run_sft.py offline: the embedded instructions, a GPT-2 from a config, LoRA optional."""

import json

import pytest

pytest.importorskip("trl")

from hf_sam.tasks.instructions import arithmetic_dataset  # noqa: E402
from hf_sam.tasks.sft import main  # noqa: E402


def test_embedded_instructions_are_fixed_and_disjoint():
    first, second = arithmetic_dataset(), arithmetic_dataset()
    prompts = {name: set(split["prompt"]) for name, split in first.items()}
    assert all(first[name]["prompt"] == second[name]["prompt"] for name in first)
    assert not (prompts["train"] & prompts["validation"] or prompts["train"] & prompts["test"])


@pytest.mark.parametrize("peft", [False, True])
def test_sft_script_trains_with_sam_and_evaluates(tmp_path, peft):
    argv = [
        "--output_dir", str(tmp_path), "--do_eval", "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--sam_ascent_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--logging_steps", "2", "--completion_accuracy_samples", "5", "--save_strategy", "no",
    ]  # fmt: skip
    if peft:
        argv += ["--use_peft", "--lora_r", "4"]  # PEFT picks GPT-2's c_attn
    results = main(argv)
    assert 0.0 <= results["eval_completion_accuracy"] <= 1.0
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "sam/sharpness" in entry]
    assert len(logged) == 2 and all("num_tokens" in entry for entry in logged)
    saved = {path.name for path in tmp_path.iterdir()}
    assert ("adapter_config.json" in saved) == peft
