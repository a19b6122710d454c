"""Chunked linear + cross-entropy (summed), gradients computed in the forward pass.

``LinearCrossEntropySum`` takes rows that all have a target (the caller dropped ignored rows) and
returns ``sum_i CE(hidden[i] @ W.T + b, target[i])`` as a 0-dim fp32 tensor without ever holding
the ``[n, V]`` logits: rows are processed ``chunk`` at a time, and only one ``[chunk, V]`` buffer
exists.

Why gradients in the forward (the Liger / CCE trick) rather than recomputing in backward: the loss
is a sum whose upstream gradient ``g`` is a scalar, so ``d hidden``, ``d W`` and ``d b`` can be
computed unscaled while the chunk's logits are at hand and multiplied by ``g`` in backward. That
costs three matmuls (logits, ``dlogits @ W``, ``dlogits.T @ hidden``) -- the same as the naive
forward + backward -- where recomputation costs four, and the peak memory is the same (one chunk
buffer; the fp32 gradient buffers exist in either scheme). Unscaled gradients are kept in fp32
(``accum_dtype`` for ``d W``) until backward so that ``g`` (typically ``coef / global_count``) is
applied before the single rounding to the parameter dtype.

The per-chunk work (logits, log-sum-exp, ``softmax - onehot``) is done by a *backend*:
``TorchChunkBackend`` here (CPU, and the CUDA fallback without Triton) or the Triton backend in
``triton_fused.py`` (CUDA, or the CPU interpreter in tests). The two gradient matmuls are shared.

Consequences of computing gradients eagerly, all handled: forward under ``torch.no_grad`` skips
them (the caller passes ``needs``); backward may run once (it scales the saved buffers in place).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

# Rows per chunk are chosen so that one [chunk, V] buffer in the backend's compute dtype stays
# under this many bytes (the op's only O(V) per-row memory). 64 MiB keeps the CPU path at ~1/10
# of the naive peak with no measurable slowdown (benchmarks/fused_loss.md).
TORCH_CHUNK_BYTES = 64 * 2**20


def default_chunk_rows(n: int, vocab: int, elem_bytes: int, budget_bytes: int, multiple: int = 8) -> int:
    """Rows per chunk so that a ``[rows, vocab]`` buffer fits ``budget_bytes`` (at least ``multiple``)."""
    rows = budget_bytes // max(1, vocab * elem_bytes)
    rows = max(multiple, rows // multiple * multiple)
    return max(1, min(n, rows))


class ChunkBackend(Protocol):
    """Per-chunk work of :class:`LinearCrossEntropySum`."""

    def compute_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """dtype of the ``[chunk, V]`` buffer and of the operands of the gradient matmuls."""

    def default_chunk_rows(self, n: int, vocab: int, weight: torch.Tensor) -> int: ...

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as used by the gradient matmuls (may be an fp32 copy)."""

    def lse(self, hidden, weight, bias, targets, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n]`` fp32 log-sum-exp and target logit per row, no gradients and no ``[chunk, V]``
        buffer if possible (else one of ``chunk_size`` rows)."""

    def loss_only(self, hidden, weight, bias, targets, chunk_size: int | None = None) -> torch.Tensor:
        """``[n]`` fp32 per-row losses (``lse - target logit``)."""

    def chunk(self, hidden, weight, bias, targets, buf, need_grad: bool) -> torch.Tensor:
        """``[c]`` fp32 per-row losses; if ``need_grad``, leaves ``softmax - onehot`` in ``buf``."""

    def grad_block(self, hidden, weight, bias, targets, lse, scale, v0: int, out) -> None:
        """``out[r, vc] = (softmax - onehot) * scale`` of ``hidden[r]`` against the vocabulary
        columns ``[v0, v0 + vc)`` (``weight`` / ``bias`` are those rows), from the fp32 logits and
        the given fp32 ``lse``; ``targets`` are vocabulary ids, ``scale`` a 1-element fp32 tensor."""


class TorchChunkBackend:
    """Plain PyTorch: logits of a chunk, in-place LSE and ``softmax - onehot``, in fp32.

    Two modes. *fp32* (CPU, and any fp32 weight): everything in fp32, a 16-bit weight is copied to
    fp32 once per call (CPU has no fast 16-bit GEMM with fp32 output). *mixed* (a 16-bit weight on
    CUDA: the fallback where Triton is missing): the weight and hidden states stay 16-bit; the logits
    are computed with fp32 output (``mm_into_f32``) ``TORCH_CHUNK_BYTES`` worth of rows at a time into
    an fp32 scratch, where the LSE and ``softmax - onehot`` are taken, and ``softmax - onehot`` is
    rounded into the chunk's 16-bit buffer, which the two gradient GEMMs read with fp32 accumulation
    (as the Triton backend does). ``mixed`` forces a mode (tests run the mixed one on CPU)."""

    name = "torch"

    def __init__(self, mixed: bool | None = None) -> None:
        self.mixed = mixed

    def _mixed(self, weight: torch.Tensor) -> bool:
        return self.mixed if self.mixed is not None else (weight.is_cuda and _low_precision(weight))

    def compute_dtype(self, weight: torch.Tensor) -> torch.dtype:
        return weight.dtype if self._mixed(weight) else torch.float32

    def default_chunk_rows(self, n: int, vocab: int, weight: torch.Tensor) -> int:
        return default_chunk_rows(n, vocab, self.compute_dtype(weight).itemsize, TORCH_CHUNK_BYTES)

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # fp32 mode: a low-precision weight gets an fp32 copy ([V, H] x 4 bytes) for the whole call.
        return weight if self._mixed(weight) or weight.dtype == torch.float32 else weight.float()

    def lse(self, hidden, weight, bias, targets, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 logits of ``chunk_size`` rows at a time (default: TORCH_CHUNK_BYTES of them). The mixed
        # mode's ``chunk_size`` bounds a 16-bit buffer that this path does not have: its fp32 scratch
        # keeps to TORCH_CHUNK_BYTES, as the sub-blocks of ``_chunk_mixed`` / ``grad_block`` do.
        n, vocab = hidden.shape[0], weight.shape[0]
        budget_rows = default_chunk_rows(n, vocab, 4, TORCH_CHUNK_BYTES)
        rows = chunk_size or budget_rows
        if self._mixed(weight):
            rows = min(rows, budget_rows)
        rows = max(1, min(n, rows))
        weight = self.prepare_weight(weight)
        lse = hidden.new_empty((n,), dtype=torch.float32)
        tgt = hidden.new_empty((n,), dtype=torch.float32)
        scratch = hidden.new_empty((rows, vocab), dtype=torch.float32) if n else None
        for s in range(0, n, rows):
            e = min(n, s + rows)
            z = scratch[: e - s]
            self._logits_f32(z, hidden[s:e], weight, bias)
            lse[s:e], tgt[s:e] = self._lse_and_grad(z, targets[s:e], False)
        return lse, tgt

    def loss_only(self, hidden, weight, bias, targets, chunk_size: int | None = None) -> torch.Tensor:
        lse, tgt = self.lse(hidden, weight, bias, targets, chunk_size)
        return lse - tgt

    def _logits_f32(self, out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias) -> None:
        """``out = hidden @ weight.T + bias`` in fp32 (16-bit operands in the mixed mode)."""
        if self._mixed(weight):
            mm_into_f32(out, hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype), weight.t())
            if bias is not None:
                out.add_(bias.float())
        elif bias is None:
            torch.mm(hidden.float(), weight.t(), out=out)
        else:
            torch.addmm(bias.float(), hidden.float(), weight.t(), out=out)

    def grad_block(self, hidden, weight, bias, targets, lse, scale, v0: int, out) -> None:
        r, vc = out.shape
        if out.dtype == torch.float32:  # fp32 mode: in place in ``out``
            self._logits_f32(out, hidden, weight, bias)
            _probs_minus_onehot(out, lse, targets, v0, scale)
            return
        # mixed mode: fp32 sub-blocks of rows, each rounded once into the 16-bit ``out``
        sub = default_chunk_rows(r, vc, 4, TORCH_CHUNK_BYTES)
        scratch = hidden.new_empty((min(sub, r), vc), dtype=torch.float32)
        for s in range(0, r, sub):
            e = min(r, s + sub)
            z = scratch[: e - s]
            self._logits_f32(z, hidden[s:e], weight, bias)
            _probs_minus_onehot(z, lse[s:e], targets[s:e], v0, scale)
            out[s:e].copy_(z)

    def chunk(self, hidden, weight, bias, targets, buf, need_grad: bool) -> torch.Tensor:
        if self._mixed(weight):
            return self._chunk_mixed(hidden, weight, bias, targets, buf, need_grad)
        logits = buf[: hidden.shape[0]]  # [c, V] fp32, reused across chunks: the only O(V) buffer
        self._logits_f32(logits, hidden, weight, bias)
        lse, tgt = self._lse_and_grad(logits, targets, need_grad)
        return lse - tgt

    def _chunk_mixed(self, hidden, weight, bias, targets, buf, need_grad: bool) -> torch.Tensor:
        c, vocab = hidden.shape[0], weight.shape[0]
        sub = default_chunk_rows(c, vocab, 4, TORCH_CHUNK_BYTES)
        scratch = hidden.new_empty((min(sub, c), vocab), dtype=torch.float32)  # [sub, V] fp32
        losses = []
        for s in range(0, c, sub):
            e = min(c, s + sub)
            z = scratch[: e - s]
            self._logits_f32(z, hidden[s:e], weight, bias)
            lse, tgt = self._lse_and_grad(z, targets[s:e], need_grad)
            losses.append(lse - tgt)
            if need_grad:
                buf[s:e].copy_(z)  # softmax - onehot, rounded once to the 16-bit buffer
        return torch.cat(losses)

    @staticmethod
    def _lse_and_grad(logits: torch.Tensor, targets: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``[c]`` per-row log-sum-exp and target logit of fp32 ``logits`` (overwritten:
        ``softmax - onehot`` if ``need_grad``, else scratch)."""
        c = logits.shape[0]
        tgt = logits.gather(1, targets[:, None])  # [c, 1] target logit, read before the in-place ops
        m = logits.amax(dim=1, keepdim=True)  # [c, 1]
        logits.sub_(m).exp_()  # exp(z - max), in place
        sumexp = logits.sum(dim=1, keepdim=True)  # [c, 1]
        lse = (m + sumexp.log()).squeeze(1)  # [c]
        if need_grad:
            logits.div_(sumexp)  # softmax
            logits.scatter_add_(1, targets[:, None], logits.new_full((c, 1), -1.0))  # - onehot
        return lse, tgt.squeeze(1)


