"""``torch_varlen``: packed attention with PyTorch's own variable-length flash kernel.

On a GPU without the flash-attn package, SDPA on a packed row needs the ``[T, T]`` block-diagonal
mask that transformers derives from the restarting position ids, so it runs a masked kernel over the
whole row: ``T²`` work where the examples need ``Σ lᵢ²``. ``torch.nn.attention.varlen.varlen_attn``
(torch ≥ 2.10, CUDA, fp16/bf16) runs flash attention on ``cu_seqlens`` instead, like flash-attn's
varlen kernel, with no mask at all. Its signature grew over releases; what an older one lacks is
done here (grouped-query heads are repeated before torch 2.12) or refused (see ``_kernel_options``).

This module registers the name ``torch_varlen`` with transformers' attention and mask interfaces
(a registration, not a patch: any HF model that dispatches on ``config._attn_implementation``
accepts it). The attention function:

- runs ``varlen_attn`` on one flattened packed row (batch 1, no padding mask, no cache offset), with
  ``cu_seqlens`` passed by the caller (``DualHeadModel.hidden_states`` passes them as
  ``cu_seq_lens_q``/``max_length_q``, the keywords HF's flash path uses) or derived from the
  restarting position ids;
- hands everything else (left-padded batches, cached decoding) to transformers' SDPA function,
  with the 4D mask that the registered mask function builds exactly as for ``sdpa``.
"""

from __future__ import annotations

import torch

NAME = "torch_varlen"


def _varlen_kernel():
    """``varlen_attn`` itself; a function so that CPU tests can substitute a reference for the
    CUDA-only kernel and check everything around it."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


_KEYWORDS = ("is_causal", "scale", "window_size", "enable_gqa")


def _keywords(kernel) -> set[str]:
    """Which of ``_KEYWORDS`` ``kernel`` takes. ``varlen_attn`` grew over releases: torch 2.10 has
    ``is_causal``; 2.11 ``scale`` and ``window_size`` instead; 2.12 adds ``enable_gqa``."""
    import inspect

    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(_KEYWORDS)
    return {k for k in _KEYWORDS if k in params}


def flash_attn_available() -> bool:
    """Whether the flash-attn package is installed (transformers' ``flash_attention_2``)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def torch_varlen_available() -> bool:
    """Whether this torch ships ``varlen_attn`` (torch >= 2.10) in a form that can be made causal.
    It runs on CUDA only."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return bool(_keywords(varlen_attn) & {"is_causal", "window_size"})


def _is_unmasked_row(batch_size: int, attention_mask, q_length: int, kv_length: int, q_offset) -> bool:
    """One row, no padding mask and no cache offset: the case the varlen kernel takes."""
    return (batch_size == 1 and attention_mask is None and kv_length == q_length
            and not (isinstance(q_offset, torch.Tensor) or q_offset))


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                attention_mask=None, **kwargs):
    """Mask function registered for ``torch_varlen``: none for an unmasked row (the attention
    function takes ``cu_seqlens`` there, so the ``[T, T]`` packed mask is never built), otherwise
    exactly SDPA's mask."""
    if _is_unmasked_row(batch_size, attention_mask, q_length, kv_length, q_offset):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _cu_seqlens_from_positions(position_ids: torch.Tensor | None, length: int, device) -> tuple[torch.Tensor, int]:
    """Example boundaries of a packed row: an example starts wherever the position id does not
    continue the previous one (transformers' own packed-sequence rule)."""
    if position_ids is None:
        return torch.tensor([0, length], dtype=torch.int32, device=device), length
    pos = position_ids.reshape(-1)
    starts = torch.cat([pos.new_zeros(1), ((pos[1:] - pos[:-1]) != 1).nonzero().view(-1) + 1])
    cu = torch.cat([starts, starts.new_tensor([length])]).to(device=device, dtype=torch.int32)
    return cu, int(cu.diff().max())  # .item(): one host sync per layer, only when cu_seqlens were not passed


def torch_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           *, cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                           max_length_q: int | None = None, max_length_k: int | None = None,
                           position_ids: torch.Tensor | None = None, **kwargs):
    """transformers attention function: ``query [B, Hq, L, D]``, ``key``/``value [B, Hkv, S, D]`` →
    (``[B, L, Hq, D]``, None)."""
    batch, n_heads, length, head_dim = query.shape
    if not _is_unmasked_row(batch, attention_mask, length, key.shape[2], 0):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    if dropout:
        raise ValueError(f"attn_implementation={NAME}: attention dropout ({dropout}) is not supported; "
                         "set the model's attention_dropout to 0 or use sdpa")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={NAME}: attention logit soft-capping is not supported; use eager")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"attn_implementation={NAME} is for causal attention; use sdpa")
    if cu_seq_lens_q is not None:
        cu_q = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        cu_k = cu_q if cu_seq_lens_k is None else cu_seq_lens_k.to(device=query.device, dtype=torch.int32)
        max_q = int(max_length_q) if max_length_q is not None else int(cu_q.diff().max())
        max_k = int(max_length_k) if max_length_k is not None else max_q
    else:
        cu_q, max_q = _cu_seqlens_from_positions(position_ids, length, query.device)
        cu_k, max_k = cu_q, max_q
    kernel = _varlen_kernel()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, D] views
    k, v, options = _kernel_options(_keywords(kernel), module, k, v, n_heads, head_dim, scaling)
    out = kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    return out.unsqueeze(0), None  # [1, L, Hq, D]


def _kernel_options(keywords: set[str], module, k, v, n_heads: int, head_dim: int, scaling: float | None):
    """(k, v, keyword arguments) for a kernel taking ``keywords``: what the older signatures lack is
    done here (grouped-query heads repeated) or refused (a sliding window, a non-default scale)."""
    options: dict = {}
    sliding = getattr(module, "sliding_window", None)
    if "window_size" in keywords:
        # (left, right) keys around each query, inclusive, -1 unbounded: (-1, 0) is causal; a causal
        # window of W tokens (the query and W - 1 before it, as in transformers' sliding-window
        # mask) is (W - 1, 0).
        options["window_size"] = (sliding - 1, 0) if sliding else (-1, 0)
    elif sliding:
        raise ValueError(f"attn_implementation={NAME}: a sliding window needs varlen_attn's window_size "
                         f"(torch >= 2.11); use sdpa")
    else:
        options["is_causal"] = True
    if "scale" in keywords:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling * head_dim ** 0.5 - 1) > 1e-6:
        raise ValueError(f"attn_implementation={NAME}: this model's attention scale ({scaling}) needs "
                         f"varlen_attn's scale (torch >= 2.11); use sdpa")
    if k.shape[1] != n_heads:
        if "enable_gqa" in keywords:
            options["enable_gqa"] = True
        else:  # torch < 2.12: one key/value head per query head ([L, Hkv, D] -> [L, Hq, D] copies)
            k, v = (t.repeat_interleave(n_heads // t.shape[1], dim=1) for t in (k, v))
    return k, v, options


def register() -> None:
    """Make ``attn_implementation="torch_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, torch_varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
