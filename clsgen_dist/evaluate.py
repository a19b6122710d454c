"""Evaluation under any launcher: each rank scores a shard (examples ``i % world == rank``), results
are gathered on every rank and rank 0 writes them. No example is dropped or counted twice."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .data import PromptEncoder, eval_batches
from .data.prompts import Encoded
from .fileio import write_json_atomic, write_jsonl_atomic
from .distributed import (all_gather_objects, all_ranks_done, all_reduce_sum, is_main, max_over_ranks, rank,
                          world_size)
from .distributed.engine import is_partitioned
from .metrics import classification_metrics, tune_threshold
from .predict import parse_verdict, prefill_and_decode, sigmoid

log = logging.getLogger("clsgen_dist.evaluate")


class EvalStopped(Exception):
    """A stop (signal or ``STOP`` file) was requested during an evaluation given a ``stop`` flag."""


def check_stop(stop, device) -> None:
    """Raise :class:`EvalStopped` on every rank if ``stop`` (a :class:`~clsgen_dist.resume.StopFlag`,
    or None: never) is requested on any rank. Collective when ``stop`` is given: all ranks call it
    at the same points (once per batch of the lock-stepped loops below)."""
    if stop is None:
        return
    if all_reduce_sum(torch.tensor([float(stop.requested)], device=device)).item() > 0:
        raise EvalStopped


@torch.no_grad()
def score_encoded(model, encoded: list[Encoded], *, max_tokens: int, stop=None) -> dict[int, float]:
    """P(y=1) for every encoded example (keyed by ``Encoded.index``), sharded over ranks and
    gathered. Uses the packed forward: no padding, no generation. ``stop``: see :func:`check_stop`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = eval_batches(encoded, max_tokens, rank=rank(), world_size=world_size())
    n = max_over_ranks(len(batches), device)
    probs: dict[int, float] = {}
    for k in range(n):
        check_stop(stop, device)
        b = batches[k] if k < len(batches) else (batches[0] if batches else None)
        if b is None:  # this rank has no examples at all but must join the collective forward
            b = eval_batches(encoded[:1], max_tokens)[0]
        b = b.to(device)
        logits = model.cls_logits(b.input_ids, b.position_ids, b.cls_index, b.cu_seqlens, b.max_seqlen)
        if k < len(batches):
            for idx, lg in zip(b.example_index.tolist(), logits.tolist()):
                probs[idx] = sigmoid(lg)
    merged: dict[int, float] = {}
    for part in all_gather_objects(probs):
        for idx, p in part.items():
            if idx in merged:
                raise RuntimeError(f"example {idx} was scored on two ranks")
            merged[idx] = p
    model.train(was_training)
    return merged


