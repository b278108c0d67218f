"""What every part of the GPU session shares: the dry-run switch, the device, the verdict line, and the
guard that a block of code makes no host sync.

``HF_SAM_GPU_DRY_RUN=1`` runs each GPU script on the CPU with tiny models and a few steps, through the
same code and into the same output files, so a script that would crash on a GPU fails here first (CI
runs the whole session this way). A dry run's numbers mean nothing; its verdict lines say it ran.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

DRY_RUN = os.environ.get("HF_SAM_GPU_DRY_RUN", "") not in ("", "0")
DEVICE = "cpu" if DRY_RUN else "cuda"
TAG = " (dry run, CPU)" if DRY_RUN else ""


def verdict(part: str, ok: bool, what: str) -> int:
    """Print the part's last line, ``OK part: what`` or ``FAIL part: what``; returns the exit status."""
    print(f"{'OK' if ok else 'FAIL'} {part}: {what}{TAG}", flush=True)
    return 0 if ok else 1


def device_ready(part: str) -> bool:
    """True where the part can run: a CUDA device, or a dry run (which prints its FAIL line otherwise)."""
    if DRY_RUN or torch.cuda.is_available():
        return True
    verdict(part, False, "no CUDA device (HF_SAM_GPU_DRY_RUN=1 runs it on the CPU)")
    return False


def device_name() -> str:
    if DRY_RUN:
        return "CPU (dry run)"
    return torch.cuda.get_device_name()


def synchronize() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


class HostSyncError(RuntimeError):
    """A synchronizing call (on the CPU: a read of a tensor's value) inside a guarded block."""


@contextlib.contextmanager
def no_host_sync():
    """Raise on any synchronizing call inside: CUDA's sync debug mode on a GPU; on the CPU, the reads of
    tensor values the host makes (benchmarks/host_reads.py), which are what would sync there."""
    if not DRY_RUN:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        except RuntimeError as error:
            raise HostSyncError(str(error).splitlines()[0]) from error
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from host_reads import counting_host_reads

    with counting_host_reads() as counter:
        yield
    if counter.reads:
        raise HostSyncError(f"host read(s) {counter.reads}")


@contextlib.contextmanager
def counting_syncs():
    """Count the synchronizing calls inside (``.count`` on the yielded object): CUDA's "warn" mode on a GPU,
    the host reads on the CPU."""

    class Count:
        count = 0

    found = Count()
    if DRY_RUN:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from host_reads import counting_host_reads

        with counting_host_reads() as counter:
            yield found
        found.count = len(counter.reads)
        return
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.count = sum("synchroniz" in str(w.message) for w in caught)


def gloo_state_for_deepspeed() -> None:
    """accelerate picks no process group for DeepSpeed without CUDA: make a gloo one first (the recipe of
    ../shared/TRAINER_NOTES.md, "DeepSpeed on a CPU"); the Trainer then needs
    ``accelerator_config={"use_configured_state": True}``."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def launch_workers(script: str, modes: list[str], env: dict[str, str]) -> list[str]:
    """Run ``script --worker MODE`` once per mode under torchrun with one process (the launch a GPU run
    uses), its output streamed here line by line (a part cut at its time limit still shows how far each
    launch got); returns one line per launch that failed, its last line of output."""
    import subprocess

    errors = []
    for mode in modes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", script, "--worker", mode]
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        last = ""
        for line in proc.stdout:
            print(f"[{mode}] {line}", end="", flush=True)
            last = line.strip() or last
        if proc.wait():
            errors.append(f"{mode} run: {last}")
    return errors


def comparison_verdict(part: str, errors: list[str], ok: bool, what: str) -> int:
    """The verdict of a check that compares launches: their errors if any failed, else ``what``."""
    return verdict(part, ok and not errors, "; ".join(errors) if errors else what)
