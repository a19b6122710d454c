"""Baselines in the CLSGen framework, and where each one's probability comes from.

============  ====================================  ==================================================
mode          training                              P(y=1)
============  ====================================  ==================================================
``clsgen``    both terms                            classification head (prefill of the prompt)
``cls_only``  ``train.lm_weight=0`` (discriminative) classification head
``gen_only``  ``train.cls_weight=0`` (SFT)          verdict tokens after the model's own explanation
``zero_shot`` none (the base model, prompted)       verdict tokens right after the prompt
============  ====================================  ==================================================

**Verdict-token probability.** The verdict line ``data.verdict_template`` is tokenized for both label
names exactly as training tokenizes it; the two token sequences share a prefix (``Verdict:``) and
then differ (`` negative`` / `` positive``). With ``s_k`` the tokens of label ``k`` after the shared
prefix and ``ctx`` the context,

    logit = log P(s_1 | ctx) - log P(s_0 | ctx),   P(y=1) = sigmoid(logit) = P(s_1) / (P(s_0) + P(s_1))

(teacher-forced; for single-token label names, the two-way softmax of the label tokens' logits).

* ``zero_shot``: ``ctx`` = prompt + shared prefix.
* ``gen_only``: the explanation is decoded greedily first; ``ctx`` = prompt + the explanation's
  text before its last verdict prefix (re-tokenized as training tokenizes ``explanation + "\\n"``)
  + the shared prefix. If no verdict prefix was generated, the prefix is appended to the whole text.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from .distributed import all_gather_objects, max_over_ranks, rank, world_size
from .predict import sigmoid

MODES = ("clsgen", "cls_only", "gen_only", "zero_shot")
PROB_SOURCE = {"clsgen": "head", "cls_only": "head", "gen_only": "explanation", "zero_shot": "prompt"}
"""Where each mode's probability comes from: the classification ``head``, the verdict tokens after
the model's ``explanation``, or the verdict tokens right after the ``prompt``."""
TRAIN_OVERRIDES = {"clsgen": [], "cls_only": ["train.lm_weight=0"], "gen_only": ["train.cls_weight=0"]}


def resolve_mode(mode: str, cfg) -> str:
    """``auto`` → the mode the checkpoint was trained as (from its loss weights)."""
    if mode != "auto":
        if mode not in MODES:
            raise ValueError(f"mode: expected auto or one of {', '.join(MODES)}, got {mode!r}")
        return mode
    if cfg.train.cls_weight == 0:
        return "gen_only"
    return "cls_only" if cfg.train.lm_weight == 0 else "clsgen"


def verdict_tokens(tokenizer, label_names: Sequence[str], verdict_template: str) -> tuple[list[int], list[list[int]]]:
    """(shared prefix ids, [ids of label 0 after it, ids of label 1 after it]) of the verdict line,
    tokenized alone, as :meth:`PromptEncoder.encode` does."""
    lines = [tokenizer(verdict_template.format(label=n), add_special_tokens=False)["input_ids"] for n in label_names]
    c = 0
    while c < min(map(len, lines)) and lines[0][c] == lines[1][c]:
        c += 1
    if c == min(map(len, lines)):
        raise ValueError(f"the verdict lines of {list(label_names)} tokenize so that one is a prefix of the other; "
                         f"choose label names that differ in their first token")
    return lines[0][:c], [lines[0][c:], lines[1][c:]]


def verdict_prefix_text(verdict_template: str) -> str:
    return verdict_template.split("{label}")[0].strip()


def explanation_body(text: str, verdict_template: str) -> str:
    """The explanation without its verdict: the text before the last verdict prefix (the whole text
    when there is none), stripped."""
    head = verdict_prefix_text(verdict_template)
    if not head:
        return text.strip()
    hits = [m.start() for m in re.finditer(re.escape(head), text, flags=re.IGNORECASE)]
    return (text[: hits[-1]] if hits else text).strip()


def verdict_context(tokenizer, prompt: list[int], prefix: list[int], explanation: str | None,
                    verdict_template: str) -> list[int]:
    """prompt [+ explanation body + "\\n"] + shared verdict prefix."""
    body = explanation_body(explanation, verdict_template) if explanation else ""
    # split_special_tokens: as PromptEncoder tokenizes explanations in training
    ids = tokenizer(body + "\n", add_special_tokens=False, split_special_tokens=True)["input_ids"] if body else []
    return list(prompt) + ids + list(prefix)


