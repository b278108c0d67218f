"""The ``hf-sam`` command: ``hf-sam study ...`` (the ascent-steps study)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-sam study [options]   (hf-sam study --help for the options)")
        return 0 if argv else 2
    if argv[0] != "study":
        print(f"hf-sam: unknown command {argv[0]!r}; the command is 'study'.", file=sys.stderr)
        return 2
    from .study.__main__ import main as study_main

    return study_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
