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

``grad_mode="recompute"`` (``recompute.RecomputeLinearCrossEntropySum``): the forward is step 1
without a buffer (log-sum-exp and target logit only); the backward recomputes the logits chunk of
vocabulary columns by chunk with ``_grad_gemm_kernel`` -- a GEMM tile whose epilogue forms
``(softmax - onehot) * grad`` from the saved fp32 log-sum-exp -- into scratch inside the weight
gradient, and makes the gradients with cuBLAS (see ``recompute.py``).

``grad_mode="recompute_tiles"`` (``recompute_tile_grads``, the backward of the same autograd
function): one kernel, ``_recompute_grad_kernel``,
with a program per ``[BLOCK_N, BLOCK_V]`` logits tile: it recomputes the tile, forms
``(softmax - onehot) * grad`` from the saved fp32 log-sum-exp, and adds ``g @ W_tile`` into
``d hidden`` and ``g.T @ h_block`` into ``d W``, one ``BLOCK_H`` column block at a time. Tiles of
one row block (or one vocabulary block) add into the same rows from different programs: by fp32 /
fp64 atomic adds, or, for a 16-bit accumulator, by a read-modify-write under a per-(block, column
block) spin lock -- the accumulator is then the gradient itself and nothing else is allocated.
Four matmul passes instead of three, and summation order (hence the last bits) varies run to run.
The atomic traffic (every tile adds ``BLOCK_N x H`` and ``BLOCK_V x H`` values) keeps it far
from the matmul rate on a GPU.

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


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs of (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages) tuples; under the interpreter
    one small config instead (autotuning there takes one)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
            for bn, bv, bh, w, s in shapes]


def _lse_configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages). Shared memory ~ stages * (BN + BV) * BH * bytes:
    # 128x256x64 bf16 x 3 stages = 144 KiB of Hopper's 227 KiB. Configs that do not fit (fp32
    # inputs) are skipped by the autotuner; the default fits fp32 too (144 KiB). Checked offline
    # for sm_90 (Triton 3.9 and 3.6, bf16, H % 64 == 0): all pipeline the H loop (multi-buffered
    # wgmma); 128x128 w8 uses <= 255 registers without spills, 128x256 w8 spills 340-450 B in the
    # epilogue, the others <= 48 B. (128x128 and 64x256 with 4 warps spilled 600 B and were dropped.)
    default = (64, 128, 64, 4, 3)
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (128, 256, 64, 8, 3), default]
    return _configs(shapes if AUTOTUNE else [default])


