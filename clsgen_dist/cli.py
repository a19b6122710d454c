"""Command-line entry points shared by the thin scripts in ``launch/``.

User errors (bad config, bad data, missing files) print one ``error:`` line and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "launch" / "configs" / "default.yaml"


def _user_error_types() -> tuple:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.reading import DataError
    from .metrics import MetricError

    types = [ConfigError, DataError, CheckpointError, MetricError]
    try:
        from .assets import AssetError

        types.append(AssetError)
    except ImportError:
        pass
    return tuple(types)


@contextmanager
def user_errors():
    try:
        yield
    except _user_error_types() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def train_main(argv: list[str] | None = None) -> int:
    p = _parser("Train (and evaluate) a CLSGen dual-head model. With no --config: the embedded default "
                "(SmolLM2-135M-Instruct on Rotten Tomatoes).")
    p.add_argument("--config", default=None, help="YAML run config (default: launch/configs/default.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=10")
    args = p.parse_args(argv)
    with user_errors():
        from .config import dump_config, load_config

        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from .train import run

        run(cfg)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = _parser("Evaluate a CLSGen checkpoint on a labelled file (sharded over ranks under any launcher).")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (e.g. outputs/run/final)")
    p.add_argument("--data", required=True, help="labelled JSONL/CSV/Parquet file or saved dataset")
    p.add_argument("--output", required=True, help="folder for metrics.json and predictions.jsonl")
    p.add_argument("--dev", default=None, help="labelled dev file to tune the F1 threshold on")
    p.add_argument("--explain-limit", type=int, default=None, help="generate explanations for the first N "
                   "examples (-1 = all; default: the checkpoint's eval.explain_limit)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    args = p.parse_args(argv)
    with user_errors():
        from .evaluate_cli import run_eval

        metrics = run_eval(args)
        if metrics is not None:
            print({k: metrics[k] for k in ("n", "auroc", "f1", "accuracy", "brier") if k in metrics})
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    p = _parser("Probability and explanation for texts, from one prefill each.")
    p.add_argument("--checkpoint", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", action="append", help="a text to classify (repeatable)")
    g.add_argument("--data", help="a file with a text column (labels optional)")
    p.add_argument("--no-explain", action="store_true", help="probability only (no generation)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--output", default=None, help="write JSONL here instead of printing")
    args = p.parse_args(argv)
    with user_errors():
        import json

        from .data.reading import read_examples
        from .predict import CLSGen

        m = CLSGen.from_pretrained(args.checkpoint)
        if args.data:
            d = m.cfg.data
            exs = read_examples(args.data, text_field=d.text_field, label_field=d.label_field, id_field=d.id_field,
                                explanation_field=None, label_names=d.label_names, require_label=False)
            ids, texts = [e.id for e in exs], [e.text for e in exs]
        else:
            ids, texts = [str(i) for i in range(len(args.text))], args.text
        res = m.predict(texts, explain=not args.no_explain, max_new_tokens=args.max_new_tokens)
        rows = [{"id": i, **r} for i, r in zip(ids, res)]
        if args.output:
            from .evaluate import write_jsonl_atomic

            write_jsonl_atomic(Path(args.output), rows)
        else:
            for r in rows:
                print(json.dumps(r, ensure_ascii=False))
    return 0
