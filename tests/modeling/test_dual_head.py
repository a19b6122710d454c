"""Loss definition, global normalisation invariance, and save → load round trips."""

import math

import pytest
import torch
import torch.nn.functional as F

from clsgen_dist.checkpoint import load_checkpoint, save_checkpoint
from clsgen_dist.config import load_config
from clsgen_dist.data.packing import PackedRows
from clsgen_dist.modeling import build_model
from clsgen_dist.predict import CLSGen, make_encoder
from tests.helpers import assert_close


def _cfg(model_dir, **over):
    items = [f"model.name_or_path={model_dir}", "model.dtype=float32", "data.max_seq_len=128",
             "data.label_names=[negative, positive]"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def _rows(cfg, tokenizer, toy_rows):
    enc = make_encoder(cfg, tokenizer)
    encoded = [enc.encode(r["text"], r["label"], r.get("explanation"), index=i) for i, r in enumerate(toy_rows)]
    return PackedRows(encoded, cfg.data.max_seq_len, seed=0)


def _step(model, rows, step, micro, ga, lm_coef=1.0, cls_coef=1.0):
    """Loss and gradients of one optimizer step, computed micro-batch by micro-batch."""
    mbs = rows.micro_batches(step, micro_batch_size=micro, grad_accum=ga)
    n_lm = sum(b.n_lm for b in mbs)
    n_cls = sum(len(b.cls_index) for b in mbs)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in mbs:
        out = model(**b.model_inputs(), num_lm_tokens=n_lm, num_cls_examples=n_cls, lm_coef=lm_coef, cls_coef=cls_coef)
        out.loss.backward()
        total += out.loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def test_loss_matches_independent_float64_definition(tiny_dir, tokenizer, toy_rows):
    cfg = _cfg(tiny_dir, **{"model.finetune": "full"})
    model, _ = build_model(cfg.model)
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 0.1)
        model.cls_head.bias.fill_(0.2)
    b = _rows(cfg, tokenizer, toy_rows).micro_batches(0, micro_batch_size=2, grad_accum=1)[0]
    out = model(**b.model_inputs(), num_lm_tokens=b.n_lm, num_cls_examples=len(b.cls_index), lm_coef=0.7,
                cls_coef=1.3)
    with torch.no_grad():
        h = model.hidden_states(b.input_ids, b.position_ids).double()
        logits = h @ model.lm_head.weight.double().t()
        keep = b.targets != -100
        ce = F.cross_entropy(logits[keep], b.targets[keep], reduction="sum")
        z = h[b.cls_index] @ model.cls_head.weight.double().t() + model.cls_head.bias.double()
        bce = F.binary_cross_entropy_with_logits(z.squeeze(-1), b.cls_labels.double(), reduction="sum")
        ref = 1.3 * bce / len(b.cls_index) + 0.7 * ce / b.n_lm
    assert b.n_lm > 0 and int(out.n_lm) == b.n_lm
    assert_close(out.loss, ref, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(out.cls_logits, z.squeeze(-1), atol=1e-5, name="cls logits")


def test_zero_init_head_starts_at_ln2(tiny_dir, tokenizer, toy_rows):
    cfg = _cfg(tiny_dir)
    model, _ = build_model(cfg.model)
    b = _rows(cfg, tokenizer, toy_rows).micro_batches(0, micro_batch_size=1, grad_accum=1)[0]
    out = model(**b.model_inputs(), num_lm_tokens=1, num_cls_examples=len(b.cls_index), lm_coef=0.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_micro1_ga4_equals_micro4_ga1(tiny_dir, tokenizer, toy_rows, finetune):
    cfg = _cfg(tiny_dir, **{"model.finetune": finetune, "data.max_seq_len": 64})
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    with torch.no_grad():  # non-trivial head and LoRA B so every gradient path is live
        model.cls_head.weight.normal_(0, 0.1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    rows = _rows(cfg, tokenizer, toy_rows)
    for step in range(2):
        l_a, g_a = _step(model, rows, step, micro=1, ga=4)
        l_b, g_b = _step(model, rows, step, micro=4, ga=1)
        l_c, g_c = _step(model, rows, step, micro=2, ga=2)
        assert l_a == pytest.approx(l_b, rel=1e-5) and l_c == pytest.approx(l_b, rel=1e-5)
        assert g_a.keys() == g_b.keys() and len(g_a) > 2
        for n in g_a:
            assert_close(g_a[n], g_b[n], atol=1e-6, rtol=1e-4, name=f"grad {n} (1x4 vs 4x1)")
            assert_close(g_c[n], g_b[n], atol=1e-6, rtol=1e-4, name=f"grad {n} (2x2 vs 4x1)")


@pytest.mark.parametrize("variant", [
    {"model.finetune": "lora"},
    {"model.finetune": "full"},
    {"model.finetune": "lora", "model.cls_position": "token"},
])
def test_save_load_identical_probabilities(tiny_dir, tokenizer, tmp_path, variant):
    cfg = _cfg(tiny_dir, **variant)
    model, tok = build_model(cfg.model)
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 0.2)
        model.cls_head.bias.fill_(-0.1)
        for n, p in model.named_parameters():
            if p.requires_grad and "cls_head" not in n:
                p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    texts = ["A delight from start to finish.", "Boring and far too long, with a plot that goes nowhere at all."]
    before = CLSGen(model, tok, cfg).predict(texts, explain=True, max_new_tokens=6)
    save_checkpoint(model, tok, cfg, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "cls_head.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    m2, tok2, cfg2 = load_checkpoint(tmp_path / "ckpt")
    after = CLSGen(m2, tok2, cfg2).predict(texts, explain=True, max_new_tokens=6)
    for a, b in zip(before, after):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-6)
        assert a["explanation"] == b["explanation"]
    assert len({round(r["prob"], 6) for r in after}) == 2  # the head really reads the input


@pytest.mark.parametrize("tie", [True, False])
def test_cls_token_rows_are_rebuilt_on_load_and_export(tokenizer, tmp_path, tie):
    """An added cls token's rows are the mean of the base tokens' rows, in the embedding and in an
    untied LM head, also when its id lands on a spare row of a padded vocabulary. Under LoRA they are
    frozen and not saved with the adapter, so loading and the merged export rebuild them: the same
    probabilities and the same explanations, on every load."""
    from clsgen_dist.export import export_merged
    from tests.conftest import make_tiny_llama

    base = make_tiny_llama(tokenizer, tmp_path / "base", seed=3, tie=tie, vocab_pad=64)
    cfg = _cfg(base, **{"model.cls_position": "token"})
    model, tok = build_model(cfg.model, seed=0)
    n, tid = len(tokenizer), tok.convert_tokens_to_ids("<|cls|>")
    emb, head = model.causal_lm.get_input_embeddings().weight, model.causal_lm.get_output_embeddings().weight
    assert tid == n and emb.shape[0] == n + 64  # a spare row, no resize
    assert_close(emb[tid], emb[:n].double().mean(0).float(), atol=1e-6, name="cls embedding row")
    assert_close(head[tid], head[:n].double().mean(0).float(), atol=1e-6, name="cls LM-head row")
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 0.2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    texts = ["A delight from start to finish.", "Boring and far too long, with a plot that goes nowhere at all."]
    before = CLSGen(model, tok, cfg).predict(texts, explain=True, max_new_tokens=6)
    save_checkpoint(model, tok, cfg, tmp_path / "ckpt")
    for _ in range(2):  # each load rebuilds the rows; nothing random
        m2, tok2, cfg2 = load_checkpoint(tmp_path / "ckpt")
        assert torch.equal(m2.causal_lm.get_output_embeddings().weight[tid], head[tid])
        after = CLSGen(m2, tok2, cfg2).predict(texts, explain=True, max_new_tokens=6)
        assert [a["explanation"] for a in after] == [b["explanation"] for b in before]
        assert_close(torch.tensor([a["prob"] for a in after]), torch.tensor([b["prob"] for b in before]), atol=1e-6,
                     name="reloaded vs trained")
    m3, tok3, cfg3 = load_checkpoint(export_merged(tmp_path / "ckpt", tmp_path / "merged", dtype="float32"))
    merged = CLSGen(m3, tok3, cfg3).predict(texts, explain=True, max_new_tokens=6)
    assert [a["explanation"] for a in merged] == [b["explanation"] for b in before]
    assert_close(torch.tensor([a["prob"] for a in merged]), torch.tensor([b["prob"] for b in before]), atol=1e-5,
                 name="merged export vs trained")


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_cls_token_mode_trains(tiny_dir, tokenizer, toy_rows, finetune):
    """With an added cls token the packed forward reads the head at that token, and a backward pass
    reaches the head and the trainable weights."""
    cfg = _cfg(tiny_dir, **{"model.finetune": finetune, "model.cls_position": "token"})
    model, tok = build_model(cfg.model)
    rows = _rows(cfg, tok, toy_rows)
    b = rows.micro_batches(0, micro_batch_size=2, grad_accum=1)[0]
    cls_id = tok.convert_tokens_to_ids("<|cls|>")
    assert (b.input_ids[0, b.cls_index] == cls_id).all()
    out = model(**b.model_inputs(), num_lm_tokens=max(b.n_lm, 1), num_cls_examples=len(b.cls_index))
    out.loss.backward()
    assert model.cls_head.weight.grad is not None and model.cls_head.weight.grad.abs().sum() > 0
    others = [p.grad for n, p in model.named_parameters() if p.requires_grad and "cls_head" not in n]
    assert others and all(g is not None for g in others)


def test_one_prefill_probability_equals_packed_forward(tiny_dir, tokenizer, toy_rows):
    """The inference prefill (left-padded batch, KV cache) gives the same P(y=1) as training's packed
    forward at the classification position."""
    cfg = _cfg(tiny_dir)
    model, tok = build_model(cfg.model)
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 0.2)
    model.eval()
    rows = _rows(cfg, tokenizer, toy_rows)
    enc = make_encoder(cfg, tok)
    texts = [r["text"] for r in toy_rows[:4]]
    probs = [r["prob"] for r in CLSGen(model, tok, cfg).predict(texts, explain=False)]
    from clsgen_dist.data.packing import collate

    b = collate([enc.encode(t, 0, None, index=i) for i, t in enumerate(texts)], capacity=10_000)
    logits = model.cls_logits(b.input_ids, b.position_ids, b.cls_index)
    assert_close(torch.tensor(probs), torch.sigmoid(logits), atol=1e-5, name="prefill vs packed prob")
    del rows


def test_twenty_steps_fused_equal_naive_loss(tiny_dir, tokenizer, toy_rows):
    """Training with the fused (chunked) loss, in both gradient modes, follows the naive
    materialised loss step for step."""
    def train(impl, grad_mode="eager"):
        cfg = _cfg(tiny_dir, **{"model.finetune": "full", "model.loss_impl": impl, "model.loss_chunk_size": 7,
                                "model.loss_grad_mode": grad_mode, "data.max_seq_len": 96})
        torch.manual_seed(0)
        model, tok = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rows = _rows(cfg, tok, toy_rows)
        losses = []
        for step in range(20):
            loss, _ = _step(model, rows, step, micro=1, ga=2)
            opt.step()
            losses.append(loss)
        return losses

    fused, recomputed, naive = train("torch"), train("torch", "recompute"), train("reference")
    assert fused[-1] < fused[0]
    assert fused == pytest.approx(naive, rel=1e-5, abs=1e-6)
    assert recomputed == pytest.approx(naive, rel=1e-5, abs=1e-6)


def test_lora_on_the_lm_head_is_refused(tiny_dir):
    """The fused loss multiplies by lm_head.weight itself, so an adapter there would train nothing
    and the loss would not be the model's: refused with the key to change."""
    from clsgen_dist.config import ConfigError

    cfg = _cfg(tiny_dir, **{"model.lora_target_modules": "[q_proj,lm_head]"})
    with pytest.raises(ConfigError, match="puts a LoRA adapter on the LM head"):
        build_model(cfg.model)
    build_model(_cfg(tiny_dir, **{"model.lora_target_modules": "[q_proj,v_proj]"}).model)  # fine


def test_cls_head_computes_in_fp32_from_bf16_storage():
    """DeepSpeed's bf16 engine stores the head in bf16: it still computes in fp32, in evaluation
    (ClsHead) and in the training loss alike, against float64 math on the stored values."""
    from clsgen_dist.modeling.dual_head import ClsHead
    from clsgen_dist.ops import dual_head_loss

    torch.manual_seed(0)
    head = ClsHead(64, 1, dtype=torch.float32)
    torch.nn.init.normal_(head.weight, std=0.5)
    head.to(torch.bfloat16)
    h = (torch.randn(7, 64) * 3).bfloat16()
    ref = (h.double() @ head.weight.double().T + head.bias.double()).squeeze(-1)
    out = head(h).squeeze(-1)
    assert out.dtype == torch.float32
    assert_close(out.double(), ref, atol=1e-5, rtol=0, name="ClsHead from bf16 storage")
    w = torch.randn(11, 64).bfloat16()
    _, _, _, logits = dual_head_loss(h, w, torch.full((7,), -100), head.weight, head.bias, torch.arange(7),
                                     torch.ones(7), impl="torch")
    assert_close(logits.double(), ref, atol=1e-5, rtol=0, name="training-loss cls logits from bf16 storage")