def _probs_minus_onehot(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, v0: int, scale: torch.Tensor) -> None:
    """In place on fp32 logits ``z`` of columns ``[v0, v0 + vc)``: ``(exp(z - lse) - onehot) * scale``
    (no host sync: rows whose target lies outside the columns add 0)."""
    vc = z.shape[1]
    local = targets - v0
    hit = (local >= 0) & (local < vc)
    z.sub_(lse[:, None]).exp_()
    z.scatter_add_(1, local.clamp(0, max(vc - 1, 0))[:, None], -hit.to(z.dtype)[:, None])
    z.mul_(scale)


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_ok(op: str) -> bool:
    """Whether CUDA ``torch.mm`` / ``torch.addmm`` take ``out_dtype=float32`` with bf16 operands (torch >= 2.8),
    and ``addmm`` adds its input (which starts at 1 here, so that dropping it would show)."""
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        c = torch.ones(16, 16, device="cuda", dtype=torch.float32)
        if op == "mm":
            torch.mm(a, a, out_dtype=torch.float32, out=c)
        else:
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool(c[0, 0] == (16 if op == "mm" else 17))  # one-time sync, first call only
    except (RuntimeError, TypeError):
        return False


def _low_precision(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def mm_into_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` with ``out`` fp32; low-precision operands are multiplied with fp32 output."""
    if a.dtype == b.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.is_cuda and a.dtype == b.dtype and _low_precision(a) and _cuda_out_dtype_ok("mm"):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif a.is_cuda:
        out.copy_(torch.mm(a, b.to(a.dtype)))  # old torch: one extra rounding of the product
    else:
        torch.mm(a.float(), b.float(), out=out)  # CPU has no mixed-dtype mm (interpreter tests only)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` in ``out.dtype``: fp32 output as ``mm_into_f32``; a 16-bit ``out`` takes one
    product of 16-bit operands (fp32 accumulation inside the GEMM) or the rounded fp32 product."""
    if out.dtype == torch.float32:
        mm_into_f32(out, a, b)
    elif a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float()))  # CPU / interpreter: fp32 chunk buffers


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in ``acc.dtype`` (the accumulation dtype of the LM weight gradient)."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype and _low_precision(a) and _cuda_out_dtype_ok("addmm"):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda and acc.dtype == torch.float32 and _low_precision(a):
        acc.add_(torch.mm(a, b.to(a.dtype)))  # old torch: [V, H] low-precision temporary per chunk
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(hidden[i] @ weight.T + bias, targets[i])`` over rows that all have a target."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [n, h]
        weight: torch.Tensor,  # [V, h]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [n] int64, all in [0, V)
        backend: ChunkBackend,
        chunk_size: int | None,
        accum_dtype: torch.dtype,
        needs: tuple[bool, bool, bool],  # grads wanted for (hidden, weight, bias)
    ) -> torch.Tensor:
        need_dh, need_dw, need_db = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        ctx.needs = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.done = False
        if not any(needs):
            # Evaluation / frozen everything: no gradient buffers, minimal memory.
            return backend.loss_only(hidden, weight, bias, targets, chunk_size).sum()

        rows = chunk_size or backend.default_chunk_rows(n, vocab, weight)
        rows = max(1, min(rows, n))
        cdt = backend.compute_dtype(weight)
        w_mm = backend.prepare_weight(weight)  # [V, h] as the backend and the d_hidden matmul read it
        # Gradient buffers live from here to backward. d_weight is [V, h] in accum_dtype -- the
        # largest buffer of the op when W is trained. d_hidden ([n, h]) is fp32, or, when
        # accum_dtype is the inputs' own 16-bit dtype, that dtype (half the bytes; one rounding
        # before the upstream scaling, as plain 16-bit autograd would round it).
        dh_dtype = hidden.dtype if accum_dtype in (torch.bfloat16, torch.float16) and hidden.dtype == accum_dtype \
            else torch.float32
        dh = hidden.new_empty((n, hidden.shape[1]), dtype=dh_dtype) if need_dh else None
        dw = weight.new_zeros(weight.shape, dtype=accum_dtype) if need_dw else None
        db = weight.new_zeros((vocab,), dtype=torch.float32) if need_db else None
        row_loss = hidden.new_empty((n,), dtype=torch.float32)
        buf = hidden.new_empty((rows, vocab), dtype=cdt) if n else None  # [chunk, V]: the memory peak
        for s in range(0, n, rows):
            e = min(n, s + rows)
            h_c = hidden[s:e]  # [c, h]
            row_loss[s:e] = backend.chunk(h_c, w_mm, bias, targets[s:e], buf, True)
            dlogits = buf[: e - s]  # [c, V] softmax - onehot, unscaled
            if need_dh:
                mm_into(dh[s:e], dlogits, w_mm)
            if need_dw:
                addmm_acc_(dw, dlogits.t(), h_c if h_c.dtype == cdt else h_c.to(cdt))
            if need_db:
                db += dlogits.sum(dim=0, dtype=torch.float32)
        del buf
        ctx.save_for_backward(dh, dw, db)
        return row_loss.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were made in the forward: no graph of them
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.done:
            raise RuntimeError("dual_head_loss: backward through the fused LM loss can only run once")
        ctx.done = True
        dh, dw, db = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.float()
        # Scale in the fp32/accum buffers first, then a single rounding to the parameter dtype.
        # In place: the buffers are ours and die with the graph.
        d_hidden = dh.mul_(g).to(h_dtype) if dh is not None else None  # 16-bit dh: scaled in fp32, rounded once
        d_weight = dw.mul_(g.to(dw.dtype)).to(w_dtype) if dw is not None else None
        d_bias = db.mul_(g).to(b_dtype) if db is not None else None
        return d_hidden, d_weight, d_bias, None, None, None, None, None
