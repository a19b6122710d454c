"""``attn_implementation=torch_varlen``: PyTorch's varlen flash kernel on packed rows.

The kernel itself (``torch.nn.attention.varlen.varlen_attn``) runs on CUDA only. On CPU these tests
put an independent float64 implementation of its contract in its place (segments from
``cu_seqlens``, causal / sliding ``window_size``, ``scale``, grouped-query heads) and check
everything around it: the layout, which keywords reach it, that the packed ``[T, T]`` mask is
never built, the SDPA fallback for padded batches and cached decoding, and gradients. On CUDA the
same contract is checked against the real kernel (``test_reference_matches_the_real_kernel``), and
``test_packing_equivalence`` runs the model on it.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from clsgen_dist.config import ConfigError, load_config
from clsgen_dist.data.packing import collate
from clsgen_dist.data.prompts import PromptEncoder
from clsgen_dist.modeling import DualHeadModel, attention, build_model
from clsgen_dist.modeling.build import resolve_attn
from clsgen_dist.predict import CLSGen
from tests.helpers import assert_close

requires_varlen_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and attention.torch_varlen_available()),
    reason="torch's varlen_attn needs CUDA (and torch >= 2.10)")


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """float64 varlen attention: ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``, examples ``cu_q[i]:cu_q[i+1]``;
    query i sees key j of its own example iff ``i - left <= j <= i + right`` (-1: unbounded)."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    hq, hk = q.shape[1], k.shape[1]
    assert enable_gqa == (hq != hk)
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window_size
    out = torch.empty_like(q)
    for s, t in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert t - s <= max_q
        qs, ks, vs = (x[s:t].double().transpose(0, 1) for x in (q, k, v))  # [H, l, D]
        scores = qs @ ks.transpose(1, 2) * scale
        i = torch.arange(t - s, device=q.device)[:, None]
        j = torch.arange(t - s, device=q.device)[None, :]
        keep = torch.ones(t - s, t - s, dtype=torch.bool, device=q.device)
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        scores = scores.masked_fill(~keep, float("-inf"))
        out[s:t] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


