"""Inference: P(y=1) from the classification head and the explanation from the LM head, both from
one prefill of the prompt — the explanation is decoded from the same KV cache.

    from clsgen_dist import CLSGen
    m = CLSGen.from_pretrained("outputs/run/final")
    m.predict(["A moving, funny film."], explain=True)
    # [{"prob": 0.93, "label": 1, "explanation": "...\\nVerdict: positive", "verdict": 1}]
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from .data.prompts import PromptEncoder


def make_encoder(cfg, tokenizer) -> PromptEncoder:
    from .config import ConfigError

    d = cfg.data
    try:
        return PromptEncoder(tokenizer, instruction=d.instruction, label_names=d.label_names,
                             verdict_template=d.verdict_template, system_prompt=d.system_prompt,
                             max_seq_len=d.max_seq_len,
                             cls_token=cfg.model.cls_token if cfg.model.cls_position == "token" else None)
    except ValueError as e:  # the config does not fit this tokenizer's template
        raise ConfigError(str(e)) from None


# Scripts written without spaces between words (CJK, kana, full-width forms): a label name there is
# followed by more word characters ("正面的"), so it gets no word-boundary check on that side.
_UNSPACED = re.compile(r"[\u2e80-\u9fff\u3040-\u30ff\uf900-\ufaff\uff00-\uffef]")


def name_alternation(label_names: Sequence[str], *, hyphen: bool = False) -> str:
    """A regex group matching any of ``label_names`` as a whole word, longest name first (so that
    "toxic-free" is not read as "toxic", nor "C++" as "C"). ``hyphen``: a hyphen also joins words
    ("non-toxic" does not name "toxic")."""
    edge = r"[\w-]" if hyphen else r"\w"
    parts = []
    for n in sorted(label_names, key=len, reverse=True):
        left = "" if _UNSPACED.match(n[0]) else f"(?<!{edge})"
        right = "" if _UNSPACED.match(n[-1]) else f"(?!{edge})"
        parts.append(f"{left}{re.escape(n)}{right}")
    return "(" + "|".join(parts) + ")"


def parse_verdict(text: str, label_names: Sequence[str], verdict_template: str = "Verdict: {label}") -> int | None:
    """The label named on the last verdict line of ``text`` (None if there is none)."""
    head = re.escape(verdict_template.split("{label}")[0].strip())
    names = name_alternation(label_names)
    pattern = rf"{head}\s*\**\s*{names}" if head else names
    found = re.findall(pattern, text, flags=re.IGNORECASE)
    if not found:
        return None
    return [n.lower() for n in label_names].index(found[-1].lower())


def _cache_kwarg(trunk) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.2x; use what this version takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill_and_decode(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    explain: bool = True,
    stop_ids: Sequence[int] = (),
    all_done: Callable[[bool], bool] | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Left-padded batched prefill → cls logits ``[B]`` (fp32) from the last prompt position, then
    greedy decoding from the same KV cache. ``all_done(local_done)`` lets lock-stepped ranks
    (ZeRO-3, where every forward is collective) keep stepping until all ranks are done."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cache_kw = _cache_kwarg(model.trunk)
    out = model.trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
    h = out.last_hidden_state[:, -1]  # [B, H] the classification position of every prompt
    cls_logits = model.classify(h)  # [B] fp32
    gen: list[list[int]] = [[] for _ in range(B)]
    if not explain or max_new_tokens <= 0:
        return cls_logits, gen
    stops = {eos_id, *stop_ids}
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model.lm_logits(h)  # [B, V]: only the last position's logits are ever computed
    for step in range(max_new_tokens):
        nxt = logits.float().argmax(-1)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for i, t in enumerate(nxt.tolist()):  # .tolist() syncs once per token
            if not done[i]:
                gen[i].append(t)
        done |= torch.isin(nxt, torch.tensor(sorted(stops), device=device))
        local = bool(done.all())
        if step == max_new_tokens - 1 or (all_done(local) if all_done else local):  # the same on every rank
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # finished rows decode padding; ignored
        pos = pos[:, -1:] + 1
        out = model.trunk(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True,
                          **{cache_kw: cache})
        logits = model.lm_logits(out.last_hidden_state[:, -1])
    return cls_logits, gen


def sigmoid(x: float) -> float:
    """P(y=1) of a logit, without overflow at either end (``math.exp(800)`` raises)."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class CLSGen:
    """A trained CLSGen model for inference."""

    def __init__(self, model, tokenizer, cfg) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.encoder = make_encoder(cfg, tokenizer)

    @classmethod
    def from_pretrained(cls, path, *, device: str | torch.device | None = None, dtype: str | None = None,
                        attn_implementation: str | None = None, base_model: str | None = None,
                        ds_config: dict | str | None = None, checked=None) -> "CLSGen":
        """Load a checkpoint (see :func:`~clsgen_dist.checkpoint.load_checkpoint`): ``dtype`` and
        ``attn_implementation`` default to the run's where they run on ``device``; ``base_model`` is
        a LoRA adapter's base folder if not where the run's config says. ``ds_config`` (a ZeRO-3
        JSON's path or its loaded dict, every rank of an initialised process group calling this): the
        model is partitioned over the ranks, and every rank must then call :meth:`predict` together.
        ``checked``: the config :func:`~clsgen_dist.checkpoint.check_checkpoint` returned for ``path``
        and ``base_model``, if the caller checked it already (it is not checked again)."""
        from .checkpoint import load_checkpoint

        if ds_config is not None and not isinstance(ds_config, dict):
            from .distributed.engine import load_ds_config

            ds_config = load_ds_config(ds_config)

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, cfg = load_checkpoint(path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                          base_model=base_model, ds_config=ds_config, checked=checked)
        return cls(model, tok, cfg)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    @torch.no_grad()
    def predict(self, texts: Sequence[str], *, explain: bool = True, max_new_tokens: int | None = None,
                batch_size: int | None = None, threshold: float = 0.5, shard: bool = False) -> list[dict]:
        """Per text: ``{"prob", "label", "explanation", "verdict", "truncated"}`` (explanation/verdict
        None when ``explain=False``; ``truncated``: the document was cut to ``data.max_seq_len``,
        keeping its start). ``prob`` is the classification head's, except for a checkpoint trained
        without it (``train.cls_weight=0``, gen-only): there it is read off the verdict tokens after
        the model's own explanation, as evaluation does, so the explanation is always generated.

        ``shard=True`` (every rank of an initialised process group calls this with the same
        ``texts``): each rank predicts every world-size-th text and every rank returns all results.
        A ZeRO-3-partitioned model (``from_pretrained(ds_config=...)``) needs it: its forwards are
        collective, and the ranks are lock-stepped."""
        from .distributed import all_gather_objects, all_ranks_done, max_over_ranks, rank, world_size
        from .distributed.engine import is_partitioned

        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"texts[{i}] is {t!r:.40}; expected a non-empty string (as in training)")
        world = world_size() if shard else 1
        if not shard and world_size() > 1 and is_partitioned(self.model):
            raise ValueError("the model is partitioned over the ranks (ZeRO-3): every rank must call "
                             "predict(texts, shard=True) with the same texts")
        from .baselines import PROB_SOURCE, resolve_mode, verdict_probs

        from_verdict = PROB_SOURCE[resolve_mode("auto", self.cfg)] == "explanation"  # the head never trained
        explain = explain or from_verdict
        e = self.cfg.eval
        max_new_tokens = e.max_new_tokens if max_new_tokens is None else max_new_tokens
        batch_size = batch_size or e.batch_size
        self.model.eval()
        device = next(self.model.parameters()).device
        mine = [i for i in range(len(texts)) if world == 1 or i % world == rank()]
        chunks = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
        lockstep = world > 1 and is_partitioned(self.model)
        n = max_over_ranks(len(chunks), device) if lockstep else len(chunks)
        # every rank decodes until all are done (collective forwards)
        all_done = (lambda local: all_ranks_done(local, device)) if lockstep else None

        local: dict[int, tuple] = {}
        for k in range(n):
            idxs = chunks[k] if k < len(chunks) else []
            encoded = [self.encoder.encode_prompt(texts[i]) for i in idxs or [0]]  # a rank out of work still joins
            logits, gen = prefill_and_decode(self.model, [ids for ids, _ in encoded], max_new_tokens=max_new_tokens,
                                             eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                                             explain=explain, all_done=all_done)
            for i, lg, g, (_, cut) in zip(idxs, logits.tolist(), gen, encoded):
                local[i] = (sigmoid(lg), self._decode(g) if explain else None, cut)
        merged: dict[int, tuple] = {}
        for part in all_gather_objects(local) if world > 1 else [local]:
            merged.update(part)
        probs = {i: merged[i][0] for i in merged}
        if from_verdict:  # sharded over the ranks as given: all of them, or only this process's texts
            which = range(len(texts))
            probs = verdict_probs(self.model, self.tokenizer, self.encoder, {i: texts[i] for i in which},
                                  {i: merged[i][1] for i in which}, max_tokens=self.cfg.data.max_seq_len * 2,
                                  shard=world > 1)
        results = []
        for i in range(len(texts)):
            _, expl, cut = merged[i]
            verdict = (parse_verdict(expl, self.cfg.data.label_names, self.cfg.data.verdict_template)
                       if explain else None)
            results.append({"prob": probs[i], "label": int(probs[i] >= threshold), "explanation": expl,
                            "verdict": verdict, "truncated": cut})
        return results
