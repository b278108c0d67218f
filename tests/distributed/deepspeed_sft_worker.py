"""A job of deepspeed_worker.py (2 gloo processes on the CPU, launched by test_deepspeed.py): TRL's SFT with SAM
under DeepSpeed ZeRO-3 and gradient accumulation, the fine-tuning set-up of a large model in miniature (a
tiny GPT-2 from a config, the bundled arithmetic instructions). Saves the gathered weights at the end and
the token ids every rank trained on, for the one-process comparison on the joint micro-batches.
"""

import os

import torch

from tests.distributed.sft_setup import SFT_ARGS, sft_data
from tests.tiny_lm import gpt2


def run_sft(out_dir, stage, ds_config, full_weights):
    """SFT in fp32 and in TRL's default bf16 at ``stage`` (``ds_config``, ``full_weights``: the worker's)."""
    from hf_sam import SAMSFTConfig, SAMSFTTrainer
    from hf_sam.tasks.instructions import word_tokenizer

    seen = []

    class SeeingSFT(SAMSFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(inputs["input_ids"].detach().clone())
            return super().training_step(model, inputs, num_items_in_batch)

    results = {}
    for precision, bf16 in (("fp32", False), ("bf16", True)):  # bf16: TRL's default, as torch_autocast
        seen.clear()
        args = SAMSFTConfig(
            output_dir=os.path.join(out_dir, precision), per_device_train_batch_size=SFT_ARGS["micro_batch"] // 2,
            bf16=bf16, **SFT_ARGS["common"], deepspeed=ds_config(stage),
            accelerator_config={"use_configured_state": True},
        )  # fmt: skip
        trainer = SeeingSFT(
            model=gpt2(dtype=torch.float32), args=args, train_dataset=sft_data(), processing_class=word_tokenizer()
        )
        trainer.train()
        engine = trainer.accelerator.deepspeed_engine_wrapped.engine
        results[precision] = {
            "after": full_weights(trainer.model_wrapped, stage),
            "seen": list(seen),
            "engine_steps": int(engine.global_steps),
            "trainer_steps": int(trainer.state.global_step),
        }
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # the next run builds its own DeepSpeed plugin (see deepspeed_worker.py)
    return results
