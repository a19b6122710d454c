"""Triton path == float64 truth == torch path == reference: value and every gradient.

Used two ways by ``test_triton.py``:
  * on CPU, as a script in a subprocess with ``TRITON_INTERPRET=1`` (the flag must be set before
    Triton is imported):  ``TRITON_INTERPRET=1 python tests/ops/_triton_cases.py``
  * on CUDA, imported and parametrised natively (small cases + larger shapes).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

import torch

try:
    from . import _util as U
except ImportError:  # run as a script: tests/ops is sys.path[0]
    import _util as U

# Beyond the shared cases: tile-aligned shapes (the EVEN_H specialisation, full tiles) and, on CUDA,
# realistic sizes where autotuned configs, many vocabulary splits and several chunks are used.
SMALL = U.CASES + [U.Case("tile_aligned", N=64, H=64, V=256, M=4, ignore_frac=0.1)]
LARGE = [
    U.Case("large", N=2048, H=1024, V=32000, M=64, ignore_frac=0.2),
    U.Case("large_chunked_bias", N=1500, H=1024, V=32000, M=16, ignore_frac=0.5, bias=True, chunk_size=512,
           logit_scale=3.0),
]
BF16_CASES = ["basic", "everything", "tile_aligned", "large"]


GRAD_MODES = ("eager", "recompute", "recompute_tiles")
RECOMPUTE_MODES = ("recompute", "recompute_tiles")
# The recompute modes with a bf16 accumulator (cut-cross-entropy's memory): "recompute_tiles"
# rounds every tile's contribution into the bf16 gradients, "recompute" every vocabulary chunk's
# into d hidden, so each gradient is held to a relative error (norm-wise, vs the float64 truth)
# instead of "no worse than plain torch". For "recompute_tiles" only CUDA rounds there: the
# interpreter accumulates in fp32 (it cannot round to nearest into bf16), same lock code.
BF16_ACCUM_MAX_REL_ERR = 0.05


@contextlib.contextmanager
def many_chunks(grad_mode: str):
    """grad_mode="recompute" at test sizes: no tail temporary until the columns run out, so the
    backward walks many vocabulary chunks whose scratch lies inside d W (and then a tail)."""
    from clsgen_dist.ops import recompute

    saved = recompute.TAIL_BYTES, recompute.MIN_COLS
    if grad_mode == "recompute":
        recompute.TAIL_BYTES, recompute.MIN_COLS = 0, 1
    try:
        yield
    finally:
        recompute.TAIL_BYTES, recompute.MIN_COLS = saved


def check_fp32(case: U.Case, device: str, seed: int, grad_mode: str = "eager") -> None:
    inp = U.make_inputs(case, dtype=torch.float32, device=device, seed=seed)
    kw = dict(chunk_size=case.chunk_size, accum_dtype=case.accum_dtype)
    name = f"triton-fp32-{grad_mode}/{case.name}/{device}/seed={seed}"
    with many_chunks(grad_mode):
        tri = U.run_op(inp, impl="triton", grad_mode=grad_mode, **kw)
    U.compare(tri, U.reference_f64(inp), **U.TOL[torch.float32], name=name)
    U.compare(tri, U.run_op(inp, impl="torch", **kw), **U.TOL[torch.float32], name=name + " vs torch path")
    U.compare(tri, U.run_op(inp, impl="reference"), **U.TOL[torch.float32], name=name + " vs reference")


def check_bf16(case: U.Case, device: str, seed: int, grad_mode: str = "eager") -> None:
    name = f"triton-bf16-{grad_mode}/{case.name}/{device}/seed={seed}"
    with many_chunks(grad_mode):
        runs = U.bf16_runs(case, device=device, seed=seed, draws=2 if case.N > 1000 else 4, impl="triton",
                           grad_mode=grad_mode)
    for i, (ours, _, truth) in enumerate(runs):
        U.compare(ours, truth, **U.TOL[torch.bfloat16], name=f"{name}+{i}")
        assert ours["hidden"].dtype == ours["lm_weight"].dtype == torch.bfloat16, name
    U.assert_no_worse_than_torch(runs, name=name)


def check_bf16_accum(case: U.Case, device: str, seed: int, grad_mode: str) -> None:
    """A recompute mode with accum_dtype=bf16: d hidden accumulated in bf16 over vocabulary chunks
    ("recompute"), or both gradients in bf16 under tile locks ("recompute_tiles")."""
    name = f"triton-bf16-{grad_mode}-bf16acc/{case.name}/{device}/seed={seed}"
    inp = U.make_inputs(case, dtype=torch.bfloat16, device=device, seed=seed)
    with many_chunks(grad_mode):
        ours = U.run_op(inp, impl="triton", grad_mode=grad_mode, accum_dtype=torch.bfloat16, chunk_size=case.chunk_size)
    truth = U.reference_f64(inp)
    U.assert_close(ours["lm_loss_sum"], truth["lm_loss_sum"], **U.TOL[torch.bfloat16], name=f"{name}/lm_loss_sum")
    for k in U.GRAD_NAMES:
        if truth[k] is not None:
            assert ours[k].dtype == inp[k].dtype, f"{name}/{k}: {ours[k].dtype}"
        err = U.rel_err(ours[k], truth[k])
        assert err <= BF16_ACCUM_MAX_REL_ERR, f"{name}/{k}: relative error {err:.3g} > {BF16_ACCUM_MAX_REL_ERR}"


def check_locked_fp32(case: U.Case, device: str, seed: int, repeats: int = 1) -> None:
    """"recompute_tiles", fp32 inputs with ``accum_dtype=bf16``: the locked read-modify-write path with fp32 buffers
    (the accumulators take the parameters' dtype), so the result is held to fp32 tolerances: a
    race in the spin lock loses whole tile contributions and shows here, where the bf16 rounding of
    check_bf16_accum would hide a few."""
    inp = U.make_inputs(case, dtype=torch.float32, device=device, seed=seed)
    truth = U.reference_f64(inp)
    for r in range(repeats):
        out = U.run_op(inp, impl="triton", grad_mode="recompute_tiles", accum_dtype=torch.bfloat16)
        U.compare(out, truth, **U.TOL[torch.float32], name=f"triton-fp32-locked/{case.name}/{device}/seed={seed}+{r}")


def check_masked_tile(device: str, seed: int, grad_mode: str) -> None:
    """An LM bias of -inf over the first half of the vocabulary (tokens a task never emits): whole
    vocabulary tiles of -inf logits, which the online log-sum-exp must skip rather than turn into
    exp(-inf - -inf) = NaN."""
    case = U.Case("masked", N=24, H=32, V=256, M=3, bias=True)
    inp = U.make_inputs(case, dtype=torch.float32, device=device, seed=seed)
    with torch.no_grad():
        inp["lm_bias"][: case.V // 2] = float("-inf")
    inp["targets"] = torch.randint(case.V // 2, case.V, (case.N,), device=device)
    name = f"triton-fp32-{grad_mode}/masked_tile/{device}/seed={seed}"
    with many_chunks(grad_mode):
        tri = U.run_op(inp, impl="triton", grad_mode=grad_mode)
    assert torch.isfinite(tri["lm_loss_sum"]), f"{name}: loss {tri['lm_loss_sum']}"
    U.compare(tri, U.reference_f64(inp), **U.TOL[torch.float32], name=name)


def check_model_recompute(device: str, seed: int, grad_mode: str = "recompute") -> None:
    """DualHeadModel(loss_grad_mode=a recompute mode) on a tiny tied-embedding Llama: the loss and every
    parameter gradient equal the materialised reference loss's (the LM head is the tied embedding,
    so its gradient sums the fused op's and the embedding lookup's)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from clsgen_dist.modeling.dual_head import DualHeadModel

    torch.manual_seed(seed)
    V, T = 301, 40
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      attn_implementation="eager")).to(device)
    ref = DualHeadModel(lm, loss_impl="reference")
    ours = DualHeadModel(copy.deepcopy(lm), loss_impl="triton", loss_grad_mode=grad_mode)
    torch.nn.init.normal_(ref.cls_head.weight, std=0.1)
    ours.cls_head.load_state_dict(ref.cls_head.state_dict())
    ids = torch.randint(0, V, (1, T), device=device)
    targets = torch.randint(0, V, (T,), device=device)
    targets[: T // 2] = -100  # the prompt half has no target
    kw = dict(input_ids=ids, position_ids=torch.arange(T, device=device)[None], targets=targets,
              cls_index=torch.tensor([T // 2 - 1], device=device), cls_labels=torch.tensor([1.0], device=device),
              num_lm_tokens=float((targets != -100).sum()), num_cls_examples=1.0, lm_coef=0.7, cls_coef=1.3)
    outs = []
    for m in (ours, ref):
        out = m(**kw)
        out.loss.backward()
        outs.append(out)
    U.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5, name=f"model-{grad_mode}/loss")
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"model-{grad_mode}/{name}: no gradient"
        U.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, name=f"model-{grad_mode}/{name}")


def check_grad_gemm_groups(device: str, seed: int) -> None:
    """``_grad_gemm_kernel`` (grad_mode="recompute") alone, against float64: more row blocks than
    two program groups of GROUP_N (the last group partial), a partial last column block, an H that
    is not a multiple of BLOCK_H, a column offset v0 with targets inside and outside the chunk and
    -inf bias columns. The op-level cases have at most a few row blocks: one group."""
    from clsgen_dist.ops import triton_fused as T

    g = torch.Generator().manual_seed(seed)
    bn = max(c.kwargs["BLOCK_N"] for c in T._grad_gemm_kernel.configs)
    bv = max(c.kwargs["BLOCK_V"] for c in T._grad_gemm_kernel.configs)
    r, vc, hdim, v0 = 2 * 8 * bn + 3 * bn + 5, 3 * bv + 7, 20, 37
    vocab = v0 + vc + 11
    h = torch.randn(r, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) / 4
    b = torch.randn(vocab, generator=g)
    b[v0 + 5 : v0 + 9] = float("-inf")
    t = torch.randint(0, vocab, (r,), generator=g)
    t[::3] = torch.randint(v0, v0 + vc, (len(t[::3]),), generator=g)
    z = h.double() @ w.double().t() + b.double()
    lse = torch.logsumexp(z, dim=1)
    want = torch.exp(z[:, v0 : v0 + vc] - lse[:, None])
    local = t - v0
    hit = ((local >= 0) & (local < vc)).nonzero().squeeze(1)
    want[hit, local[hit]] -= 1.0
    want *= 0.37
    h, w, b, t = (x.to(device) for x in (h, w, b, t))
    out = torch.full((r, vc), float("nan"), device=device)
    T.TritonChunkBackend().grad_block(h, w[v0 : v0 + vc], b[v0 : v0 + vc], t, lse.float().to(device),
                                      torch.tensor([0.37], device=device), v0, out)
    U.assert_close(out, want, **U.TOL[torch.float32], name=f"grad-gemm-groups/{device}/seed={seed}")


def all_checks(device: str, large: bool) -> list[tuple[str, object]]:
    cases = SMALL + (LARGE if large else [])
    bf16 = [c for c in cases if c.name in BF16_CASES]
    checks = []
    for mode in GRAD_MODES:
        checks += [(f"fp32-{mode}/{c.name}", lambda c=c, m=mode: check_fp32(c, device, U.new_seed(), m)) for c in cases]
        checks += [(f"bf16-{mode}/{c.name}", lambda c=c, m=mode: check_bf16(c, device, U.new_seed(), m)) for c in bf16]
    for mode in RECOMPUTE_MODES:
        checks += [(f"bf16-{mode}-bf16acc/{c.name}", lambda c=c, m=mode: check_bf16_accum(c, device, U.new_seed(), m))
                   for c in bf16]
    checks += [(f"fp32-locked/{c.name}", lambda c=c: check_locked_fp32(c, device, U.new_seed())) for c in bf16]
    checks += [(f"masked-tile-{m}", lambda m=m: check_masked_tile(device, U.new_seed(), m)) for m in GRAD_MODES]
    checks += [(f"model-{m}", lambda m=m: check_model_recompute(device, U.new_seed(), m)) for m in RECOMPUTE_MODES]
    checks.append(("grad-gemm-groups", lambda: check_grad_gemm_groups(device, U.new_seed())))
    return checks


def main() -> int:
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    failed = 0
    for name, fn in all_checks(device, large=device == "cuda"):
        t0 = time.time()
        try:
            fn()
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:  # report every case, then fail
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
