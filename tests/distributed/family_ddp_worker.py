"""Run by test_family_ddp.py under torch.distributed.run: a few SAMTrainer steps of one SAM-family
method (its sam_* fields as JSON in argv[2]) per rank, then dump the micro-batches each rank saw and
the weights before every step and at the end, for the float64 check on the joint batch."""

import json
import os
import sys

import torch
from transformers import TrainerCallback, set_seed

from hf_sam import SAMTrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.distributed.ddp_worker import SeeingTrainer  # noqa: E402
from tests.helpers import BASE_ARGS  # noqa: E402
from tests.tiny import TinyNet, make_data  # noqa: E402


class Recorder(TrainerCallback):
    def __init__(self):
        self.before = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append({n: p.detach().clone() for n, p in model.named_parameters()})


def main():
    out_dir, sam = sys.argv[1], json.loads(sys.argv[2])
    steps = sam.pop("steps")
    torch.set_num_threads(1)
    set_seed(0)
    model = TinyNet()
    rec = Recorder()
    args = SAMTrainingArguments(
        output_dir=out_dir,
        **{**BASE_ARGS, "per_device_train_batch_size": 3, "max_steps": steps, "optim_args": "momentum=0.9"},
        ddp_backend="gloo",
        sam_rho=0.3,
        **sam,
    )
    trainer = SeeingTrainer(model=model, args=args, train_dataset=make_data(6 * steps, seed=4), callbacks=[rec])
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "before": rec.before,
            "after": {n: p.detach().clone() for n, p in model.named_parameters()},
            "batches": trainer.seen,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    # The results are on disk. Skip the interpreter's teardown: gloo's destructors can abort when loaded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
