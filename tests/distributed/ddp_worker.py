"""Run by test_distributed.py under torch.distributed.run: for each job of argv[2] (JSON: name -> k, accumulation,
synchronized ascent, descent, resume), one SAMTrainer step per rank, then dump what each rank saw (its
micro-batches) and the weights before and after, for the float64 check, to <argv[1]>/<name>/rank<r>.pt. The jobs
run one after the other in this one launch."""

import json
import os
import sys

import torch
from transformers import TrainerCallback, set_seed

from hf_sam import SAMTrainer, SAMTrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.helpers import BASE_ARGS  # noqa: E402
from tests.tiny import TinyNet, make_data  # noqa: E402


class Recorder(TrainerCallback):
    def __init__(self):
        self.before = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.before is None:
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


class SeeingTrainer(SAMTrainer):
    """Records the micro-batches this rank trains on (the data, not the math) in ``seen``, its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def resume_check(out_dir, k, grad_accum, sync):
    """4 steps straight (dropout on, shuffled data) and the same run resumed from its step-2 checkpoint: the
    final weights of both, for a torch.equal in the test."""
    finals = {}
    for label, resume in (("straight", None), ("resumed", os.path.join(out_dir, "resume", "checkpoint-2"))):
        set_seed(0)
        model = TinyNet(dtype=torch.float32, dropout=0.2)
        options = {
            **BASE_ARGS, "per_device_train_batch_size": 3, "gradient_accumulation_steps": grad_accum, "max_steps": 4,
            "save_strategy": "steps", "save_steps": 2, "train_sampling_strategy": "random", "optim": "adamw_torch",
            "learning_rate": 0.01,
        }  # fmt: skip
        args = SAMTrainingArguments(
            output_dir=os.path.join(out_dir, "resume"), **options, ddp_backend="gloo", sam_ascent_steps=k,
            sam_rho=0.3, sam_sync_ascent=sync,
        )  # fmt: skip
        trainer = SAMTrainer(model=model, args=args, train_dataset=make_data(24, seed=4, dtype=torch.float32))
        trainer.train(resume_from_checkpoint=resume)
        finals[label] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return finals


def run_job(out_dir, k, grad_accum, sync, descent="last", resume=False):
    xsam = {"sam_descent": "xsam", "sam_xsam_alpha": 0.5} if descent == "xsam" else {}
    set_seed(0)
    model = TinyNet()
    rec = Recorder()
    args = SAMTrainingArguments(
        output_dir=out_dir,
        **{**BASE_ARGS, "per_device_train_batch_size": 3, "gradient_accumulation_steps": grad_accum},
        ddp_backend="gloo",
        sam_ascent_steps=k,
        sam_rho=0.3,
        sam_sync_ascent=sync,
        **xsam,
    )
    trainer = SeeingTrainer(model=model, args=args, train_dataset=make_data(24, seed=4), callbacks=[rec])
    trainer.train()
    return {
        "before": rec.before,
        "after": {n: p.detach().clone() for n, p in model.named_parameters()},
        "batches": trainer.seen,
        "world": int(os.environ["WORLD_SIZE"]),
        "resume": resume_check(out_dir, k, grad_accum, sync) if resume else None,
    }


def main():
    out_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name, job in jobs.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        torch.save(run_job(folder, **job), os.path.join(folder, f"rank{rank}.pt"))
    # The results are on disk. Skip the interpreter's teardown: gloo's destructors can abort
    # (SIGABRT, "terminate called without an active exception") when the machine is loaded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
