"""Run by test_fsdp.py as a plain process (no launcher variables, so accelerate does not wrap DDP):
SAMTrainer trains a TinyNet whose layers were wrapped with fully_shard on a 1-rank CPU mesh (DTensor
parameters and gradients through the Trainer's step, optimizer and clipping), next to the same model
without FSDP."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from tests.helpers import BASE_ARGS  # noqa: E402
from tests.tiny import TinyNet, make_data  # noqa: E402


def train(model, out_dir, sam):
    args = SAMTrainingArguments(output_dir=out_dir, **{**BASE_ARGS, "max_steps": 3, "max_grad_norm": 1.0}, **sam)
    trainer = SAMTrainer(model=model, args=args, train_dataset=make_data(12, seed=3))
    trainer.train()
    return trainer


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    results = {}
    for name, sam in {
        "normalized": dict(sam_ascent_steps=2, sam_rho=0.3, sam_sync_ascent=True),
        "projected_asam_mean": dict(
            sam_ascent_steps=3, sam_rho=0.3, sam_sync_ascent=True, sam_ascent_rule="projected",
            sam_adaptive=True, sam_descent="mean", sam_diagnostics=True,
        ),
    }.items():  # fmt: skip
        torch.manual_seed(0)
        plain = TinyNet()
        torch.manual_seed(0)
        sharded = TinyNet()
        for layer in (sharded.fc1, sharded.fc2, sharded):
            fully_shard(layer, mesh=mesh)
        t_plain = train(plain, os.path.join(out_dir, name, "plain"), sam)
        t_sharded = train(sharded, os.path.join(out_dir, name, "sharded"), sam)
        logs = [
            {key: value for key, value in entry.items() if key.startswith("sam/")}
            for entry in t_sharded.state.log_history
            if "loss" in entry
        ]
        results[name] = {
            "dtensor": type(next(sharded.parameters())).__name__,
            "plain": {n: p.detach().clone() for n, p in plain.named_parameters()},
            "sharded": {n: p.full_tensor().clone() for n, p in sharded.named_parameters()},
            "plain_logs": [
                {key: value for key, value in entry.items() if key.startswith("sam/")}
                for entry in t_plain.state.log_history
                if "loss" in entry
            ],
            "sharded_logs": logs,
        }
    torch.save(results, os.path.join(out_dir, "trainer.pt"))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
