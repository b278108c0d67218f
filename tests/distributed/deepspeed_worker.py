"""Run by test_deepspeed.py under torch.distributed.run (2 gloo processes on the CPU): SAMTrainer under
DeepSpeed ZeRO, for each job of argv[2] (JSON: its stage and SAM configurations), a few optimizer steps each;
dumps what every rank saw, the full weights before every step and at the end, the logged norms and
DeepSpeed's own step count, for the float64 check on the joint batch.

The launch follows ../shared/TRAINER_NOTES.md ("DeepSpeed on a CPU"): accelerate picks no process group
without CUDA, so the worker makes a gloo PartialState under ACCELERATE_USE_DEEPSPEED and the Trainer is
told to use it (accelerator_config use_configured_state).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback, set_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from tests.helpers import BASE_ARGS  # noqa: E402
from tests.tiny import TinyNet, make_data  # noqa: E402

STEPS = 3


def full_weights(model, stage):
    """Every rank's view of the whole weights (ZeRO-3: gathered from the partitions)."""
    import deepspeed

    params = list(model.parameters())
    names = [n.removeprefix("module.") for n, _ in model.named_parameters()]
    context = deepspeed.zero.GatheredParameters(params) if stage == 3 else torch.no_grad()
    with context:
        return {n: p.detach().clone().double() for n, p in zip(names, params, strict=True)}


class Recorder(TrainerCallback):
    def __init__(self, stage):
        self.stage = stage
        self.before = []
        self.norms = []
        self.fidelity = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append(full_weights(model, self.stage))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "sam/grad_norm" in logs:
            self.norms.append((logs["sam/grad_norm"], logs["sam/perturbation_norm"]))
        if logs and "sam/perturbation_fidelity" in logs:
            self.fidelity.append(logs["sam/perturbation_fidelity"])


def record_compute_dtypes(model):
    """The dtype each Linear computes in, per forward call (torch_autocast: bfloat16)."""
    dtypes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: dtypes.append(str(out.dtype)))
    return dtypes


class SeeingTrainer(SAMTrainer):
    """Records the micro-batches this rank trains on (the data, not the math)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def precision_options():
    """This launch's precision sections (JSON in HF_SAM_TEST_DS_PRECISION); keys with "_" are switches."""
    options = json.loads(os.environ.get("HF_SAM_TEST_DS_PRECISION", "{}"))
    return {k: v for k, v in options.items() if not k.startswith("_")}, options


def ds_config(stage):
    switches = precision_options()[1]
    return {
        **precision_options()[0],
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        # no persistent parameters unless asked for (DeepSpeed's default keeps small ones whole on every rank)
        "zero_optimization": {
            "stage": stage,
            **({} if switches.get("_persistent") else {"stage3_param_persistence_threshold": 0}),
        },
    }


RESUME_CONFIGS = {
    "sam": {"sam_ascent_steps": 2},
    "friendly": {"sam_direction": "friendly", "sam_friendly_sigma": 0.8, "sam_friendly_lambda": 0.5},
}


class _AtTrainEnd(TrainerCallback):
    def __init__(self, fn):
        self.fn = fn

    def on_train_end(self, args, state, control, **kwargs):
        self.fn()


def train(out_dir, stage, sam, steps=STEPS, resume=None, d_in=5, hidden=7, inspect=None, **extra):
    set_seed(0)
    model = TinyNet(d_in=d_in, hidden=hidden, dtype=torch.float32)
    sam = dict(sam)
    poison = sam.pop("_poison", None)  # {forward call (1-based): loss factor}, on rank 0 only
    if poison and dist.get_rank() == 0:
        model.poison = {int(call): float(factor) for call, factor in poison.items()}
    dtypes = record_compute_dtypes(model)
    recorder = Recorder(stage)
    trainer_options = {k: v for k, v in sam.items() if not k.startswith("sam_")}  # e.g. the accumulation
    sam = {k: v for k, v in sam.items() if k.startswith("sam_")}
    args = SAMTrainingArguments(
        output_dir=out_dir,
        **{**BASE_ARGS, "per_device_train_batch_size": 3, "max_steps": steps, **trainer_options, **extra},
        deepspeed=ds_config(stage),
        bf16=precision_options()[1].get("_bf16_flag", False),
        accelerator_config={"use_configured_state": True},
        sam_rho=0.3,
        sam_sync_ascent=True,
        **sam,
    )
    rows = 3 * dist.get_world_size() * steps * args.gradient_accumulation_steps  # 3 per rank and micro-batch
    data = make_data(rows, d_in=d_in, seed=4, dtype=torch.float32)
    trainer = SeeingTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.seen = []
    # the precision sections DeepSpeed gets, after SAMTrainer's checks (and its --bf16 mapping)
    ds_precision = {
        k: v
        for k, v in trainer.accelerator.state.deepspeed_plugin.deepspeed_config.items()
        if k in ("bf16", "fp16", "torch_autocast")
    }
    inspected = {}
    if inspect:  # while the run's state exists (train() drops it on return)
        trainer.add_callback(_AtTrainEnd(lambda: inspected.update(inspect(trainer))))
    trainer.train(resume_from_checkpoint=resume)
    engine = trainer.accelerator.deepspeed_engine_wrapped.engine
    result = {
        "before": recorder.before,
        "after": full_weights(trainer.model_wrapped, stage),
        "batches": trainer.seen,
        "norms": recorder.norms,
        "fidelity": recorder.fidelity,  # sam/perturbation_fidelity (with diagnostics under autocast)
        "engine_steps": int(engine.global_steps),
        "skipped_steps": int(engine.skipped_steps),  # DeepSpeed's own count of overflow-skipped steps
        "trainer_steps": int(trainer.state.global_step),
        "compute_dtypes": sorted(set(dtypes)),
        "ds_precision": ds_precision,
        "loss_scale": None if trainer._loss_scale() is None else float(trainer._loss_scale()),
        "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in trainer.model_wrapped.parameters()),
        **inspected,
    }
    # accelerate takes a DeepSpeed plugin only in the first Accelerator of a process: forget it (the gloo
    # process group of the PartialState stays) so that the next configuration builds its own
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return result


