"""A packed row gives every example exactly the per-token outputs it gets alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from clsgen_dist.data.packing import collate
from clsgen_dist.data.prompts import PromptEncoder
from clsgen_dist.modeling import DualHeadModel
from tests.helpers import assert_close


def _encoded(tokenizer, toy_rows, n=5):
    enc = PromptEncoder(tokenizer, instruction="Positive?", label_names=["no", "yes"], max_seq_len=256)
    return [enc.encode(r["text"], r["label"], r.get("explanation"), index=i) for i, r in enumerate(toy_rows[:n])]


def _attn_impls():
    """Every path this machine has: SDPA and eager on CPU; on CUDA PyTorch's varlen kernel
    (``torch_varlen``) and flash-attn's when it is installed. (``test_attention.py`` checks
    ``torch_varlen``'s plumbing on CPU with a stand-in for the CUDA-only kernel.)"""
    from clsgen_dist.modeling.attention import flash_attn_available, torch_varlen_available

    impls = ["sdpa", "eager"]
    if torch.cuda.is_available():
        impls += ["torch_varlen"] if torch_varlen_available() else []
        impls += ["flash_attention_2"] if flash_attn_available() else []
    return impls


@pytest.mark.parametrize("attn", _attn_impls())
def test_packed_row_equals_each_example_alone(tiny_dir, tokenizer, toy_rows, attn):
    on_gpu = attn in ("flash_attention_2", "torch_varlen")
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    backbone = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype, attn_implementation=attn).to(device)
    model = DualHeadModel(backbone).eval()
    exs = _encoded(tokenizer, toy_rows)
    b = collate(exs, capacity=10_000).to(device)
    with torch.no_grad():
        packed = model.lm_head(model.hidden_states(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)).float()
        for k, e in enumerate(exs):
            ids = torch.tensor([e.input_ids], device=device)
            alone = model.lm_head(model.hidden_states(ids, torch.arange(len(e), device=device)[None])).float()
            s, t = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1])
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert_close(packed[s:t], alone, atol=tol, rtol=0, name=f"{attn} example {k} logits")


def test_leak_is_detected_when_examples_share_a_mask(tiny_dir, tokenizer, toy_rows):
    """Negative control: with an explicit all-ones attention mask transformers falls back to plain
    causal attention across the whole row, and the second example's outputs change."""
    backbone = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = DualHeadModel(backbone).eval()
    exs = _encoded(tokenizer, toy_rows, n=2)
    b = collate(exs, capacity=10_000)
    with torch.no_grad():
        leaky = model.trunk(input_ids=b.input_ids, position_ids=b.position_ids,
                            attention_mask=torch.ones_like(b.input_ids), use_cache=False).last_hidden_state[0]
        ids = torch.tensor([exs[1].input_ids])
        alone = model.hidden_states(ids, torch.arange(len(exs[1]))[None])
    s = int(b.cu_seqlens[1])
    assert (leaky[s:] - alone).abs().max() > 1e-3
