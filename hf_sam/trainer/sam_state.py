"""What SAM carries across optimizer steps, saved with the Trainer's checkpoints and read back on
resume: XSAM's chosen alpha (JSON), the rho schedule's bounds (JSON), F-SAM's momentum and LookSAM's
g_v (the engine's state: tensors, one file per process: under FSDP2 each rank holds its own shards)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

SAM_STATE_FILE = "sam_state.json"


def tensor_state_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"sam_state_rank{rank}.pt")


def save_sam_state(trainer: Any, folder: str) -> None:
    """Write SAM's state into the checkpoint ``folder`` (the JSON part on the main process only)."""
    config = trainer.sam_config
    state: dict[str, Any] = {}
    if config.descent == "xsam":
        state.update(xsam_alpha=trainer.sam_xsam_alpha, xsam_epoch=trainer._sam_xsam_epoch)
    schedule = trainer.sam_run.rho_schedule
    if schedule is not None and schedule.bounds is not None:
        state["rho_lr_bounds"] = list(schedule.bounds)
    if state and trainer.args.should_save:
        with open(os.path.join(folder, SAM_STATE_FILE), "w") as f:
            json.dump(state, f)
    tensors = sam_tensor_state(trainer)
    if tensors:
        os.makedirs(folder, exist_ok=True)
        torch.save(tensors, tensor_state_file(folder, trainer.args.process_index))


def sam_tensor_state(trainer: Any) -> dict[str, Any]:
    """What the engine carries across steps (F-SAM's momentum, LookSAM's g_v: its descent's), as CPU tensors (empty
    when the run has none)."""
    engine = trainer.sam_run.engine
    if engine is not None:
        state = engine.state_dict()
        return {"engine": state} if any(state.values()) else {}
    if trainer.sam_run.pending_state and "engine" in trainer.sam_run.pending_state:
        return {"engine": trainer.sam_run.pending_state["engine"]}  # loaded, not yet bound
    return {}


def load_sam_state(trainer: Any, checkpoint: str | None) -> None:
    """Read SAM's state back from ``checkpoint``; the tensors wait for the engine to be bound."""
    if not checkpoint:
        return
    path = os.path.join(checkpoint, SAM_STATE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)
        if "xsam_alpha" in state:
            trainer.sam_xsam_alpha, trainer._sam_xsam_epoch = state["xsam_alpha"], state["xsam_epoch"]
        if "rho_lr_bounds" in state and trainer.sam_run.rho_schedule is not None:
            trainer.sam_run.rho_schedule.bounds = tuple(state["rho_lr_bounds"])
    tensors = tensor_state_file(checkpoint, trainer.args.process_index)
    if os.path.isfile(tensors):
        trainer.sam_run.pending_state = torch.load(tensors, weights_only=True)