class Recorder:
    """Stands in for ``varlen_attn`` on CPU and records what each call received."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        self.calls.append(dict(shape=tuple(q.shape), cu_q=cu_q.clone(), max_q=max_q, **kw))
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@pytest.fixture
def kernel(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: rec)
    return rec


def _model(tiny_dir, attn, dtype=torch.float32):
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype, attn_implementation=attn)
    return DualHeadModel(lm).eval()


def _encoded(tokenizer, toy_rows, n=5):
    enc = PromptEncoder(tokenizer, instruction="Positive?", label_names=["no", "yes"], max_seq_len=256)
    return [enc.encode(r["text"], r["label"], r.get("explanation"), index=i) for i, r in enumerate(toy_rows[:n])]


@pytest.mark.parametrize("pass_cu_seqlens", [True, False])
def test_packed_row_runs_one_varlen_call_per_layer(tiny_dir, tokenizer, toy_rows, kernel, monkeypatch,
                                                   pass_cu_seqlens):
    """A packed row gives every example what SDPA gives it alone; each layer makes one kernel call
    on the batch's ``cu_seqlens`` (passed, or derived from the restarting position ids), causal,
    with the model's scale and grouped-query heads; no ``[T, T]`` mask is built."""
    import transformers.masking_utils as mu

    built = []
    real_sdpa_mask = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda **kw: built.append(kw) or real_sdpa_mask(**kw))
    model, ref = _model(tiny_dir, "torch_varlen"), _model(tiny_dir, "sdpa")
    exs = _encoded(tokenizer, toy_rows)
    b = collate(exs, capacity=10_000)
    with torch.no_grad():
        if pass_cu_seqlens:
            packed = model.hidden_states(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
        else:
            packed = model.hidden_states(b.input_ids, b.position_ids)
    cfg = model.config
    assert len(kernel.calls) == cfg.num_hidden_layers and not built
    for call in kernel.calls:
        assert call["shape"] == (b.n_tokens, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
        assert torch.equal(call["cu_q"], b.cu_seqlens) and call["max_q"] == b.max_seqlen
        assert call["window_size"] == (-1, 0) and call["enable_gqa"] is True
        assert call["scale"] == pytest.approx((cfg.hidden_size // cfg.num_attention_heads) ** -0.5)
    with torch.no_grad():
        for i, e in enumerate(exs):
            alone = ref.hidden_states(torch.tensor([e.input_ids]), torch.arange(len(e))[None])
            s, t = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            assert_close(packed[s:t], alone, atol=2e-5, name=f"example {i}")


def test_gradients_through_varlen_equal_sdpa(tiny_dir, tokenizer, toy_rows, kernel):
    """The dual-head loss and every parameter gradient are the same through the varlen path as
    through SDPA's packed mask."""
    exs = _encoded(tokenizer, toy_rows)
    b = collate(exs, capacity=10_000)

    def loss_and_grads(attn):
        torch.manual_seed(0)
        model = _model(tiny_dir, attn).train()
        with torch.no_grad():
            model.cls_head.weight.normal_(0, 0.2)
        out = model(**b.model_inputs(), num_lm_tokens=b.n_lm, num_cls_examples=len(exs))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads("torch_varlen")
    assert kernel.calls
    ref_loss, ref_grads = loss_and_grads("sdpa")
    assert_close(loss, ref_loss, atol=1e-6, name="loss")
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n in grads:
        assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-4, name=n)


def test_padded_batches_and_cached_decoding_fall_back_to_sdpa(tiny_dir, tokenizer, kernel):
    """Inference: a left-padded batch goes to SDPA (with its padding mask), a single prompt's
    prefill to the kernel and its cached decode steps to SDPA; probabilities and greedy explanations
    equal the SDPA model's."""
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=float32",
                             "data.label_names=[negative, positive]", "eval.max_new_tokens=6"])
    results = {}
    for attn in ("torch_varlen", "sdpa"):
        torch.manual_seed(0)
        model, tok = build_model(cfg.model)  # sdpa on CPU; switched below
        model.causal_lm.config._attn_implementation = attn
        with torch.no_grad():
            model.cls_head.weight.normal_(0, 0.2)
        gen = CLSGen(model.eval(), tok, cfg)
        texts = ["A warm, funny film.", "Dull and far too long, with nothing to say at all."]
        results[attn] = (gen.predict(texts, explain=True), gen.predict(texts[:1], explain=True))
        if attn == "torch_varlen":
            n_layers = model.config.num_hidden_layers
            assert len(kernel.calls) == n_layers  # the unpadded single-prompt prefill only
    (batch, single), (ref_batch, ref_single) = results["torch_varlen"], results["sdpa"]
    for got, want in zip(batch + single, ref_batch + ref_single):
        assert got["prob"] == pytest.approx(want["prob"], abs=1e-6)
        assert got["explanation"] == want["explanation"]


def test_resolve_attn():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attn("auto", cpu, torch.float32) == "sdpa"
    assert resolve_attn("auto", cpu, torch.bfloat16) == "sdpa"
    if not attention.flash_attn_available():
        assert resolve_attn("auto", cuda, torch.bfloat16) == "torch_varlen"
        assert resolve_attn("auto", cuda, torch.float32) == "sdpa"  # the flash kernel is 16-bit only
    assert resolve_attn("torch_varlen", cuda, torch.bfloat16) == "torch_varlen"
    with pytest.raises(ConfigError, match="CUDA only"):
        resolve_attn("torch_varlen", cpu, torch.bfloat16)
    with pytest.raises(ConfigError, match="16-bit"):
        resolve_attn("torch_varlen", cuda, torch.float32)
    assert load_config(None, ["model.attn_implementation=torch_varlen"]).model.attn_implementation == "torch_varlen"


def test_resolve_attn_flash_attn_only_for_16_bit_cuda(monkeypatch):
    """flash-attn installed: ``auto`` picks it for 16-bit weights on CUDA only (its kernels have no
    fp32), and an explicit ``flash_attention_2`` that cannot run is refused before loading."""
    from clsgen_dist.modeling import build

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(build, "flash_attn_available", lambda: True)
    assert resolve_attn("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert resolve_attn("auto", cuda, torch.float32) == "sdpa"
    assert resolve_attn("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attn("flash_attention_2", cuda, torch.bfloat16) == "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2: it needs 16-bit weights"):
        resolve_attn("flash_attention_2", cuda, torch.float32)
    with pytest.raises(ConfigError, match="flash_attention_2: it runs on CUDA only"):
        resolve_attn("flash_attention_2", cpu, torch.bfloat16)
    monkeypatch.setattr(build, "flash_attn_available", lambda: False)
    with pytest.raises(ConfigError, match="flash-attn package is not installed"):
        resolve_attn("flash_attention_2", cuda, torch.bfloat16)


def _older_kernels(rec):
    """Stand-ins with torch 2.10's and 2.11's exact signatures (no ``**kwargs``), recording like ``rec``."""
    def v210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        return rec(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0) if is_causal else (-1, -1))

    def v211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1)):
        return rec(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)

    return {"2.10": v210, "2.11": v211}


