"""Run by test_fsdp.py under torch.distributed.run: a TinyNet wrapped with FSDP2's fully_shard on a
CPU mesh, one MultiStepAscent step per configuration through the engine's public API, each rank on
its own batch. Saves the full (gathered) descent gradient, the logged norms and the weights."""

import itertools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hf_sam import MultiStepAscent, SAMConfig  # noqa: E402
from tests.allocations import Allocations, track_methods  # noqa: E402
from tests.tiny import TinyNet, batch_of, make_data  # noqa: E402

RULES = ("normalized", "projected", "accumulated")
CONFIGS = list(itertools.product(RULES, (1, 2, 3), (False, True), ("last", "mean")))


# the SAM family on shards: three optimizer steps (SGD, momentum 0.9) on the same weights everywhere
FAMILY = {
    "gsam-k2-asam": dict(ascent_steps=2, descent="gsam", adaptive=True),
    "wsam-decoupled": dict(descent="wsam"),
    "friendly-k2": dict(ascent_steps=2, direction="friendly"),
    "looksam-tensor": dict(every_n_steps=2, reuse_alpha=0.7, reuse_granularity="tensor"),
    "msam": dict(method="msam"),
}
FAMILY_STEPS = 3


def family_batches(rank):
    rows = make_data(12 * FAMILY_STEPS, seed=11)
    return [batch_of(rows[t * 12 + rank * 6 : t * 12 + rank * 6 + 6]) for t in range(FAMILY_STEPS)]


