#!/usr/bin/env python
"""Thin entry point; see `python launch/export.py --help`. Merges a (Q)LoRA checkpoint into a 16-bit model:

    python launch/export.py --checkpoint outputs/run/final --output outputs/run/merged [--dtype float32]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clsgen_dist.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
