"""Entry point of the fused dual-head loss: :func:`dual_head_loss` with an ``impl=`` switch."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from .chunked import LinearCrossEntropySum, TorchChunkBackend
from .recompute import RecomputeLinearCrossEntropySum, recompute_grads
from .reference import IGNORE_INDEX, cls_loss_reference, lm_loss_sum_reference

log = logging.getLogger("clsgen_dist.ops")

IMPLS = ("auto", "triton", "torch", "reference")
GRAD_MODES = ("eager", "recompute", "recompute_tiles")
ACCUM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_resolved: dict[str, str] = {}  # device type -> impl chosen by "auto"


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import triton_fused  # noqa: F401
    except Exception as e:  # a broken install must not take the CPU path down with it
        log.warning("dual_head_loss: triton present but unusable (%s); using the torch path", e)
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` stands for on ``device``; ``"auto"`` is resolved once per device type
    ("triton" on CUDA when Triton imports, else "torch") and logged once."""
    if impl not in IMPLS:
        raise ValueError(f"dual_head_loss: impl={impl!r}, expected one of {IMPLS}")
    if impl != "auto":
        return impl
    if device.type not in _resolved:
        _resolved[device.type] = "triton" if device.type == "cuda" and _triton_available() else "torch"
        log.info("dual_head_loss: impl=%s (%s)", _resolved[device.type], device.type)
    return _resolved[device.type]


def _require_triton_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"dual_head_loss: impl='triton' needs CUDA tensors, got {device.type} "
            "(TRITON_INTERPRET=1 runs the CPU interpreter)"
        )


def _backend(impl: str, device: torch.device):
    if impl == "torch":
        return TorchChunkBackend()
    _require_triton_device(device)
    from .triton_fused import TritonChunkBackend  # lazy: Triton is optional

    return TritonChunkBackend()


def _check_inputs(hidden, lm_weight, targets, cls_weight, cls_bias, cls_index, cls_labels, lm_bias) -> None:
    n, h = hidden.shape if hidden.dim() == 2 else (None, None)
    problems = []
    if hidden.dim() != 2:
        problems.append(f"hidden must be [N, H], got {tuple(hidden.shape)}")
    if lm_weight.dim() != 2 or lm_weight.shape[1] != h:
        problems.append(f"lm_weight must be [V, {h}], got {tuple(lm_weight.shape)}")
    if targets.shape != (n,) or targets.dtype != torch.long:
        problems.append(f"targets must be int64 [{n}], got {targets.dtype} {tuple(targets.shape)}")
    if cls_weight.shape != (1, h) or cls_bias.shape != (1,):
        problems.append(f"cls head must be [1, {h}] + [1], got {tuple(cls_weight.shape)} + {tuple(cls_bias.shape)}")
    if cls_index.dim() != 1 or cls_labels.shape != cls_index.shape:
        problems.append(f"cls_index / cls_labels must both be [M], got {tuple(cls_index.shape)} / {tuple(cls_labels.shape)}")
    if lm_bias is not None and lm_bias.shape != (lm_weight.shape[0],):
        problems.append(f"lm_bias must be [{lm_weight.shape[0]}], got {tuple(lm_bias.shape)}")
    if problems:
        raise ValueError("dual_head_loss: " + "; ".join(problems))


def _rows_to_keep(valid, targets, vocab: int, cls_labels) -> torch.Tensor:
    """Indices of the rows with a target, from one host sync that also checks every target is in
    ``[0, V)`` and every label 0 or 1. Unchecked, a bad target is a device-side assert on CUDA (the
    process's CUDA context is lost) or, in the Triton kernel, a silently wrong loss."""
    n = targets.numel()
    bad_target = valid & ((targets < 0) | (targets >= vocab))  # [N]
    bad_label = (cls_labels != 0) & (cls_labels != 1)  # [M]
    hits = torch.cat([valid, bad_target, bad_label]).nonzero().squeeze(1)  # <- host sync (data-dependent size)
    if hits.numel() and hits[-1] >= n:  # one of the checks failed (error path: more syncs are fine)
        problems = []
        rows = bad_target.nonzero().squeeze(1)
        if rows.numel():
            r = int(rows[0])
            problems.append(f"{rows.numel()} target(s) outside [0, {vocab}) and not {IGNORE_INDEX}, first at row "
                            f"{r}: {int(targets[r])}")
        pos = bad_label.nonzero().squeeze(1)
        if pos.numel():
            problems.append(f"cls_labels must be 0 or 1, got {cls_labels[pos[0]].item()} at position {int(pos[0])}")
        raise ValueError("dual_head_loss: " + "; ".join(problems))
    return hits  # every hit is a valid row