@torch.no_grad()
def verdict_logits(model, contexts: list[list[int]], suffixes: list[list[int]], *, max_tokens: int = 4096,
                   lockstep: bool = True) -> list[float]:
    """``log P(suffixes[1] | ctx) - log P(suffixes[0] | ctx)`` for every context, teacher-forced,
    with packed forwards of ``model`` (a :class:`DualHeadModel`; no padding, no cross-example
    attention). Only the rows that predict suffix tokens go through the LM head, in one call per
    packed forward. Every rank runs as many forwards (and LM-head calls) as the busiest one, padding
    with a throw-away sequence, since under ZeRO-3 each is a collective parameter gather; a rank may
    pass no contexts at all. ``lockstep=False``: this process alone (no collective call)."""
    single = all(len(s) == 1 for s in suffixes)
    # one sequence per context if both suffixes are one token, else one per (context, label)
    seqs, reads = [], []  # reads[j] = (context index, label or None)
    for i, c in enumerate(contexts):
        if single:
            seqs.append(list(c))
            reads.append((i, None))
        else:
            for k, s in enumerate(suffixes):
                seqs.append(list(c) + list(s[:-1]))
                reads.append((i, k))
    groups: list[list[int]] = []  # consecutive sequences packed up to max_tokens (at least one each)
    filled = 0  # tokens in groups[-1]
    for j, sq in enumerate(seqs):
        if groups and filled + len(sq) <= max_tokens:
            groups[-1].append(j)
            filled += len(sq)
        else:
            groups.append([j])
            filled = len(sq)
    device = next(model.parameters()).device
    n_forwards = max_over_ranks(len(groups), device) if lockstep else len(groups)
    dummy = [suffixes[0][0]]
    lp = np.zeros((len(contexts), 2))
    for step in range(n_forwards):
        group = groups[step] if step < len(groups) else None
        packed = [seqs[g] for g in group] if group else [dummy]
        ids = torch.tensor([t for sq in packed for t in sq], device=device)[None]  # [1, T]
        pos = torch.tensor([p for sq in packed for p in range(len(sq))], device=device)[None]
        lens = torch.tensor([len(sq) for sq in packed])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(device=device, dtype=torch.int32)
        hidden = model.hidden_states(ids, pos, cu, int(lens.max()))  # [T, H]
        starts = cu[:-1].tolist()
        rows, spans = [], []  # hidden rows that predict suffix tokens; per sequence its slice of them
        for g, st in zip(group or [], starts):
            i, k = reads[g]
            n_read = 1 if single else len(suffixes[k])
            first = st + len(contexts[i]) - 1  # the last context position predicts the first suffix token
            spans.append((len(rows), n_read))
            rows.extend(range(first, first + n_read))
        logp = model.lm_logits(hidden[rows or [0]]).float().log_softmax(-1)  # [R, V]
        for g, (r0, n_read) in zip(group or [], spans):
            i, k = reads[g]
            if single:
                lp[i, 0], lp[i, 1] = logp[r0, suffixes[0][0]].item(), logp[r0, suffixes[1][0]].item()
            else:
                tok = torch.tensor(suffixes[k], device=device)[:, None]
                lp[i, k] = logp[r0:r0 + n_read].gather(1, tok).sum().item()
    return (lp[:, 1] - lp[:, 0]).tolist()


def verdict_probs(model, tokenizer, encoder, texts: dict[int, str], explanations: dict[int, str] | None, *,
                  max_tokens: int = 4096, shard: bool = True) -> dict[int, float]:
    """P(y=1) from the verdict tokens for every ``texts`` entry (index → document), after the prompt
    (``explanations=None``: zero-shot) or after the model's explanation of it (gen-only). Sharded
    over ranks (``i % world == rank``) and gathered; the model may be whole on every rank or
    ZeRO-3-partitioned (the trainer's own evaluation, ``launch/eval.py --ds-config``): the forwards
    are lock-stepped. ``shard=False``: all of ``texts`` on this process alone (no collective call)."""
    prefix, suffixes = verdict_tokens(tokenizer, encoder.label_names, encoder.verdict_template)
    mine = sorted(i for i in texts if not shard or i % world_size() == rank())
    contexts = [verdict_context(tokenizer, encoder.encode_prompt(texts[i])[0], prefix,
                                None if explanations is None else explanations.get(i), encoder.verdict_template)
                for i in mine]
    was_training = model.training
    model.eval()
    logits = verdict_logits(model, contexts, suffixes, max_tokens=max_tokens, lockstep=shard)  # every rank joins
    model.train(was_training)
    local = dict(zip(mine, map(sigmoid, logits)))
    merged: dict[int, float] = {}
    for part in all_gather_objects(local) if shard else [local]:
        merged.update(part)
    return merged


def zero_shot_config(cfg):
    """``cfg`` for prompting the base model: no ``<|cls|>`` token (``model.cls_position=token`` is a
    training setting; the base model never saw that token, and zero-shot reads the verdict tokens
    right after the prompt)."""
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cls_position="last_prompt"))


def load_base_model(cfg, device, *, ds_config: dict | None = None, check: bool = True):
    """The untrained base model of ``cfg`` as a DualHeadModel (its classification head is unused)
    and its tokenizer, for zero-shot prompting (use it with :func:`zero_shot_config`).
    ``ds_config`` (a ZeRO-3 JSON; collective): partitioned over the ranks under a DeepSpeed
    inference engine, as :func:`~clsgen_dist.checkpoint.load_checkpoint` does.

    ``check``: the backbone must pass :func:`~clsgen_dist.modeling.build.check_backbone` (a
    ConfigError otherwise), since zero-shot scoring packs several prompts per forward and reads the
    LM logits as training does; a model that leaks one packed example into the next would score
    every prompt after the first of a row wrongly. ``check=False`` for a caller that runs the
    causal LM itself, one sequence per forward (the language-retention base)."""
    from transformers import AutoModelForCausalLM

    from .modeling import DualHeadModel, load_tokenizer, resolve_model_path
    from .distributed.engine import inference_ds_config, is_partitioned
    from .modeling.build import (check_backbone, check_model_folder, place_for_inference, resolve_attn,
                                 resolve_dtype, zero3_loading)

    check_model_folder(cfg.model.name_or_path)
    device = torch.device(device)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    dtype = resolve_dtype(cfg.model.dtype, device)
    zero3 = inference_ds_config(ds_config, dtype)
    with zero3_loading(zero3):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=resolve_attn(
            cfg.model.attn_implementation, device, dtype))
    model = DualHeadModel(lm, **cfg.model.loss_options())
    place_for_inference(model, zero3, device)
    if check:  # on the device (a whole model was just moved there), or gathered by the inference engine
        check_backbone(model.causal_lm, path, partitioned=is_partitioned(model))
    return model.eval(), tokenizer
