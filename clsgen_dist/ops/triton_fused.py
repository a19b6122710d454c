"""Triton kernels for the fused LM cross-entropy (CUDA; the CPU interpreter in tests).

Imported lazily by :mod:`clsgen_dist.ops.dual_head` -- importing ``clsgen_dist.ops`` never needs
Triton.

Per chunk of rows (see ``chunked.LinearCrossEntropySum`` for why gradients are made in forward):

1. ``_logits_lse_kernel`` -- grid ``(row blocks, vocabulary splits)``. Each program takes a block
   of rows and walks the vocabulary tiles of its split: ``tl.dot`` of the hidden block with the
   weight tile over ``H`` (fp32 accumulator, bf16 operands on tensor cores), adds the bias, keeps
   an online max / sum-of-exp per row and picks up the target logit. Partial ``(max, sumexp)``
   per split go to a tiny ``[c, splits]`` buffer, combined in torch. When gradients are wanted
   the tile logits are also stored in the ``[c, V]`` chunk buffer (the op's memory peak).
   Splitting the vocabulary fills the GPU (one wave) even for a chunk of only a few row blocks.
2. ``_softmax_grad_kernel`` -- one program per block of rows, in place over the chunk buffer:
   log-sum-exp of the stored logits, then ``softmax - onehot`` in fp32, stored in the input
   dtype (the loss keeps the fp32 log-sum-exp of step 1; see the kernel for why the gradient
   does not).
3. ``d hidden = dlogits @ W`` and ``d W += dlogits.T @ hidden`` are two cuBLAS matmuls with fp32
   output (``chunked.mm_into_f32`` / ``addmm_acc_``). No atomics: each is a plain GEMM, and ``d W``
   accumulates across chunks in ``accum_dtype`` -- a hand-written Triton GEMM would only be slower
   than cuBLAS for these, while fusing ``softmax - onehot`` into their prologue would recompute
   the exponentials ``H / BLOCK_H`` times.

Without gradients (evaluation) step 1 runs over all rows at once with no chunk buffer.

Interpreter (``TRITON_INTERPRET=1``, CPU): bf16 ``tl.dot`` is wrong there, so operands are upcast
to fp32 before the dot (``UPCAST``); its fp32 -> bf16 cast truncates, so the chunk buffer is fp32
and torch rounds it where the GPU would (``TritonChunkBackend.compute_dtype``); a single small
config replaces the autotune list. The kernels are otherwise the ones CUDA runs.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .chunked import default_chunk_rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# One [chunk, V] buffer in the input dtype (bf16: 2 bytes) stays under this many bytes:
# 2048 rows at V = 128256. Large chunks keep the d W GEMM (K = chunk rows, fp32 read-modify-write
# of [V, H] per chunk) compute-bound on Hopper.
TRITON_CHUNK_BYTES = 512 * 2**20
# Vocabulary splits are multiples of this many columns (a multiple of every BLOCK_V below).
SPLIT_ALIGN = 32 if INTERPRET else 256
# CLSGEN_TRITON_AUTOTUNE=0: one config, no autotuning (quick test runs; fewer compilations).
AUTOTUNE = os.environ.get("CLSGEN_TRITON_AUTOTUNE", "1") != "0"


def _lse_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4)]
    # (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages). Shared memory ~ stages * (BN + BV) * BH * bytes:
    # 128x256x64 bf16 x 3 stages = 144 KiB of Hopper's 227 KiB. Configs that do not fit (fp32
    # inputs) are skipped by the autotuner; the default fits fp32 too (144 KiB). Checked offline
    # for sm_90 (Triton 3.9, bf16, H % 64 == 0): all pipeline the H loop (multi-buffered wgmma);
    # 128x128 w8 uses <= 252 registers without spills, 128x256 w8 spills ~340 B in the epilogue,
    # the others <= 48 B. (128x128 and 64x256 with 4 warps spilled 600 B and were dropped.)
    default = (64, 128, 64, 4, 3)
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (128, 256, 64, 8, 3), default]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
        for bn, bv, bh, w, s in (shapes if AUTOTUNE else [default])
    ]


@triton.autotune(configs=_lse_configs(), key=["V", "H_DIM", "STORE_LOGITS", "HAS_BIAS"])
@triton.heuristics({"EVEN_H": lambda a: a["H_DIM"] % a["BLOCK_H"] == 0})
@triton.jit
def _logits_lse_kernel(
    h_ptr,  # [n, H] hidden rows (all with a target)
    w_ptr,  # [V, H] LM weight
    b_ptr,  # [V] bias (unused if not HAS_BIAS)
    t_ptr,  # [n] int64 targets
    l_ptr,  # [n, V] logits out (unused if not STORE_LOGITS)
    pm_ptr,  # [n, S] fp32 running max per split
    ps_ptr,  # [n, S] fp32 sum of exp(z - max) per split
    tl_ptr,  # [n] fp32 target logit
    N,
    V,
    H_DIM,
    V_PER_SPLIT,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_ln,
    stride_pn,
    HAS_BIAS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=mask_n, other=-1)  # [BN]
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    offs_k0 = tl.arange(0, BLOCK_H)
    a_base = h_ptr + rows[:, None] * stride_hn  # [BN, 1]

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_N], tl.float32)
    t_i = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        b_base = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv  # [1, BV]
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H_DIM, BLOCK_H):
            offs_k = k0 + offs_k0
            if EVEN_H:
                a = tl.load(a_base + offs_k[None, :] * stride_hh, mask=mask_n[:, None], other=0.0)
                b = tl.load(b_base + offs_k[:, None] * stride_wh, mask=mask_v[None, :], other=0.0)
            else:
                mask_k = offs_k < H_DIM
                a = tl.load(a_base + offs_k[None, :] * stride_hh, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_base + offs_k[:, None] * stride_wh, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)  # [BN, BV] fp32
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        if STORE_LOGITS:
            l_ptrs = l_ptr + rows[:, None] * stride_ln + offs_v[None, :]
            tl.store(l_ptrs, acc.to(l_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
        acc = tl.where(mask_v[None, :], acc, float("-inf"))
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(acc, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m_i = m_new
    p_off = rows * stride_pn + pid_s
    tl.store(pm_ptr + p_off, m_i, mask=mask_n)
    tl.store(ps_ptr + p_off, s_i, mask=mask_n)
    # Exactly one split holds each row's target: a plain store, no race.
    tl.store(tl_ptr + rows, t_i, mask=mask_n & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _softmax_grad_kernel(
    l_ptr,  # [n, V] logits in, softmax - onehot out (in place)
    t_ptr,  # [n] int64
    N,
    V,
    stride_ln,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # The softmax is taken of the logits *as stored* (rounded to the input dtype), with their own
    # log-sum-exp (pass 1), not with the fp32 one of the loss: for a confident row (p_target ~ 1)
    # exp(rounded z - exact lse) would be off by the rounding of z, i.e. p_target - 1 would be
    # mostly noise. Pass 1 costs one extra read of the chunk buffer.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=mask_n, other=-1)
    row_ptrs = l_ptr + rows[:, None] * stride_ln  # [BN, 1]
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptrs + offs_v[None, :], mask=mask_n[:, None] & (offs_v < V)[None, :], other=float("-inf"))
        z = tl.where(mask_n[:, None], z.to(tl.float32), 0.0)  # padding rows: finite, never stored
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(s_i)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask = mask_n[:, None] & (offs_v < V)[None, :]
        z = tl.load(row_ptrs + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse[:, None])
        p = tl.where(offs_v[None, :] == tgt[:, None], p - 1.0, p)
        tl.store(row_ptrs + offs_v[None, :], p.to(l_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _vocab_splits(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split): about one wave of programs at BLOCK_N = 128."""
    max_splits = triton.cdiv(vocab, SPLIT_ALIGN)
    if INTERPRET or device.type != "cuda":
        want = 3  # small, but exercises the split/combine logic
    else:
        want = max(1, _num_sms(device.index or 0) // triton.cdiv(rows, 128))
    splits = min(want, max_splits)
    per_split = triton.cdiv(triton.cdiv(vocab, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(vocab, per_split), per_split


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul precision setting (default "highest" -> exact fp32).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def logits_lse(
    hidden: torch.Tensor,  # [c, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [c] int64
    logits_out: torch.Tensor | None,  # [c, V] or None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lse, target logit)`` in fp32; optionally stores the logits into ``logits_out``."""
    c, vocab = hidden.shape[0], weight.shape[0]
    splits, per_split = _vocab_splits(c, vocab, hidden.device)
    pm = hidden.new_full((c, splits), float("-inf"), dtype=torch.float32)  # [c, S] tiny
    ps = hidden.new_zeros((c, splits), dtype=torch.float32)
    tgt_logit = hidden.new_zeros((c,), dtype=torch.float32)
    store = logits_out is not None
    if c:
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), splits)  # noqa: E731
        _logits_lse_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets,
            logits_out if store else hidden, pm, ps, tgt_logit,
            c, vocab, hidden.shape[1], per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            logits_out.stride(0) if store else 0, pm.stride(0),
            HAS_BIAS=bias is not None, STORE_LOGITS=store,
            UPCAST=INTERPRET and hidden.dtype != torch.float32,
            DOT_PRECISION=_dot_precision(hidden.dtype),
        )  # fmt: skip
    m = pm.amax(dim=1)  # [c]; unused split columns hold (-inf, 0) and drop out below
    lse = m + torch.log((ps * torch.exp(pm - m[:, None])).sum(dim=1))
    return lse, tgt_logit


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class TritonChunkBackend:
    """Chunk backend of :class:`~clsgen_dist.ops.chunked.LinearCrossEntropySum` on Triton."""

    name = "triton"

    def compute_dtype(self, weight: torch.Tensor) -> torch.dtype:
        # Interpreter only: its fp32 -> bf16 cast truncates instead of rounding to nearest, so the
        # chunk buffer stays fp32 there and torch rounds it (RTNE, like the GPU's cvt.rn) at the
        # two points where the CUDA path stores low precision. The kernels are unchanged.
        return torch.float32 if INTERPRET else weight.dtype

    def default_chunk_rows(self, n: int, vocab: int, weight: torch.Tensor) -> int:
        return default_chunk_rows(n, vocab, weight.element_size(), TRITON_CHUNK_BYTES, multiple=128)

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _check(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        if hidden.dtype != weight.dtype:
            raise TypeError(f"impl='triton' needs hidden and lm_weight of one dtype, got {hidden.dtype} and {weight.dtype}")

    def loss_only(self, hidden, weight, bias, targets) -> torch.Tensor:
        self._check(hidden, weight)
        with _on_device(hidden):
            lse, tgt = logits_lse(hidden, weight, bias, targets, None)
        return lse - tgt

    def chunk(self, hidden, weight, bias, targets, buf, need_grad: bool) -> torch.Tensor:
        self._check(hidden, weight)
        with _on_device(hidden):
            return self._chunk(hidden, weight, bias, targets, buf, need_grad)

    def _chunk(self, hidden, weight, bias, targets, buf, need_grad: bool) -> torch.Tensor:
        c, vocab = hidden.shape[0], weight.shape[0]
        logits = buf[:c]  # [c, V] input dtype
        emulate = logits.dtype != hidden.dtype  # interpreter with low-precision inputs
        lse, tgt = logits_lse(hidden, weight, bias, targets, logits)
        if need_grad and c:
            if emulate:
                logits.copy_(logits.to(hidden.dtype))
            block_n, block_v, warps = (16, 64, 4) if INTERPRET else (4, 2048, 8)
            _softmax_grad_kernel[(triton.cdiv(c, block_n),)](
                logits, targets, c, vocab, logits.stride(0), BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps
            )
            if emulate:
                logits.copy_(logits.to(hidden.dtype))
        return lse - tgt
