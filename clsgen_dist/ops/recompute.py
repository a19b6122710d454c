"""``grad_mode="recompute"``: no logits buffer. The backward recomputes the logits and makes the
gradients with plain GEMMs, using the not-yet-written rows of ``d W`` as its scratch.

Forward: the per-row log-sum-exp and target logit only (the backend's ``lse``; the Triton one
streams over the vocabulary tiles and holds no ``[chunk, V]`` buffer). Saved for backward:
hidden, weight, bias, targets and the ``[n]`` fp32 log-sum-exp.

Backward, when the LM weight is trained: the vocabulary is cut into column chunks ``[v0, v1)``.
For each chunk the backend recomputes ``G = (softmax - onehot) * grad`` for all rows and those
columns (fp32 logits, the saved fp32 log-sum-exp, one rounding into ``G``'s dtype) into a scratch
``[n, v1 - v0]`` that lies in the bytes of ``d W``'s rows ``>= v1``: rows that no chunk has
written yet. Then::

    d W[v0:v1]  = G.T @ hidden     one GEMM over all the rows: written once, never accumulated
    d hidden   += G @ W[v0:v1]
    d b[v0:v1]  = G.sum(0)

Each chunk is as wide as the free rows allow, so the chunks shrink geometrically, by a factor
``1 + r`` with ``r = n * |G element| / (H * |d W element|)`` (``r`` = 4 at 16k bf16 rows and
H = 4096: 37 chunks for a 128k vocabulary), until the last columns, which take a temporary of at
most ``TAIL_BYTES`` (or ``MIN_COLS * (1 + r)`` columns). Memory beyond the gradients it returns:
that temporary, and an fp32 ``d hidden`` when ``accum_dtype`` is fp32 with 16-bit inputs.

Cost: four matmul passes over ``n x H x V`` (the logits twice), a third more than eager, all of
them GEMMs at full size: cuBLAS (or the CPU's BLAS) for ``d W`` and ``d hidden``, and for the
recompute a Triton GEMM whose epilogue forms ``G`` (Triton backend) or a BLAS GEMM followed by
in-place elementwise ops (torch backend). No atomics, no locks: the order of every sum is fixed.

Rounding: ``d W`` and ``d b`` are rounded once. ``d hidden`` accumulates over the chunks in
``accum_dtype`` -- fp32 (an ``[n, H]`` fp32 buffer), or a 16-bit one in place in the returned
gradient with one rounding per chunk (cut-cross-entropy's memory). When ``r`` would exceed
``MAX_RATIO`` (many rows, a small H: more than ``8 * H`` rows at equal dtypes), rows are taken in
blocks and ``d W[v0:v1]`` sums over the blocks: in ``accum_dtype`` when that is wider than ``d W``'s
dtype (an accumulator placed in the free rows after the chunk's scratch), else in ``d W`` itself.

``G`` is stored already scaled by the upstream gradient (typically ``coef / tokens``): in bf16 that
costs nothing (fp32's exponent range), in fp16 the small probabilities of a large vocabulary
underflow (the config offers no fp16; through the op, prefer eager for fp16).

A frozen LM weight has no ``d W`` to borrow: rows are then taken ``chunk_size`` at a time with a
``[chunk, V]`` temporary (the eager path's buffer), and each row's ``d hidden`` is one GEMM.
``chunk_size`` bounds that buffer and the torch backend's forward buffer; nothing else.

``grad_mode="recompute_tiles"`` (``triton_fused.recompute_tile_grads``, the same autograd function)
is the single-kernel alternative: one program per logits tile, gradients added by atomics or under tile
locks. Same memory; on the H200 it ran at 6.3x the matmul floor (``benchmarks/fused_loss.md``).
"""

from __future__ import annotations

import torch

from .chunked import ChunkBackend, addmm_acc_, mm_into