def run_family(name, mesh, rank):
    """The trainer's use of the engine, by hand: SAM steps (with LookSAM's memory, the descent the config builds for
    sam_every_n_steps > 1, and its reuse on the one-pass steps), MSAM's one pass at w - rho v/||v||, WSAM's update
    after the optimizer step (LookSAM's g_v is taken there too)."""
    from hf_sam.engine.momentum import MomentumPerturbation

    torch.manual_seed(0)
    model = TinyNet()
    for layer in (model.fc1, model.fc2, model):
        fully_shard(layer, mesh=mesh)
    start = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    config = SAMConfig(rho=0.3, **FAMILY[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = MultiStepAscent(model.parameters(), **config.engine_kwargs()) if config.method == "sam" else None
    for t, (x, y) in enumerate(family_batches(rank)):
        loss = lambda x=x, y=y: F.cross_entropy(model(x)["logits"], y)  # noqa: E731
        if config.method == "msam":
            perturbation = MomentumPerturbation(model.parameters(), config.rho)
            state = optimizer.state
            perturbation.begin([state[p].get("momentum_buffer") if p in state else None for p in model.parameters()])
            loss().backward()
            perturbation.restore()
        elif t % config.every_n_steps == 0:
            engine.step(loss)
        else:
            loss().backward()
            if engine is not None:
                engine.one_pass_step()
        optimizer.step()
        if engine is not None:
            engine.after_optimizer_step(optimizer)
        optimizer.zero_grad()
    return {"start": start, "end": {n: p.full_tensor().clone() for n, p in model.named_parameters()}}


MIXED_STEPS = 3
MIXED = {"k1": dict(ascent_steps=1), "k2-asam": dict(ascent_steps=2, adaptive=True)}


def run_mixed(name, mesh, rank):
    """FSDP2 mixed precision as accelerate sets it up for --bf16: fp32 shards, parameters all-gathered in
    bf16 for compute (MixedPrecisionPolicy), gradients reduced in fp32, the forward under bf16 autocast;
    three SAM steps with SGD."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(0)
    model = TinyNet(dtype=torch.float32)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    compute_dtypes = set()
    model.fc1.register_forward_hook(lambda m, i, out: compute_dtypes.add(str(out.dtype)))
    for layer in (model.fc1, model.fc2, model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    start = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = MultiStepAscent(model.parameters(), **SAMConfig(rho=0.3, **MIXED[name]).engine_kwargs())
    rows = make_data(12 * MIXED_STEPS, seed=13, dtype=torch.float32)
    for t in range(MIXED_STEPS):
        x, y = batch_of(rows[t * 12 + rank * 6 : t * 12 + rank * 6 + 6])

        def loss(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.cross_entropy(model(x)["logits"], y)

        engine.step(loss)
        optimizer.step()
        optimizer.zero_grad()
    return {
        "start": start,
        "end": {n: p.full_tensor().clone() for n, p in model.named_parameters()},
        "shard_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "compute_dtypes": sorted(compute_dtypes),
    }


ACCUMULATION = {
    "k1-m2": (dict(ascent_steps=1), 2),
    "k2-projected-asam-m3": (dict(ascent_steps=2, ascent_rule="projected", adaptive=True), 3),
    "k2-mean-m2": (dict(ascent_steps=2, descent="mean"), 2),
}
ACCUMULATION_STEPS = 2


def run_accumulation(name, mesh, rank):
    """Gradient accumulation as the Trainer runs it under FSDP2: the non-final micro-batches inside accelerate's
    no_sync (requires_gradient_sync False), every micro-batch's SAM passes inside SAMTrainer's GradientSync
    contexts, the loss divided by the micro-batches; SGD steps once per step."""
    from hf_sam.trainer.launch import GradientSync

    sam, micro = ACCUMULATION[name]
    torch.manual_seed(0)
    model = TinyNet()
    for layer in (model.fc1, model.fc2, model):
        fully_shard(layer, mesh=mesh)
    start = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = MultiStepAscent(model.parameters(), **SAMConfig(rho=0.3, **sam).engine_kwargs())
    tracker = Allocations()  # what the engine's own calls allocate (the passes' forward and backward are FSDP's)
    track_methods(engine, ("begin", "ascend", "begin_descent", "end_descent", "restore"), tracker)
    world = dist.get_world_size()
    rows = make_data(3 * world * micro * ACCUMULATION_STEPS, seed=17)
    for t in range(ACCUMULATION_STEPS):
        for m in range(micro):
            base = (t * micro + m) * 3 * world + rank * 3
            x, y = batch_of(rows[base : base + 3])
            last = m == micro - 1
            model.set_requires_gradient_sync(last)  # accelerate's no_sync for all but the last micro-batch
            sync = GradientSync(model, sync_ascent=True)
            with sync.ascent():
                engine.begin()
                F.cross_entropy(model(x)["logits"], y).div(micro).backward()
                engine.ascend()
                for _ in range(engine.ascent_steps - 1):
                    F.cross_entropy(model(x)["logits"], y).div(micro).backward()
                    engine.ascend()
                factor = engine.begin_descent()
                with sync.descent():
                    (F.cross_entropy(model(x)["logits"], y).div(micro) * factor).backward()
                engine.end_descent()
                engine.restore()
            model.set_requires_gradient_sync(True)
        optimizer.step()
        optimizer.zero_grad()
    return {
        "start": start,
        "end": {n: p.full_tensor().clone() for n, p in model.named_parameters()},
        # SAM's own state on this rank against the model and this rank's shard
        "sam_elements": sum(b.numel() for b in engine._moved.buffers),
        "shard_elements": sum(p.to_local().numel() for p in model.parameters()),
        "model_elements": sum(p.numel() for p in model.parameters()),
        "largest_allocation": tracker.largest,
        "largest_shard": max(p.to_local().numel() for p in model.parameters()),
        "largest_param": max(p.numel() for p in model.parameters()),
    }


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if sys.argv[2:] == ["accumulation"]:  # the key case on more ranks: accumulation only
        accumulation = {name: run_accumulation(name, mesh, rank) for name in ACCUMULATION}
        torch.save({"accumulation": accumulation}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    torch.manual_seed(0)
    model = TinyNet()  # float64, the same initial weights on every rank
    for layer in (model.fc1, model.fc2, model):
        fully_shard(layer, mesh=mesh)
    x, y = batch_of(make_data(12, seed=9)[rank * 6 : rank * 6 + 6])
    results = []
    for rule, k, adaptive, descent in CONFIGS:
        config = SAMConfig(ascent_steps=k, rho=0.3, ascent_rule=rule, adaptive=adaptive, descent=descent)
        engine = MultiStepAscent(model.parameters(), **config.engine_kwargs())
        before = [p.full_tensor().clone() for p in model.parameters()]
        engine.step(lambda: F.cross_entropy(model(x)["logits"], y))
        after = [p.full_tensor() for p in model.parameters()]
        results.append(
            {
                "config": (rule, k, adaptive, descent),
                "grad": [p.grad.full_tensor().clone() for p in model.parameters()],
                "grad_is_sharded": all(type(p.grad).__name__ == "DTensor" for p in model.parameters()),
                "restored": all(torch.equal(a, b) for a, b in zip(after, before, strict=True)),
                "first_norm": engine.grad_norms[0],
                "perturbation_norm": float(engine.perturbation_norm),
                "backup_elements": sum(b.numel() for b in engine._moved.buffers),
                "perturbed_weights": engine.perturbed_weights,
            }
        )
        for p in model.parameters():
            p.grad = None
    # a non-finite ascent gradient on one rank: the synchronized norm is non-finite on both, so both
    # drop the perturbation together and descend at w
    engine = MultiStepAscent(model.parameters(), **SAMConfig(ascent_steps=2, rho=0.3).engine_kwargs())
    calls = []

    def poisoned_loss():
        calls.append(1)
        loss = F.cross_entropy(model(x)["logits"], y)
        return loss * float("nan") if rank == 1 and len(calls) == 1 else loss

    engine.step(poisoned_loss)
    skipped = {
        "skipped": engine.skipped,
        "grad": [p.grad.full_tensor().clone() for p in model.parameters()],
        "finite_weights": all(torch.isfinite(p.full_tensor()).all() for p in model.parameters()),
    }
    for p in model.parameters():
        p.grad = None
    family = {name: run_family(name, mesh, rank) for name in FAMILY}
    mixed = {name: run_mixed(name, mesh, rank) for name in MIXED}
    accumulation = {name: run_accumulation(name, mesh, rank) for name in ACCUMULATION}
    torch.save(
        {
            "accumulation": accumulation,
            "family": family,
            "mixed": mixed,
            "skipped": skipped,
            "results": results,
            "x": x,
            "y": y,
            "weights": {n: p.full_tensor() for n, p in model.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown, which can abort under load


if __name__ == "__main__":
    main()