def dual_head_loss(
    hidden: torch.Tensor,  # [N, H] fp32 / bf16
    lm_weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N] int64, -100 = ignore
    cls_weight: torch.Tensor,  # [1, H]
    cls_bias: torch.Tensor,  # [1]
    cls_index: torch.Tensor,  # [M] int64 rows of hidden
    cls_labels: torch.Tensor,  # [M] 0/1
    *,
    lm_bias: torch.Tensor | None = None,  # [V]
    impl: str = "auto",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
    grad_mode: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM cross-entropy and classification BCE of a packed batch, straight from hidden states.

    Args:
        hidden: ``[N, H]`` packed hidden states (fp32 or bf16/fp16).
        lm_weight: ``[V, H]`` LM head weight (may be tied to the embeddings, may be frozen). Under
            ZeRO-3 it must be the gathered full weight.
        targets: ``[N]`` int64 next-token targets aligned to the rows, in ``[0, V)`` or -100
            (ignored). Ignored rows are dropped (``index_select``) before any matmul with
            ``lm_weight``.
        cls_weight, cls_bias: ``[1, H]`` / ``[1]`` classification head (fp32 by convention);
            the selected hidden rows are upcast to fp32 for it.
        cls_index: ``[M]`` rows of ``hidden`` read by the classification head (M may be 0).
        cls_labels: ``[M]`` 0/1 labels (float or int).
        lm_bias: optional ``[V]`` LM head bias.
        impl: ``"auto"`` (Triton on CUDA when it imports, else torch; resolved once per device
            type and logged), ``"triton"``, ``"torch"`` (chunked, fp32 compute), or
            ``"reference"`` (materialises ``[N, V]`` logits; tests and benchmarks only).
        chunk_size: rows of the ``[chunk, V]`` buffer, the op's memory peak (default: a byte
            budget, see ``chunked.TORCH_CHUNK_BYTES`` / ``triton_fused.TRITON_CHUNK_BYTES``). Without
            gradients the Triton path streams and has no such buffer. With ``"recompute"`` it bounds
            the torch path's forward buffer and, for a frozen ``lm_weight``, the backward's; a trained
            ``lm_weight``'s backward has no such buffer (its rows per block follow
            ``recompute.row_block``).
        accum_dtype: dtype in which the LM gradients accumulate. Eager: the LM weight gradient,
            across chunks, held until backward, where it is scaled and cast to ``lm_weight.dtype``;
            fp32 costs ``4·V·H`` bytes while ``lm_weight`` is trained; ``torch.bfloat16`` halves
            that for a bf16 weight at the price of one rounding per chunk, and (bf16 ``hidden``)
            also holds ``d hidden`` in bf16 until backward instead of fp32. ``"recompute"``: the
            ``d hidden`` accumulator (fp32 buffer, or 16-bit in place: one rounding per
            vocabulary chunk); its ``d W`` is written once per chunk, not accumulated -- except
            when the rows come in blocks (``recompute.row_block``: more than ``MAX_RATIO * H`` rows
            at equal dtypes), where it sums over the blocks in ``accum_dtype`` (an accumulator in
            ``d W``'s own free rows) and is rounded once.
            ``"recompute_tiles"``: both gradients' accumulators (16-bit: under tile locks).
        grad_mode: how the LM gradients are made (see ``chunked``, ``recompute``, ``triton_fused``):
            ``"eager"`` -- in the forward, from one ``[chunk, V]`` logits buffer at a time (three
            matmul passes over ``N x H x V``; memory = gradients + that buffer);
            ``"recompute"`` -- the forward keeps only the log-sum-exp; the backward recomputes the
            logits a chunk of vocabulary columns at a time into scratch inside the weight
            gradient and makes the gradients with GEMMs (four passes; memory = the gradients,
            plus an fp32 ``d hidden`` if ``accum_dtype`` is fp32 with 16-bit inputs, plus a tail
            of <= ~1 MiB with the Triton backend -- the torch backend's mixed mode (16-bit on
            CUDA without Triton) adds its fp32 sub-block scratch of ``TORCH_CHUNK_BYTES``; a
            frozen ``lm_weight`` takes the eager ``[chunk, V]`` buffer instead);
            ``"recompute_tiles"`` (``impl="triton"`` only) -- the same in one tile kernel with
            atomic / locked accumulation (same memory, far slower on a GPU; kept for comparison).
            Both recompute modes keep ``hidden`` and ``lm_weight`` alive until backward, and
            under ZeRO-3 rely on the weight being gathered for it.

    Returns:
        ``lm_loss_sum``: 0-dim fp32, differentiable; sum of token CE over non-ignored rows (0 if none).
        ``n_lm_targets``: 0-dim int64 on ``hidden.device`` (no host sync to read it).
        ``cls_loss_sum``: 0-dim fp32, differentiable; sum of BCE-with-logits over the M positions.
        ``cls_logits``: ``[M]`` fp32, differentiable (attached to the graph; detach for metrics).

    Callers normalise by global counts themselves. With ``grad_mode="eager"`` the gradients for
    ``hidden``, ``lm_weight`` and ``lm_bias`` are computed during the forward (only for tensors
    that require grad, and only when grad mode is on) and scaled by the upstream gradient in
    backward, which can run once. With the recompute modes they are made in backward, and the
    rows with a target are saved for it: when some rows are ignored, that is an ``[n, H]`` copy.

    Targets outside ``[0, V)`` other than -100, and labels other than 0/1, are a ValueError.

    Sync: dropping ignored rows needs their count on the host (``nonzero``), one device->host
    sync per call on CUDA; the same sync checks the targets and labels.
    """
    _check_inputs(hidden, lm_weight, targets, cls_weight, cls_bias, cls_index, cls_labels, lm_bias)
    if accum_dtype not in ACCUM_DTYPES:
        raise ValueError(f"dual_head_loss: accum_dtype={accum_dtype}, expected one of {ACCUM_DTYPES}")
    impl = resolve_impl(impl, hidden.device)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"dual_head_loss: grad_mode={grad_mode!r}, expected one of {GRAD_MODES}")
    if grad_mode == "recompute_tiles" and impl != "triton":
        raise ValueError(f"dual_head_loss: grad_mode='recompute_tiles' is a Triton kernel, but the implementation "
                         f"is {impl!r} on {hidden.device.type} (use impl='triton' on CUDA)")

    valid = targets != IGNORE_INDEX  # [N]
    keep = _rows_to_keep(valid, targets, lm_weight.shape[0], cls_labels)  # [n]  <- the one host sync

    # Classification head: M x H, plain autograd, fp32.
    cls_loss_sum, cls_logits = cls_loss_reference(hidden, cls_weight, cls_bias, cls_index, cls_labels)

    if impl == "reference":
        lm_loss_sum, n_lm_targets = lm_loss_sum_reference(hidden, lm_weight, targets, lm_bias)
        return lm_loss_sum, n_lm_targets, cls_loss_sum, cls_logits

    n_lm_targets = valid.sum()
    if keep.numel() == targets.numel():  # nothing ignored: no [N, H] copy, no scatter in backward
        h_sel, t_sel = hidden, targets.contiguous()  # the kernels index targets by row
    else:
        h_sel = hidden.index_select(0, keep)  # [n, H] copy; its backward scatters into zeros [N, H]
        t_sel = targets.index_select(0, keep)  # [n]
    if impl == "triton" and h_sel.dtype != lm_weight.dtype:
        h_sel = h_sel.to(lm_weight.dtype)  # the kernel reads one operand dtype
    if lm_bias is not None:
        lm_bias = lm_bias.contiguous()
    if grad_mode in ("recompute", "recompute_tiles"):
        backend = _backend(impl, hidden.device)
        if grad_mode == "recompute":
            grads = functools.partial(recompute_grads, accum_dtype=accum_dtype, backend=backend, chunk_size=chunk_size)
        else:
            from .triton_fused import recompute_tile_grads

            grads = functools.partial(recompute_tile_grads, accum_dtype=accum_dtype)
        lm_loss_sum = RecomputeLinearCrossEntropySum.apply(h_sel, lm_weight, lm_bias, t_sel, backend, chunk_size, grads)
        return lm_loss_sum, n_lm_targets, cls_loss_sum, cls_logits
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and h_sel.requires_grad,
        grad_on and lm_weight.requires_grad,
        grad_on and lm_bias is not None and lm_bias.requires_grad,
    )
    lm_loss_sum = LinearCrossEntropySum.apply(
        h_sel, lm_weight, lm_bias, t_sel, _backend(impl, hidden.device), chunk_size, accum_dtype, needs
    )
    return lm_loss_sum, n_lm_targets, cls_loss_sum, cls_logits
