"""``launch/eval.py``: evaluate a checkpoint (or, zero-shot, the base model) under any launcher —
each rank a shard — and write ``metrics.json``, ``predictions.jsonl`` and the report (rank 0)."""

from __future__ import annotations

import logging
from pathlib import Path

from .checkpoint import check_checkpoint, load_checkpoint
from .data.reading import read_examples
from .distributed import init_distributed, is_main
from .distributed.env import launched_rank
from .logs import setup_logging
from .evaluate import evaluate_split, write_results
from .predict import make_encoder

log = logging.getLogger("clsgen_dist.evaluate")


def _run_config(args):
    """The run config: the checkpoint's (checked, with ``--base-model``), or ``--config`` with its
    overrides for ``--mode zero_shot`` without a checkpoint. Read once, before any process group."""
    if args.checkpoint:
        return check_checkpoint(args.checkpoint, base_model=getattr(args, "base_model", None))
    if getattr(args, "mode", None) != "zero_shot":
        from .checkpoint import CheckpointError

        raise CheckpointError("--checkpoint is required (only --mode zero_shot can use --config instead)")
    from .config import load_config

    return load_config(args.config, getattr(args, "overrides", None) or [])


def _load(args, run_cfg, device, ds_config: dict | None = None):
    """(model, tokenizer, cfg, mode): the checkpoint, or the base model of its config (or of
    ``--config``) for ``--mode zero_shot``; partitioned over the ranks with ``ds_config``.
    ``run_cfg``: :func:`_run_config`'s (the checkpoint is not checked again)."""
    from .baselines import load_base_model, resolve_mode, zero_shot_config

    mode = resolve_mode(getattr(args, "mode", "auto") or "auto", run_cfg)
    if mode == "zero_shot":
        cfg = zero_shot_config(run_cfg)
        model, tokenizer = load_base_model(cfg, device, ds_config=ds_config)
    else:
        model, tokenizer, cfg = load_checkpoint(args.checkpoint, device=device,
                                                base_model=getattr(args, "base_model", None),
                                                ds_config=ds_config, checked=run_cfg)
    return model, tokenizer, cfg, mode


def _check_base_model(args, run_cfg) -> None:
    """The base model folder, where this evaluation loads it besides the checkpoint: zero-shot
    prompting, and the perplexity ratio of a fully fine-tuned checkpoint (a LoRA adapter's base is
    checked with the checkpoint). A ConfigError before any process group, not HF's tracebacks."""
    from .config import ConfigError
    from .modeling.build import check_model_folder

    zero_shot = getattr(args, "mode", None) == "zero_shot"
    full = args.checkpoint and not (Path(args.checkpoint) / "adapter_config.json").is_file()
    if not (zero_shot or (full and getattr(args, "ppl_tokens", 4096))):
        return
    if getattr(args, "base_model", None):
        what = "--base-model"
    elif args.checkpoint:
        what = f"model.name_or_path in {Path(args.checkpoint) / 'clsgen_config.yaml'}"
    else:
        what = "model.name_or_path"
    try:
        check_model_folder(run_cfg.model.name_or_path, what)
    except ConfigError as e:
        if zero_shot:
            raise
        raise ConfigError(f"{e} (it is the base of the perplexity ratio: pass its folder with --base-model, or "
                          f"--ppl-tokens 0 to skip the ratio)") from None


def default_eval_files(cfg) -> dict:
    """dev/test files of a run config: its own, else the embedded Rotten Tomatoes splits."""
    d = cfg.data
    files = {"dev": d.dev_file, "test": d.test_file}
    if d.train_file is None:
        from .assets import rotten_tomatoes_splits

        paths = rotten_tomatoes_splits(seed=cfg.train.seed, train_size=d.default_train_size,
                                       dev_size=d.default_dev_size, test_size=d.default_test_size)
        files = {k: files[k] or str(paths[k]) for k in files}
    return files


def run_eval(args) -> dict:
    from .baselines import PROB_SOURCE
    from .report import finalize_metrics, write_report
    from .retention import language_retention

    # user errors first (the checkpoint, the data), before any process group or model exists
    run_cfg = _run_config(args)
    _check_base_model(args, run_cfg)
    if launched_rank() == 0:  # metrics.json marks a complete folder: never leave an old one next to a new,
        (Path(args.output) / "metrics.json").unlink(missing_ok=True)  # partial report, nor after a failure
    d = run_cfg.data
    fields = {"text_field": getattr(args, "text_field", None) or d.text_field,
              "label_field": getattr(args, "label_field", None) or d.label_field,
              "id_field": getattr(args, "id_field", None) or d.id_field}
    read = lambda path, limit=None: read_examples(  # noqa: E731
        path, explanation_field=None, label_names=d.label_names, limit=limit, **fields)
    data, dev = args.data, args.dev
    if data is None:  # the run's own test split, tuned on the run's own dev split unless --dev says otherwise
        files = default_eval_files(run_cfg)
        data, dev = files["test"], dev or files["dev"]
        if data is None:
            from .config import ConfigError

            source = f"the checkpoint {args.checkpoint}" if args.checkpoint else f"the config {args.config}"
            raise ConfigError(f"--data is required: {source} names no test split (data.test_file) to evaluate on; "
                              f"pass --data FILE (a labelled JSONL/CSV/Parquet file or saved dataset)")
    examples = read(data, args.limit)
    dev_ex = read(dev, getattr(args, "dev_limit", None)) if dev else None
    from .distributed.engine import load_inference_ds_config

    ds_config = load_inference_ds_config(getattr(args, "ds_config", None))  # before any process group
    device = init_distributed()
    setup_logging()
    model, tokenizer, cfg, mode = _load(args, run_cfg, device, ds_config)
    if args.max_new_tokens is not None:
        cfg.eval.max_new_tokens = args.max_new_tokens
    encoder = make_encoder(cfg, tokenizer)
    source = PROB_SOURCE[mode]
    dev_labels = dev_probs = thr = None
    if dev:
        from .metrics import tune_threshold

        _, dev_preds = evaluate_split(model, tokenizer, encoder, dev_ex, cfg=cfg, explain_limit=0,
                                      prob_source=source)
        dev_labels, dev_probs = [r["label"] for r in dev_preds], [r["prob"] for r in dev_preds]
        thr = tune_threshold(dev_labels, dev_probs)
    limit = cfg.eval.explain_limit if args.explain_limit is None else args.explain_limit
    metrics, preds = evaluate_split(model, tokenizer, encoder, examples, cfg=cfg, explain_limit=limit,
                                    dev_threshold=thr, prob_source=source)
    ppl_tokens = getattr(args, "ppl_tokens", 4096)
    retention = (language_retention(model, tokenizer, cfg, max_tokens=ppl_tokens, is_base=mode == "zero_shot",
                                    ds_config=ds_config) if ppl_tokens else None)
    if is_main():
        metrics = {"mode": mode, **metrics}
        metrics, arrays = finalize_metrics(metrics, preds, dev_labels=dev_labels, dev_probs=dev_probs,
                                           retention=retention, n_resamples=getattr(args, "bootstrap", 1000),
                                           seed=cfg.train.seed)
        meta = {"checkpoint": args.checkpoint or f"base model of {args.config}", "mode": mode, "data": data,
                "dev": dev, "base model": cfg.model.name_or_path}
        write_report(args.output, metrics, preds, arrays, label_names=d.label_names, meta=meta)
    write_results(args.output, metrics, preds)  # metrics.json last: its presence marks a complete folder
    return metrics
