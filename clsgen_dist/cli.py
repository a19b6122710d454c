"""Command-line entry points shared by the thin scripts in ``launch/``.

User errors (bad config, bad data, missing files) print one ``error:`` line and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from .fileio import check_output_path

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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def _checked_type(convert, ok, expected: str):
    """argparse ``type``: ``convert(text)`` for which ``ok(value)`` holds, else a usage error naming
    the flag: ``expected {expected}, got 'TEXT'``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # NaN fails every check
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def int_at_least(minimum: int):
    """argparse ``type``: an integer >= ``minimum``."""
    return _checked_type(int, lambda value: value >= minimum, f"an integer >= {minimum}")


def number(ok, expected: str):
    """argparse ``type``: a number (float) for which ``ok(value)`` holds; ``expected`` says which,
    e.g. ``number(lambda x: 0 < x <= 1, "in (0, 1]")``."""
    return _checked_type(float, ok, f"a number {expected}")


BASE_MODEL_HELP = ("the run's base model folder, if not where its config says (the same model, moved or on another "
                   "machine): a LoRA/QLoRA adapter loads on it")


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
    args = p.parse_intermixed_args(argv)  # key=value overrides may sit anywhere among the flags
    with user_errors():
        from .config import load_config

        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from .distributed import shutdown_distributed
        from .train import run

        run(cfg)
        shutdown_distributed()
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = _parser("Evaluate a CLSGen checkpoint on a labelled file (sharded over ranks under any launcher): "
                "metrics.json, predictions.jsonl, report.md/.html and plots.")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (e.g. outputs/run/final); required "
                   "except with --mode zero_shot, which can take --config instead")
    p.add_argument("--base-model", default=None, help=BASE_MODEL_HELP)
    p.add_argument("--data", default=None, help="labelled JSONL/CSV/Parquet file or saved dataset (default: the "
                   "test split of the run config)")
    p.add_argument("--output", required=True, help="folder for metrics.json, predictions.jsonl and the report")
    p.add_argument("--dev", default=None, help="labelled dev file: tunes the F1 threshold and fits the temperature "
                   "(default with no --data: the run config's dev split)")
    p.add_argument("--mode", default="auto", choices=["auto", "clsgen", "cls_only", "gen_only", "zero_shot"],
                   help="where P(y=1) comes from (auto: from the checkpoint's loss weights): the classification "
                   "head (clsgen, cls_only), the verdict tokens after the model's own explanation (gen_only), or "
                   "the base model's verdict tokens right after the prompt (zero_shot)")
    p.add_argument("--config", default=None, help="with --mode zero_shot and no --checkpoint: the run config whose "
                   "base model, prompt and data are used (default: launch/configs/default.yaml)")
    p.add_argument("--explain-limit", type=int_at_least(-1), default=None, help="generate explanations for the "
                   "first N examples (-1 = all; default: the checkpoint's eval.explain_limit; gen_only explains all)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N examples")
    p.add_argument("--dev-limit", type=int_at_least(1), default=None, help="use only the first N dev examples")
    p.add_argument("--text-field", default=None,
                   help="text column of --data/--dev (default: the run's data.text_field)")
    p.add_argument("--label-field", default=None,
                   help="label column of --data/--dev (default: the run's data.label_field)")
    p.add_argument("--id-field", default=None, help="id column of --data/--dev (default: the run's data.id_field)")
    p.add_argument("--ppl-tokens", type=int_at_least(0), default=4096, help="tokens of general English text for "
                   "the perplexity ratio against the base model (0 = skip)")
    p.add_argument("--bootstrap", type=int_at_least(0), default=1000,
                   help="bootstrap resamples for the 95%% intervals (0 = none)")
    p.add_argument("--ds-config", default=None, help="a ZeRO-3 DeepSpeed JSON (e.g. ds_configs/zero3.json): build "
                   "the model partitioned over the ranks, as training does, for a model that does not fit one "
                   "GPU (default: a whole model per rank)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config only)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may sit anywhere among the flags
    with user_errors():
        from .evaluate_cli import run_eval

        check_output_path(args.output, folder=True)
        if args.overrides and args.checkpoint:
            from .config import ConfigError

            raise ConfigError("key=value overrides apply to --config (zero-shot) only, not to a checkpoint")
        if args.config and args.checkpoint:
            from .config import ConfigError

            raise ConfigError("--config applies to --mode zero_shot without --checkpoint; a checkpoint evaluates "
                              "with its own config")
        if args.config is None and args.checkpoint is None:
            args.config = str(DEFAULT_CONFIG)
        from .distributed import is_main, shutdown_distributed

        metrics = run_eval(args)
        if metrics is not None and is_main():
            print({k: metrics[k] for k in ("mode", "n", "auroc", "f1", "accuracy", "brier", "ece", "kappa",
                                           "perplexity_ratio") if k in metrics})
        shutdown_distributed()
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    p = _parser("Probability and explanation for texts, from one prefill each (sharded over ranks under any "
                "launcher; rank 0 writes).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--base-model", default=None, help=BASE_MODEL_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", action="append", help="a text to classify (repeatable)")
    g.add_argument("--data", help="a file with a text column (any label column is ignored)")
    p.add_argument("--text-field", default=None, help="--data's text column (default: the run's data.text_field)")
    p.add_argument("--id-field", default=None, help="--data's id column (default: the run's data.id_field)")
    p.add_argument("--no-explain", action="store_true", help="probability only (no generation)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None)
    p.add_argument("--output", default=None, help="write JSONL here instead of printing")
    p.add_argument("--ds-config", default=None, help="a ZeRO-3 DeepSpeed JSON (e.g. ds_configs/zero3.json): build "
                   "the model partitioned over the ranks, for a model that does not fit one GPU (default: a whole "
                   "model per rank)")
    args = p.parse_args(argv)
    with user_errors():
        import json

        from .config import ConfigError
        from .data.reading import read_examples
        from .predict import CLSGen

        if args.output:
            check_output_path(args.output, folder=False)
        for i, t in enumerate(args.text or []):
            if not t.strip():
                raise ConfigError(f"--text number {i + 1} is empty; expected the text to classify")
        from .distributed.engine import load_inference_ds_config

        ds_config = load_inference_ds_config(args.ds_config)  # before any process group
        from .checkpoint import check_checkpoint

        run_cfg = check_checkpoint(args.checkpoint, base_model=args.base_model)  # before any process group
        d = run_cfg.data
        if args.data:  # read (and checked) before the model loads; labels are not needed to predict
            exs = read_examples(args.data, text_field=args.text_field or d.text_field, label_field=None,
                                id_field=args.id_field or d.id_field, explanation_field=None,
                                label_names=d.label_names, require_label=False)
            ids, texts = [e.id for e in exs], [e.text for e in exs]
        else:
            ids, texts = [str(i) for i in range(len(args.text))], args.text
        from .distributed import init_distributed, is_main, shutdown_distributed
        from .distributed.env import launched_world_size

        launched = launched_world_size() > 1 or ds_config is not None
        device = init_distributed() if launched else None  # under a launcher: this rank's device
        if launched:
            from .logs import setup_logging

            setup_logging()
        m = CLSGen.from_pretrained(args.checkpoint, base_model=args.base_model, device=device, ds_config=ds_config,
                                   checked=run_cfg)
        res = m.predict(texts, explain=not args.no_explain, max_new_tokens=args.max_new_tokens, shard=launched)
        rows = [{"id": i, **r} for i, r in zip(ids, res)]
        if is_main() and args.output:
            from .fileio import write_jsonl_atomic

            write_jsonl_atomic(Path(args.output), rows)
        elif is_main():
            for r in rows:
                print(json.dumps(r, ensure_ascii=False))
        shutdown_distributed()
    return 0
