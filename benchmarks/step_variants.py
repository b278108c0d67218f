"""The variants bench_step.py times: closures that each run one unit of work (one optimizer step; a
cycle of CYCLE steps for LookSAM and its floor) on a shared model, batch and AdamW optimizer."""

from __future__ import annotations

import contextlib

import torch

CYCLE = 5  # LookSAM's n in the benchmark: one SAM step, then CYCLE - 1 one-pass steps


def make_variant(kind: str, model, batch, k: int, rule: str, bf16: bool, device: str, **sam_args):
    """A closure running one full optimizer step of the variant (``sam_args``: more SAMTrainingArguments)."""
    from transformers import set_seed

    from hf_sam import SAMTrainer, SAMTrainingArguments

    set_seed(0)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if kind == "peer":
        from pytorch_optimizer import SAM

        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-5, foreach=True)

        def step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            opt.first_step(zero_grad=True)
            with autocast:
                loss2 = model(**batch).loss
            loss2.backward()
            opt.second_step(zero_grad=True)

        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    if kind in ("floor", "cyclefloor"):  # plain passes: k + 1 in the first optimizer step, one in the others
        floor_steps = CYCLE if kind == "cyclefloor" else 1

        def step():
            for i in range(floor_steps):
                for _ in range(k + 1 if i == 0 else 1):
                    with autocast:
                        loss = model(**batch).loss
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step
    sam = {"sam_ascent_steps": k if kind in ("sam", "looksam", "msam") else 0, **sam_args}
    if kind == "sam":
        sam["sam_ascent_rule"] = rule
    if kind == "looksam":
        sam.update(sam_every_n_steps=CYCLE, sam_reuse_alpha=0.7)
    if kind == "msam":
        sam["sam_method"] = "msam"
    args = SAMTrainingArguments(output_dir="/tmp/hf_sam_bench", report_to=[], use_cpu=device == "cpu", **sam)
    trainer = SAMTrainer(model=model, args=args)
    trainer.optimizer = opt
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this bypasses
    steps = CYCLE if kind == "looksam" else 1

    def step():
        for _ in range(steps):
            with autocast:
                trainer.training_step(model, batch)
            opt.step()
            # as the Trainer's loop: LookSAM's g_v (WSAM's decoupled term) is taken right after the optimizer step
            trainer.callback_handler.on_optimizer_step(trainer.args, trainer.state, trainer.control)
            opt.zero_grad(set_to_none=True)
            trainer.state.global_step += 1  # the Trainer's loop would: LookSAM's schedule reads it

    step.trainer = trainer  # for benchmarks/profile_step.py, which times the trainer's phases
    return step


def variant_list(ks: list[int], rules: list[str], family: bool = True) -> list[tuple[str, int, str]]:
    family_ks = [k for k in (1, 3) if family]
    out = [("plain", 0, "-")] + [("floor", k, "-") for k in sorted({0, *ks, *family_ks})]
    out += [("sam", k, rule) for k in ks for rule in rules]
    out.append(("peer", 1, "normalized"))
    for k in family_ks:
        out += [("cyclefloor", k, f"n{CYCLE}"), ("looksam", k, f"n{CYCLE}")]
    if family:
        out.append(("msam", 1, "-"))
    return out
