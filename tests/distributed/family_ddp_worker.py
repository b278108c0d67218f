"""Run by test_family_ddp.py under torch.distributed.run: for each SAM-family method (argv[2]: JSON of
{"steps": N, "cases": {name: its sam_* fields}}, all in one launch) a few SAMTrainer steps per rank, then dump
the micro-batches each rank saw and the weights before every step and at the end, for the float64 check on the
joint batch."""

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


def run_case(out_dir: str, name: str, sam: dict, steps: int) -> None:
    set_seed(0)
    model = TinyNet()
    rec = Recorder()
    args = SAMTrainingArguments(
        output_dir=os.path.join(out_dir, name),
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
        os.path.join(out_dir, f"rank{rank}_{name}.pt"),
    )


def main():
    out_dir, payload = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    for name, sam in payload["cases"].items():
        run_case(out_dir, name, sam, payload["steps"])
    # The results are on disk. Skip the interpreter's teardown: gloo's destructors can abort when loaded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
