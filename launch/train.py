#!/usr/bin/env python
"""Thin entry point; see `python launch/train.py --help`. Works under python, torchrun and deepspeed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clsgen_dist.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