@triton.jit
def _logits_tile(
    a_base,  # [BN, 1] pointers to the hidden rows
    b_base,  # [1, BV] pointers to the weight rows (vocabulary columns)
    mask_n,
    mask_v,
    H_DIM,
    stride_hh,
    stride_wh,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """``[BN, BV]`` fp32 logits of a block of rows against a block of vocabulary columns: the
    ``BLOCK_H`` loop over the hidden size (inlined into the kernels that call it)."""
    offs_k0 = tl.arange(0, BLOCK_H)
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
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


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
    a_base = h_ptr + rows[:, None] * stride_hn  # [BN, 1]

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_N], tl.float32)
    t_i = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        b_base = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv  # [1, BV]
        acc = _logits_tile(a_base, b_base, mask_n, mask_v, H_DIM, stride_hh, stride_wh,
                           UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H)  # [BN, BV] fp32
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        if STORE_LOGITS:
            l_ptrs = l_ptr + rows[:, None] * stride_ln + offs_v[None, :]
            tl.store(l_ptrs, acc.to(l_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
        acc = tl.where(mask_v[None, :], acc, float("-inf"))
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(acc, axis=1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of -inf logits (a bias mask): 0, not NaN
        s_i = s_i * tl.exp(m_i - m_sub) + tl.sum(tl.exp(acc - m_sub[:, None]), axis=1)
        m_i = m_new
    p_off = rows * stride_pn + pid_s
    tl.store(pm_ptr + p_off, m_i, mask=mask_n)
    tl.store(ps_ptr + p_off, s_i, mask=mask_n)
    # Exactly one split holds each row's target: a plain store, no race.
    tl.store(tl_ptr + rows, t_i, mask=mask_n & (tgt >= v_lo) & (tgt < v_hi))


@triton.autotune(configs=_lse_configs(), key=["H_DIM", "HAS_BIAS"])
@triton.heuristics({"EVEN_H": lambda a: a["H_DIM"] % a["BLOCK_H"] == 0})
@triton.jit
def _grad_gemm_kernel(
    h_ptr,  # [n, H] hidden rows
    w_ptr,  # [VC, H] the LM weight rows of this column chunk
    b_ptr,  # [VC] their bias (unused if not HAS_BIAS)
    t_ptr,  # [n] int64 targets (vocabulary ids)
    lse_ptr,  # [n] fp32 log-sum-exp from the forward
    scale_ptr,  # [1] fp32 upstream gradient
    g_ptr,  # [n, VC] out: (softmax - onehot) * scale
    N,
    VC,
    H_DIM,
    V0,  # vocabulary id of column 0
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_gn,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    GROUP_N: tl.constexpr = 8,
):
    # A GEMM tile with an epilogue (grad_mode="recompute", see recompute.py). Programs are ordered
    # in groups of GROUP_N row blocks per column block so that both operand tiles are reused from
    # L2 (the hidden rows are re-read once per column block otherwise).
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(VC, BLOCK_V)
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < VC
    a_base = h_ptr + rows[:, None] * stride_hn  # [BN, 1]
    b_base = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv  # [1, BV]
    acc = _logits_tile(a_base, b_base, mask_n, mask_v, H_DIM, stride_hh, stride_wh,
                       UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H)  # [BN, BV] fp32 logits
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=mask_n, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=mask_n, other=-1)
    scale = tl.load(scale_ptr)
    p = tl.exp(acc - lse[:, None])  # a -inf logit (bias mask) gives 0
    p = tl.where((offs_v + V0)[None, :] == tgt[:, None], p - 1.0, p) * scale
    g_ptrs = g_ptr + rows[:, None] * stride_gn + offs_v[None, :]
    tl.store(g_ptrs, p.to(g_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


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
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in _lse_kernel
        s_i = s_i * tl.exp(m_i - m_sub) + tl.sum(tl.exp(z - m_sub[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(s_i)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask = mask_n[:, None] & (offs_v < V)[None, :]
        z = tl.load(row_ptrs + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse[:, None])
        p = tl.where(offs_v[None, :] == tgt[:, None], p - 1.0, p)
        tl.store(row_ptrs + offs_v[None, :], p.to(l_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _locked_add(ptrs, val, mask, lock_ptr):
    """``*ptrs += val`` under a spin lock: a read-modify-write in the buffer's own dtype (bf16
    has no native atomic add everywhere, and none in the interpreter). Acquire/release on the lock
    orders the plain load and store; ``.cg`` reads from L2, past a possibly stale L1 line. The
    scalar lock operations run on one thread: the barrier keeps it from releasing the lock before
    every warp of the program has stored its part of the tile."""
    while tl.atomic_cas(lock_ptr, 0, 1) == 1:
        pass
    cur = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(ptrs, (cur.to(tl.float32) + val).to(ptrs.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    tl.atomic_xchg(lock_ptr, 0)


@triton.jit
def _add_product(
    a,  # [R, K] left operand (K = the logits tile's other side)
    b_rows,  # [K, 1] pointers to the K rows of the right operand, one row of H each
    mask_b,  # [K]
    stride_bh,
    out_rows,  # [R, 1] pointers to the R output rows, H contiguous
    mask_out,  # [R]
    lock_ptr,  # this row block's locks, one per column block (LOCKED only)
    start,  # first column block
    H_DIM,
    LOCKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[:, k] += a @ b[:, k]`` for every ``BLOCK_H`` column block ``k`` of H, from ``start``
    round: by relaxed atomic adds, or under the column block's lock (16-bit accumulators)."""
    chunks = tl.cdiv(H_DIM, BLOCK_H)
    for i in range(0, chunks):
        kc = (i + start) % chunks
        offs_k = kc * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_k = offs_k < H_DIM
        b = tl.load(b_rows + offs_k[None, :] * stride_bh, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        d = tl.dot(a, b, input_precision=DOT_PRECISION)  # [R, BLOCK_H] fp32
        ptrs = out_rows + offs_k[None, :]
        mask = mask_out[:, None] & mask_k[None, :]
        if LOCKED:
            _locked_add(ptrs, d, mask, lock_ptr + kc)
        else:
            tl.atomic_add(ptrs, d.to(ptrs.dtype.element_ty), mask=mask, sem="relaxed")  # order does not matter


def _recompute_configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages). No GPU timing yet: the autotuner picks. Compiled
    # offline for sm_90 (benchmarks/triton_resources.md, specialised as the JIT does at the GPU
    # benchmark's shape), all of these are free of register spills with bf16 inputs, atomics or
    # locks, except 128x256 with fp32 atomics (270 B under Triton 3.9, 8 B under 3.6). Taller or
    # wider tiles halve the atomic traffic into d W (BLOCK_N = 256) or d hidden (BLOCK_V = 256), at
    # fewer programs per wave.
    shapes = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (256, 128, 32, 8, 3), (128, 256, 32, 8, 3),
              (64, 128, 32, 4, 3)]
    if not AUTOTUNE:  # one config (CUDA tests): the likely winner, which fits fp32 in shared memory too
        shapes = [(128, 128, 32, 8, 2)]
    return _configs(shapes)


@triton.autotune(
    configs=_recompute_configs(),
    key=["V", "H_DIM", "HAS_BIAS", "NEED_DH", "NEED_DW", "LOCKED"],
    # the kernel accumulates into its outputs: every autotuning trial must start from zeros
    reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"],
)
@triton.heuristics({"EVEN_H": lambda a: a["H_DIM"] % a["BLOCK_H"] == 0})
@triton.jit
def _recompute_grad_kernel(
    h_ptr,  # [n, H] hidden rows (all with a target)
    w_ptr,  # [V, H] LM weight
    b_ptr,  # [V] bias (unused if not HAS_BIAS)
    t_ptr,  # [n] int64 targets
    lse_ptr,  # [n] fp32 log-sum-exp from the forward
    go_ptr,  # [1] fp32 upstream gradient of the summed loss
    dh_ptr,  # [n, H] d hidden accumulator (zeros)
    dw_ptr,  # [V, H] d weight accumulator (zeros)
    db_ptr,  # [V] fp32 d bias accumulator (zeros)
    dh_lock_ptr,  # [cdiv(n, BLOCK_N), cdiv(H, BLOCK_H)] int32 zeros (LOCKED only)
    dw_lock_ptr,  # [cdiv(V, BLOCK_V), cdiv(H, BLOCK_H)] int32 zeros (LOCKED only)
    N,
    V,
    H_DIM,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dhn,
    stride_dwv,
    HAS_BIAS: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    LOCKED: tl.constexpr,  # low-precision accumulators: locked read-modify-write; else atomic adds
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    GROUP_N: tl.constexpr = 8,
):
    # One program per [BLOCK_N rows, BLOCK_V columns] tile of the logits. Programs are ordered so
    # that GROUP_N row blocks sweep the vocabulary together (weight tiles are re-read from L2).
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    rows = offs_n.to(tl.int64)
    cols = offs_v.to(tl.int64)
    offs_k0 = tl.arange(0, BLOCK_H)
    a_base = h_ptr + rows[:, None] * stride_hn  # [BN, 1]
    w_rows = w_ptr + cols[:, None] * stride_wv  # [BV, 1]

    # 1. the logits tile again, exactly as the forward made it (fp32 accumulator)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H_DIM, BLOCK_H):
        offs_k = k0 + offs_k0
        if EVEN_H:
            a = tl.load(a_base + offs_k[None, :] * stride_hh, mask=mask_n[:, None], other=0.0)
            b = tl.load(w_rows + offs_k[None, :] * stride_wh, mask=mask_v[:, None], other=0.0)
        else:
            mask_k = offs_k < H_DIM
            a = tl.load(a_base + offs_k[None, :] * stride_hh, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_rows + offs_k[None, :] * stride_wh, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]

    # 2. d logits = (softmax - onehot) * upstream gradient, from the forward's fp32 log-sum-exp
    lse = tl.load(lse_ptr + rows, mask=mask_n, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=mask_n, other=-1)
    go = tl.load(go_ptr)
    p = tl.exp(acc - lse[:, None])
    p = tl.where(offs_v[None, :] == tgt[:, None], p - 1.0, p)
    g = tl.where(mask_n[:, None] & mask_v[None, :], p * go, 0.0)  # [BN, BV] fp32
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(g, axis=0), mask=mask_v, sem="relaxed")
    if UPCAST:
        g_op = g
    else:
        g_op = g.to(h_ptr.dtype.element_ty)  # tensor-core operand, as the eager path's bf16 buffer

    # 3. d hidden[rows] += g @ W[cols] and d W[cols] += g.T @ hidden[rows]. The tiles that add into
    #    the same d hidden rows share pid_n and differ in pid_v (and the other way round for d W):
    #    starting at column block pid_v (pid_n) spreads them over different blocks, so that
    #    concurrent programs rarely wait on one lock or address.
    chunks = tl.cdiv(H_DIM, BLOCK_H)
    if NEED_DH:
        _add_product(g_op, w_rows, mask_v, stride_wh, dh_ptr + rows[:, None] * stride_dhn, mask_n,
                     dh_lock_ptr + pid_n * chunks, pid_v, H_DIM, LOCKED, UPCAST, DOT_PRECISION, BLOCK_H)
    if NEED_DW:
        # [BV, BH] products with H innermost, as d W is laid out: each thread's neighbouring
        # accumulator elements are neighbours in memory too (the atomics coalesce); a [BH, BV]
        # product (g as the right operand, no transpose) compiles to the same registers but
        # scatters them
        _add_product(tl.trans(g_op), a_base, mask_n, stride_hh, dw_ptr + cols[:, None] * stride_dwv, mask_v,
                     dw_lock_ptr + pid_v * chunks, pid_n, H_DIM, LOCKED, UPCAST, DOT_PRECISION, BLOCK_H)


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

    def loss_only(self, hidden, weight, bias, targets, chunk_size=None) -> torch.Tensor:
        # Streams over the vocabulary tiles: no [chunk, V] buffer, so chunk_size has nothing to bound.
        self._check(hidden, weight)
        with _on_device(hidden):
            lse, tgt = logits_lse(hidden, weight, bias, targets, None)
        return lse - tgt

    def lse(self, hidden, weight, bias, targets, chunk_size=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(hidden, weight)
        with _on_device(hidden):
            return logits_lse(hidden, weight, bias, targets, None)

    def grad_block(self, hidden, weight, bias, targets, lse, scale, v0: int, out) -> None:
        self._check(hidden, weight)
        r, vc = out.shape
        if not (r and vc):
            return
        grid = lambda meta: (triton.cdiv(r, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),)  # noqa: E731
        with _on_device(hidden):
            _grad_gemm_kernel[grid](
                hidden, weight, bias if bias is not None else weight, targets, lse, scale, out,
                r, vc, hidden.shape[1], v0,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
                HAS_BIAS=bias is not None, UPCAST=INTERPRET and hidden.dtype != torch.float32,
                DOT_PRECISION=_dot_precision(hidden.dtype),
            )  # fmt: skip
        if out.dtype != hidden.dtype:  # interpreter, 16-bit inputs: round as the GPU's store would
            out.copy_(out.to(hidden.dtype))

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


def _min_blocks() -> tuple[int, int, int]:
    """Smallest (BLOCK_N, BLOCK_V, BLOCK_H) of the recompute configs: lock arrays are sized for
    them, so that they fit whichever config the autotuner picks."""
    cfgs = _recompute_grad_kernel.configs
    return tuple(min(c.kwargs[k] for c in cfgs) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))  # type: ignore[return-value]


def recompute_tile_grads(
    hidden: torch.Tensor,  # [n, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [n] int64
    lse: torch.Tensor,  # [n] fp32
    grad_out: torch.Tensor,  # 0-dim, upstream gradient of the summed loss
    needs: tuple[bool, bool, bool],
    accum_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i CE(hidden[i] @ W.T + b, t[i])`` scaled by ``grad_out``, the logits
    recomputed tile by tile: no ``[chunk, V]`` buffer, only the gradients themselves.

    fp32 / fp64 ``accum_dtype``: both gradients accumulate by atomic adds in that dtype and are
    cast at the end. A 16-bit ``accum_dtype``: they accumulate in the parameters' own dtype under
    tile locks, so nothing beyond the returned gradients is allocated (cut-cross-entropy's memory,
    with its rounding: one per tile added). ``d bias`` is always accumulated in fp32.
    """
    need_dh, need_dw, need_db = needs
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    locked = accum_dtype not in (torch.float32, torch.float64)
    # The interpreter can only round-to-zero into bf16: locked accumulation runs in fp32 there
    # (same lock code path), cast once at the end.
    buf_dtype = torch.float32 if (locked and INTERPRET) else accum_dtype
    dh_dtype = hidden.dtype if locked and not INTERPRET else buf_dtype
    dw_dtype = weight.dtype if locked and not INTERPRET else buf_dtype
    dh = hidden.new_zeros((n, hdim), dtype=dh_dtype) if need_dh else None
    dw = weight.new_zeros((vocab, hdim), dtype=dw_dtype) if need_dw else None
    db = weight.new_zeros((vocab,), dtype=torch.float32) if need_db else None
    if n and any(needs):
        bn, bv, bh = _min_blocks()
        chunks = triton.cdiv(hdim, bh)
        dh_lock = hidden.new_zeros((triton.cdiv(n, bn) * chunks,), dtype=torch.int32) if locked and need_dh else None
        dw_lock = hidden.new_zeros((triton.cdiv(vocab, bv) * chunks,), dtype=torch.int32) if locked and need_dw else None
        go = grad_out.detach().float().reshape(1)
        # Pointers a specialisation never reads. Not ``lse``: the autotuner zeroes whatever is
        # passed as dh/dw/db (``reset_to_zero``) between its trials.
        dummy = lse.new_zeros(1)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
        with _on_device(hidden):
            _recompute_grad_kernel[grid](
                hidden, weight, bias if bias is not None else dummy, targets, lse, go,
                *(x if x is not None else dummy for x in (dh, dw, db, dh_lock, dw_lock)),
                n, vocab, hdim,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                dh.stride(0) if dh is not None else 0, dw.stride(0) if dw is not None else 0,
                HAS_BIAS=bias is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, LOCKED=locked,
                UPCAST=INTERPRET and hidden.dtype != torch.float32,
                DOT_PRECISION=_dot_precision(hidden.dtype),
            )  # fmt: skip
    d_hidden = dh.to(hidden.dtype) if dh is not None else None
    d_weight = dw.to(weight.dtype) if dw is not None else None
    d_bias = db.to(bias.dtype) if db is not None else None
    return d_hidden, d_weight, d_bias