@pytest.mark.parametrize("version", ["2.10", "2.11"])
def test_older_varlen_signatures_are_adapted(tiny_dir, tokenizer, toy_rows, monkeypatch, version):
    """Before torch 2.12 varlen_attn has no enable_gqa (and 2.10 no window_size or scale): the
    grouped-query heads are repeated and causality is asked as the signature allows; the outputs
    stay those of SDPA for each example alone."""
    rec = Recorder()
    kernel = _older_kernels(rec)[version]
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
    model, ref = _model(tiny_dir, "torch_varlen"), _model(tiny_dir, "sdpa")
    exs = _encoded(tokenizer, toy_rows)
    b = collate(exs, capacity=10_000)
    with torch.no_grad():
        packed = model.hidden_states(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
    heads = model.config.num_attention_heads
    assert rec.calls and all(c["shape"][1] == heads and c["window_size"] == (-1, 0) for c in rec.calls)
    assert ("scale" in rec.calls[0]) is (version == "2.11")
    with torch.no_grad():
        for i, e in enumerate(exs):
            alone = ref.hidden_states(torch.tensor([e.input_ids]), torch.arange(len(e))[None])
            s, t = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            assert_close(packed[s:t], alone, atol=2e-5, name=f"{version} example {i}")


def test_what_an_older_signature_cannot_do_is_refused(monkeypatch):
    import torch.nn.attention.varlen as V

    module = torch.nn.Module()
    k = v = torch.zeros(5, 2, 8)
    v210 = _older_kernels(Recorder())["2.10"]
    keywords = attention._keywords(v210)
    assert keywords == {"is_causal"}
    module.sliding_window = 4
    with pytest.raises(ValueError, match="a sliding window needs varlen_attn's window_size"):
        attention._kernel_options(keywords, module, k, v, 4, 8, 8 ** -0.5)
    module.sliding_window = None
    with pytest.raises(ValueError, match="attention scale \\(0.1\\) needs varlen_attn's scale"):
        attention._kernel_options(keywords, module, k, v, 4, 8, 0.1)
    k2, v2, options = attention._kernel_options(keywords, module, k, v, 4, 8, 8 ** -0.5)
    assert options == {"is_causal": True} and k2.shape == v2.shape == (5, 4, 8)

    def neither(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        raise AssertionError("never called")

    monkeypatch.setattr(V, "varlen_attn", neither)  # nothing to make it causal with: not used
    assert not attention.torch_varlen_available()
    with pytest.raises(ConfigError, match="no usable torch.nn.attention.varlen.varlen_attn"):
        resolve_attn("torch_varlen", torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(V, "varlen_attn", v210)
    assert attention.torch_varlen_available()


def test_train_cli_rejects_torch_varlen_on_cpu(tmp_path):
    from tests.conftest import write_jsonl
    from tests.integration._run import launch

    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine", "label": 1}, {"text": "bad", "label": 0}])
    proc = launch("train.py", ["--config", "launch/configs/tiny_cpu.yaml", f"data.train_file={f}",
                               "model.attn_implementation=torch_varlen",
                               f"output_dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.attn_implementation=torch_varlen: it runs on CUDA only" in proc.stderr
    assert not (tmp_path / "out").exists()


@requires_varlen_cuda
@pytest.mark.parametrize("window", [(-1, 0), (3, 0)])
def test_reference_matches_the_real_kernel(window):
    """The CPU stand-in's contract is the real kernel's, called through the same adaptation as the
    model (values and gradients, grouped-query heads, odd lengths)."""
    keywords = attention._keywords(attention._varlen_kernel())
    if window != (-1, 0) and "window_size" not in keywords:
        pytest.skip("this torch's varlen_attn has no window_size")
    torch.manual_seed(0)
    lens = [1, 7, 33, 64, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    t = int(cu[-1])
    q = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16)
    module = torch.nn.Module()
    module.sliding_window = window[0] + 1 if window[0] >= 0 else None
    k_in, v_in, options = attention._kernel_options(keywords, module, k, v, 8, 64, 64 ** -0.5)
    out = attention._varlen_kernel()(q, k_in, v_in, cu, cu, max(lens), max(lens), **options)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_varlen(qd, kd, vd, cu.cpu(), cu.cpu(), max(lens), max(lens), scale=64 ** -0.5,
                           window_size=window, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), g.double())
    assert_close(out, ref, atol=2e-2, name="output")
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close(a, e, atol=5e-2, rtol=2e-2, name=f"d{name}")


@pytest.mark.parametrize("trained_with", ["torch_varlen", "flash_attention_2"])
def test_checkpoint_trained_with_a_cuda_kernel_loads_on_cpu(tiny_dir, tmp_path, trained_with):
    """A run trained with a CUDA-only varlen kernel saves it in its config; loading the checkpoint
    on a CPU (eval, predict, CLSGen.from_pretrained) falls back to sdpa instead of refusing."""
    import dataclasses

    from clsgen_dist.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=float32", "data.max_seq_len=128",
                             "data.label_names=[negative, positive]"])
    model, tok = build_model(cfg.model, seed=0)
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 0.2)
    model.eval()
    texts = ["A delight from start to finish.", "Boring and far too long."]
    before = CLSGen(model, tok, cfg).predict(texts, explain=False)
    cfg.model = dataclasses.replace(cfg.model, attn_implementation=trained_with)
    save_checkpoint(model, tok, cfg, tmp_path / "ckpt")
    loaded = CLSGen.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.model.config._attn_implementation == "sdpa"
    assert [r["prob"] for r in loaded.predict(texts, explain=False)] == pytest.approx([r["prob"] for r in before],
                                                                                      abs=1e-6)
    with pytest.raises(ConfigError, match=f"{trained_with}: it runs on CUDA only"):  # asked for explicitly
        load_checkpoint(tmp_path / "ckpt", attn_implementation=trained_with)
