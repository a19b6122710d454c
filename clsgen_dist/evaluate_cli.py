"""``launch/eval.py``: evaluate a checkpoint under any launcher (each rank a shard)."""

from __future__ import annotations

from .checkpoint import check_checkpoint, load_checkpoint
from .data.reading import read_examples
from .distributed import init_distributed
from .logs import setup_logging
from .evaluate import dev_threshold, evaluate_split, write_results
from .predict import make_encoder


def run_eval(args) -> dict:
    check_checkpoint(args.checkpoint)  # user errors first, before any process group exists
    device = init_distributed()
    setup_logging()
    model, tokenizer, cfg = load_checkpoint(args.checkpoint, device=device)
    if args.max_new_tokens is not None:
        cfg.eval.max_new_tokens = args.max_new_tokens
    d = cfg.data
    read = lambda path, limit=None: read_examples(  # noqa: E731
        path, text_field=d.text_field, label_field=d.label_field, explanation_field=None, id_field=d.id_field,
        label_names=d.label_names, limit=limit)
    examples = read(args.data, args.limit)
    encoder = make_encoder(cfg, tokenizer)
    thr = dev_threshold(model, encoder, read(args.dev), cfg=cfg) if args.dev else None
    limit = cfg.eval.explain_limit if args.explain_limit is None else args.explain_limit
    metrics, preds = evaluate_split(model, tokenizer, encoder, examples, cfg=cfg, explain_limit=limit,
                                    dev_threshold=thr)
    write_results(args.output, metrics, preds)
    return metrics