# SAM's passes under ZeRO, tracked op by op (the stock loop's backward and step paused): a wider model so
# that a full-size copy of a parameter is clearly bigger than any rank's part of it
MEMORY_CONFIG = {"sam_ascent_steps": 2, "sam_descent": "mean", "sam_adaptive": True, "gradient_accumulation_steps": 2}
PASS_METHODS = ("begin", "ascent_backward", "ascend", "begin_descent", "descent_backward", "end_descent", "restore")


def measure_allocations(out_dir, stage):
    from deepspeed.runtime.engine import DeepSpeedEngine

    from hf_sam.trainer.deepspeed import DeepSpeedBackend
    from tests.allocations import Allocations, pause_methods, track_methods

    tracker = Allocations()
    saved = {(cls, n): cls.__dict__[n] for cls, names in ((DeepSpeedBackend, PASS_METHODS),
             (DeepSpeedEngine, ("backward", "step"))) for n in names}  # fmt: skip
    track_methods(DeepSpeedBackend, PASS_METHODS, tracker)
    pause_methods(DeepSpeedEngine, ("backward", "step"), tracker)

    def sizes(trainer):
        params = [p for p in trainer.model_wrapped.parameters() if p.requires_grad]
        parts = trainer.sam_run.zero_parts.parts
        slots = [p.ds_tensor.numel() for p in params] if stage == 3 else [t.numel() for t in parts]
        return {
            "largest_part": max(t.numel() for t in parts),
            "largest_slot": max(slots),
            "largest_param": max(getattr(p, "ds_numel", p.numel()) for p in params),
        }

    try:
        result = train(out_dir, stage, MEMORY_CONFIG, d_in=16, hidden=32, inspect=sizes)
    finally:
        for (cls, name), method in saved.items():
            setattr(cls, name, method)
    return {"largest_allocation": tracker.largest, **{k: result[k] for k in ("largest_part", "largest_slot",
            "largest_param", "engine_steps")}}  # fmt: skip


def run_job(out_dir, stage, configs, flags):
    """One job: every configuration at ``stage``, then the memory measurement and the resumes ``flags`` ask for;
    or TRL's SFT (flag "sft", tests/distributed/deepspeed_sft_worker.py)."""
    if "sft" in flags:
        from tests.distributed.deepspeed_sft_worker import run_sft

        return run_sft(out_dir, stage, ds_config, full_weights)
    if precision_options()[1].get("_refusal"):  # only the refusal: SAMTrainer must raise before training
        from accelerate.state import AcceleratorState

        try:
            train(os.path.join(out_dir, "refused"), stage, {"sam_ascent_steps": 1})
            refusal = ""
        except ValueError as error:
            refusal = str(error)
        AcceleratorState._reset_state()
        return {"refusal": refusal}
    results = [train(os.path.join(out_dir, f"run{i}"), stage, sam) for i, sam in enumerate(configs)]
    memory = measure_allocations(os.path.join(out_dir, "memory"), stage) if "memory" in flags else None
    resume = {}
    if "resume" in flags:
        common = dict(save_strategy="steps", save_steps=2)
        # plain SAM, and F-SAM, whose momentum must come back from the checkpoint for the resumed run to match
        for label, sam in RESUME_CONFIGS.items():
            folder = os.path.join(out_dir, f"straight-{label}")
            straight = train(folder, stage, sam, steps=4, **common)
            resumed = train(folder, stage, sam, steps=4, resume=os.path.join(folder, "checkpoint-2"), **common)
            resume[label] = {"straight": straight["after"], "resumed": resumed["after"]}
            if label == "friendly":  # the same resume without the saved momentum: it must matter
                dist.barrier()
                os.remove(os.path.join(folder, "checkpoint-2", f"sam_state_rank{dist.get_rank()}.pt"))
                dist.barrier()
                forgetful = train(folder, stage, sam, steps=4, resume=os.path.join(folder, "checkpoint-2"), **common)
                resume[label]["forgetful"] = forgetful["after"]
    return {"results": results, "resume": resume, "memory": memory}


def main():
    """argv[1]: the output folder; argv[2]: the jobs (JSON: name -> stage, configs, precision sections, flags), run
    one after the other in this launch (one start-up of the processes for all of them); each job's results go to
    <folder>/<name>/rank<r>.pt."""
    from accelerate import PartialState

    out_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    rank = dist.get_rank()
    for name, job in jobs.items():
        os.environ["HF_SAM_TEST_DS_PRECISION"] = json.dumps(job.get("precision") or {})
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        result = run_job(folder, job["stage"], job.get("configs", []), job.get("flags", []))
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo's teardown, which can abort under load


if __name__ == "__main__":
    main()