# The last columns of the vocabulary, whose scratch no longer fits in d W's free rows, take a
# temporary of at most this many bytes (or MIN_COLS * (1 + r) columns, whichever is larger).
TAIL_BYTES = 1 << 20
# Narrower chunks than this stop the schedule: the rest is the tail.
MIN_COLS = 8
# Rows per block are capped so that r <= MAX_RATIO (the chunks then shrink by >= 1/9 each).
MAX_RATIO = 8
# Byte alignment of every scratch inside d W (GEMM operands start on 256-byte boundaries).
ALIGN = 256
# Chunks at least this wide are a multiple of it: the scratch's row stride (= the chunk's width)
# then keeps the GEMMs' leading dimensions aligned (cuBLAS picks slower kernels otherwise).
COL_ALIGN = 64


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def column_plan(rows: int, vocab: int, hdim: int, g_bytes: int, dw_bytes: int,
                col_bytes: int = 0) -> list[tuple[int, int, int | None]]:
    """Column chunks ``(v0, v1, offset)`` covering ``[0, vocab)``: ``offset`` is the byte offset in
    ``d W`` of the chunk's ``[rows, v1 - v0]`` scratch (past row ``v1``), followed, when
    ``col_bytes`` > 0, by ``col_bytes`` per column (at the next ``ALIGN`` boundary; the fp32
    accumulator of ``d W[v0:v1]``); ``None`` for the tail, which takes temporaries."""
    total = vocab * hdim * dw_bytes
    row_bytes = hdim * dw_bytes

    def end(v0: int, vc: int) -> int:  # first byte past the chunk's scratch
        return _align(_align((v0 + vc) * row_bytes) + rows * vc * g_bytes) + vc * col_bytes

    plan: list[tuple[int, int, int | None]] = []
    v0 = 0
    while v0 < vocab:
        if (rows * g_bytes + col_bytes) * (vocab - v0) <= TAIL_BYTES:
            plan.append((v0, vocab, None))
            break
        # widest vc with end(v0, vc) <= total
        vc = max(0, (total - v0 * row_bytes - 2 * ALIGN) // (row_bytes + rows * g_bytes + col_bytes))
        while vc > 0 and end(v0, vc) > total:
            vc -= 1
        if vc >= COL_ALIGN:
            vc -= vc % COL_ALIGN
        if vc < MIN_COLS:
            plan.append((v0, vocab, None))
            break
        plan.append((v0, v0 + vc, _align((v0 + vc) * row_bytes)))
        v0 += vc
    return plan


def row_block(n: int, hdim: int, g_bytes: int, dw_bytes: int) -> int:
    """Rows per block: all of them unless ``r`` would pass ``MAX_RATIO``."""
    return min(n, max(1, MAX_RATIO * hdim * dw_bytes // g_bytes))


def _scratch(dw: torch.Tensor, offset: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` tensor of ``dtype`` over the bytes of ``dw`` from ``offset`` (unwritten rows)."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    return dw.view(-1).view(torch.uint8)[offset : offset + nbytes].view(dtype).view(shape)


def recompute_grads(
    hidden: torch.Tensor,  # [n, H], every row with a target
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [n] int64 in [0, V)
    lse: torch.Tensor,  # [n] fp32, from the forward
    grad_out: torch.Tensor,  # 0-dim upstream gradient of the summed loss
    needs: tuple[bool, bool, bool],  # (d hidden, d weight, d bias)
    accum_dtype: torch.dtype,
    backend: ChunkBackend,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i CE(hidden[i] @ W.T + b, t[i])`` times ``grad_out`` (see the module doc)."""
    need_dh, need_dw, need_db = needs
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    gdt = backend.compute_dtype(weight)  # dtype of G and of the GEMM operands
    w_mm = backend.prepare_weight(weight)
    h_mm = hidden if hidden.dtype == gdt else hidden.to(gdt)  # operand of the d W GEMM
    scale = grad_out.detach().float().reshape(1)  # stays on the device: no host sync
    # d hidden accumulates over the column chunks: fp32 (or fp64) as asked, or 16-bit in place
    dh_dtype = hidden.dtype if accum_dtype.itemsize < 4 else torch.promote_types(accum_dtype, hidden.dtype)
    dh = hidden.new_empty((n, hdim), dtype=dh_dtype) if need_dh else None
    db = weight.new_zeros((vocab,), dtype=torch.float32) if need_db else None
    dw = None

    if n and not need_dw:
        # Frozen weight: rows a chunk at a time against the whole vocabulary, one [rows, V] temporary.
        rows = max(1, min(n, chunk_size or backend.default_chunk_rows(n, vocab, weight)))
        buf = hidden.new_empty((rows, vocab), dtype=gdt)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            g = buf[: e - s]
            backend.grad_block(hidden[s:e], w_mm, bias, targets[s:e], lse[s:e], scale, 0, g)
            if need_dh:
                mm_into(dh[s:e], g, w_mm)
            if need_db:
                db += g.sum(dim=0, dtype=torch.float32)
    elif n:
        dw = weight.new_empty((vocab, hdim))  # also the scratch of every chunk but the tail
        rows = row_block(n, hdim, gdt.itemsize, dw.element_size())
        # Rows in blocks: d W[v0:v1] sums over them, in accum_dtype when that is wider than d W's
        # (an accumulator that also lies in d W's free rows, after the chunk's G)
        acc_dtype = accum_dtype if rows < n and accum_dtype.itemsize > dw.element_size() else None
        col_bytes = hdim * acc_dtype.itemsize if acc_dtype is not None else 0
        plan = column_plan(rows, vocab, hdim, gdt.itemsize, dw.element_size(), col_bytes)
        for ci, (v0, v1, offset) in enumerate(plan):
            vc = v1 - v0
            tail = hidden.new_empty((rows, vc), dtype=gdt) if offset is None else None
            if acc_dtype is None:
                acc = dw[v0:v1]
            elif offset is None:
                acc = hidden.new_empty((vc, hdim), dtype=acc_dtype)
            else:
                acc = _scratch(dw, _align(offset + rows * vc * gdt.itemsize), (vc, hdim), acc_dtype)
            w_c = w_mm[v0:v1]  # [vc, H]
            b_c = bias[v0:v1] if bias is not None else None
            for bi, s in enumerate(range(0, n, rows)):
                e = min(n, s + rows)
                g = tail[: e - s] if tail is not None else _scratch(dw, offset, (e - s, vc), gdt)
                backend.grad_block(hidden[s:e], w_c, b_c, targets[s:e], lse[s:e], scale, v0, g)
                if bi == 0:
                    mm_into(acc, g.t(), h_mm[s:e])
                else:
                    addmm_acc_(acc, g.t(), h_mm[s:e])
                if need_dh:
                    if ci == 0:
                        mm_into(dh[s:e], g, w_c)
                    else:
                        addmm_acc_(dh[s:e], g, w_c)
                if need_db:
                    db[v0:v1] += g.sum(dim=0, dtype=torch.float32)
            if acc_dtype is not None:
                dw[v0:v1].copy_(acc)  # one rounding of the sum over the row blocks
            del tail, acc
    else:  # no rows: zero gradients
        dw = weight.new_zeros((vocab, hdim)) if need_dw else None
        if dh is not None:
            dh.zero_()
    d_hidden = dh.to(hidden.dtype) if dh is not None else None
    d_bias = db.to(bias.dtype) if db is not None else None
    return d_hidden, dw, d_bias


class RecomputeLinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(hidden[i] @ weight.T + bias, targets[i])``: the forward keeps the log-sum-exp
    (``backend.lse``), the backward recomputes the logits with ``grads(hidden, weight, bias,
    targets, lse, grad_out, needs)``: :func:`recompute_grads` (``grad_mode="recompute"``) or
    ``triton_fused.recompute_tile_grads`` (``"recompute_tiles"``), its other arguments bound.

    Unlike the eager path the weight must still be readable in backward -- under ZeRO-3 the
    module's pre-backward hook gathers it again (``DualHeadOutput``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, backend, chunk_size, grads):
        lse, tgt = backend.lse(hidden, weight, bias, targets, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.grads = grads
        return (lse - tgt).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        d_hidden, d_weight, d_bias = ctx.grads(hidden, weight, bias, targets, lse, grad_out,
                                               tuple(ctx.needs_input_grad[:3]))
        return d_hidden, d_weight, d_bias, None, None, None, None
