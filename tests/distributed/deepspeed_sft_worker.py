"""Run by test_deepspeed.py under torch.distributed.run (2 gloo processes on the CPU): TRL's SFT with SAM
under DeepSpeed ZeRO-3 and gradient accumulation, the fine-tuning set-up of a large model in miniature (a
tiny GPT-2 from a config, the bundled arithmetic instructions). Saves the gathered weights at the end and
the token ids every rank trained on, for the one-process comparison on the joint micro-batches.

The launch follows ../shared/TRAINER_NOTES.md ("DeepSpeed on a CPU"), as deepspeed_worker.py does.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.distributed.deepspeed_worker import ds_config, full_weights  # noqa: E402
from tests.distributed.sft_setup import SFT_ARGS, sft_data  # noqa: E402
from tests.tiny_lm import gpt2  # noqa: E402


def main():
    from accelerate import PartialState

    from hf_sam import SAMSFTConfig, SAMSFTTrainer
    from hf_sam.tasks.instructions import word_tokenizer

    out_dir, stage = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    rank = dist.get_rank()
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
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown, which can abort under load


if __name__ == "__main__":
    main()
