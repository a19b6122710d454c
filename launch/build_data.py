#!/usr/bin/env python
"""Thin entry point; see `python launch/build_data.py --help`. Works under python, torchrun and deepspeed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clsgen_dist.construct_cli import build_data_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(build_data_main())
