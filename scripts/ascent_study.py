#!/usr/bin/env python
"""The ascent-steps study (same as `hf-sam study`); works under `accelerate launch` with one process."""

import sys

from hf_sam.study.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