@torch.no_grad()
def explain_examples(model, encoder: PromptEncoder, texts: dict[int, str], *, tokenizer, max_new_tokens: int,
                     batch_size: int, stop=None) -> dict[int, str]:
    """Generated explanations for ``texts`` (index → text), sharded over ranks and gathered.
    ``stop``: see :func:`check_stop`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = sorted(i for i in texts if i % world_size() == rank())
    chunks = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    n = max_over_ranks(len(chunks), device)
    lockstep = world_size() > 1 and is_partitioned(model)
    all_done = (lambda local: all_ranks_done(local, device)) if lockstep else None  # collective forwards

    out: dict[int, str] = {}
    first = next(iter(texts)) if texts else None
    t0 = last = time.monotonic()
    for k in range(n):
        check_stop(stop, device)
        if is_main() and time.monotonic() - last > 30:  # generation of a full split takes minutes on CPU
            last = time.monotonic()
            log.info("explaining: %d/%d batches of %d on this rank, %.0f s", k, n, batch_size, last - t0)
        idxs = chunks[k] if k < len(chunks) else []
        prompts = [encoder.encode_prompt(texts[i])[0] for i in idxs] or [encoder.encode_prompt(texts[first])[0]]
        _, gen = prefill_and_decode(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                    pad_id=tokenizer.pad_token_id, explain=True, all_done=all_done)
        for i, g in zip(idxs, gen):
            out[i] = tokenizer.decode(g, skip_special_tokens=True).strip()
    merged: dict[int, str] = {}
    for part in all_gather_objects(out):
        merged.update(part)
    model.train(was_training)
    return merged


def evaluate_split(model, tokenizer, encoder: PromptEncoder, examples, *, cfg, explain_limit: int,
                   dev_threshold: float | None = None, prob_source: str = "head",
                   stop=None) -> tuple[dict, list[dict]]:
    """Metrics and per-example predictions for a split of :class:`Example` (all ranks call this).

    ``prob_source`` (see :mod:`clsgen_dist.baselines`): ``head`` — the classification head;
    ``explanation`` — the verdict tokens after the model's own explanation (gen-only; every example
    is explained); ``prompt`` — the verdict tokens right after the prompt (zero-shot). Every source
    works with a whole model per rank and a ZeRO-3-partitioned one (the trainer's evaluation,
    ``launch/eval.py --ds-config``): the forwards are lock-stepped across ranks. ``stop`` (the trainer's final
    evaluation): :class:`EvalStopped` between batches once a stop is requested.
    Explanation metrics (verdict parse rate, alignment AUROC and kappa of the probability vs the
    parsed verdict, readability) cover the explained examples."""
    from .baselines import explanation_body, verdict_probs
    from .metrics import explanation_metrics

    if prob_source not in ("head", "explanation", "prompt"):
        raise ValueError(f"prob_source: expected head, explanation or prompt, got {prob_source!r}")
    limit = len(examples) if explain_limit < 0 or prob_source == "explanation" else min(explain_limit, len(examples))
    expl = {}
    if limit:
        expl = explain_examples(model, encoder, {i: examples[i].text for i in range(limit)}, tokenizer=tokenizer,
                                max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, stop=stop)
    max_tokens = cfg.data.max_seq_len * max(1, cfg.train.micro_batch_size)
    if prob_source == "head":
        encoded = [encoder.encode(ex.text, ex.label, None, index=i) for i, ex in enumerate(examples)]
        probs = score_encoded(model, encoded, max_tokens=max_tokens, stop=stop)
        cut = [e.truncated for e in encoded]  # documents cut to data.max_seq_len
    else:
        cut = [encoder.encode_prompt(ex.text)[1] for ex in examples]
        texts = {i: ex.text for i, ex in enumerate(examples)}
        probs = verdict_probs(model, tokenizer, encoder, texts, expl if prob_source == "explanation" else None,
                              max_tokens=max_tokens)
    labels = [ex.label for ex in examples]
    p = [probs[i] for i in range(len(examples))]
    metrics = classification_metrics(labels, p, tuned_threshold=dev_threshold)
    metrics["prob_source"] = prob_source
    metrics["truncated"] = sum(cut)
    names, tmpl = cfg.data.label_names, cfg.data.verdict_template
    preds = []
    for i, ex in enumerate(examples):
        e = expl.get(i)
        preds.append({"id": ex.id, "label": ex.label, "prob": p[i], "pred": int(p[i] >= 0.5), "explanation": e,
                      "verdict": parse_verdict(e, names, tmpl) if e is not None else None, "truncated": cut[i]})
    if limit:
        em = explanation_metrics(p[:limit], [r["verdict"] for r in preds[:limit]],
                                 [explanation_body(r["explanation"], tmpl) for r in preds[:limit]])
        note = em.pop("note", None)
        metrics.update(em)
        if note:
            metrics["note"] = f"{metrics['note']}; {note}" if metrics.get("note") else note
    return metrics, preds


def dev_threshold(model, encoder, examples, *, cfg, stop=None) -> float:
    encoded = [encoder.encode(ex.text, ex.label, None, index=i) for i, ex in enumerate(examples)]
    probs = score_encoded(model, encoded, max_tokens=cfg.data.max_seq_len * max(1, cfg.train.micro_batch_size),
                          stop=stop)
    return tune_threshold([ex.label for ex in examples], [probs[i] for i in range(len(examples))])


def write_results(out_dir: str | Path, metrics: dict, preds: list[dict]) -> None:
    if not is_main():
        return
    out = Path(out_dir)
    write_jsonl_atomic(out / "predictions.jsonl", preds)
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence means the folder is complete
