#!/usr/bin/env python
"""Thin entry point; see `python launch/compare.py --help`: CLSGen vs cls_only, gen_only and zero_shot,
same data, seed and step budget, one side-by-side table (OUT/compare.md, OUT/compare.json)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clsgen_dist.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
