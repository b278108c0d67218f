"""The SFT run of deepspeed_sft_worker.py and its one-process twin in test_deepspeed.py: the same data, seed
and arguments (the per-device batch aside)."""

from hf_sam.tasks.instructions import arithmetic_dataset

STEPS, MICRO_BATCH, ACCUMULATION = 3, 4, 2  # MICRO_BATCH: the joint micro-batch of all (2) ranks
SFT_ARGS = {
    "micro_batch": MICRO_BATCH,
    "common": dict(
        max_steps=STEPS, gradient_accumulation_steps=ACCUMULATION, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        sam_ascent_steps=2, sam_rho=0.3, sam_sync_ascent=True,
    ),
}  # fmt: skip


def sft_data():
    return arithmetic_dataset()["train"].select(range(MICRO_BATCH * ACCUMULATION * STEPS))
