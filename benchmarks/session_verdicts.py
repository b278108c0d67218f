#!/usr/bin/env python
"""The GPU session's outcome from its output folder: each part's verdict line (the last line of its file),
and whether the folder keeps to the session's 8 files (the most the device tool brings back). Exits 1 if a
part is missing, failed, or the folder holds more than 8 files.

    python benchmarks/session_verdicts.py gpu_out
"""

from __future__ import annotations

import sys
from pathlib import Path

PARTS = {
    "versions": "versions.txt",
    "precision": "precision.txt",
    "precision_measure": "precision_measure.txt",
    "sync": "sync.txt",
    "bench": "bench.txt",
    "profile": "profile.txt",
    "fsdp2": "fsdp2.txt",
    "deepspeed": "deepspeed.txt",
}
MAX_FILES = 8


def verdicts(folder: Path) -> dict[str, str]:
    """Each part's last line, or a FAIL line where its file is missing or empty."""
    out = {}
    for name, file in PARTS.items():
        path = folder / file
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        out[name] = lines[-1] if lines else f"FAIL {name}: no output ({file} missing or empty)"
    return out


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "gpu_out")
    found = verdicts(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    failed = [name for name, line in found.items() if not line.startswith(f"OK {name}:")]
    print(f"# {len(found) - len(failed)} of {len(found)} parts OK; {len(files)} files in {folder}")
    for line in found.values():
        print(line)
    if len(files) > MAX_FILES:
        print(f"FAIL session: {len(files)} files, more than {MAX_FILES}: {files}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
