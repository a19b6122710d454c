"""Naive, fully materialised reference for :func:`clsgen_dist.ops.dual_head_loss`.

Builds the whole ``[N, V]`` logits tensor, so it is only meant for tests, benchmarks and tiny
inputs (``impl="reference"``). The kernels in this package must agree with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum_reference(
    hidden: torch.Tensor,  # [N, H]
    lm_weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N], -100 = ignore
    lm_bias: torch.Tensor | None = None,  # [V]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies (fp32) and the number of non-ignored targets (int64 tensor)."""
    dt = torch.promote_types(hidden.dtype, lm_weight.dtype)  # the other impls take mixed dtypes too
    bias = None if lm_bias is None else lm_bias.to(dt)
    logits = F.linear(hidden.to(dt), lm_weight.to(dt), bias).float()  # [N, V]  <- the memory peak we avoid elsewhere
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def cls_loss_reference(
    hidden: torch.Tensor,  # [N, H]
    cls_weight: torch.Tensor,  # [1, H]
    cls_bias: torch.Tensor,  # [1]
    cls_index: torch.Tensor,  # [M]
    cls_labels: torch.Tensor,  # [M]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of BCE-with-logits over the classification positions, in fp32, and the ``[M]`` logits."""
    rows = hidden.index_select(0, cls_index).float()  # [M, H]
    logits = F.linear(rows, cls_weight.float(), cls_bias.float()).squeeze(-1)  # [M]
    loss = F.binary_cross_entropy_with_logits(logits, cls_labels.float(), reduction="sum")
    return loss, logits


def dual_head_loss_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    cls_index: torch.Tensor,
    cls_labels: torch.Tensor,
    *,
    lm_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`clsgen_dist.ops.dual_head_loss`, computed the obvious way."""
    lm_loss_sum, n_lm_targets = lm_loss_sum_reference(hidden, lm_weight, targets, lm_bias)
    cls_loss_sum, cls_logits = cls_loss_reference(hidden, cls_weight, cls_bias, cls_index, cls_labels)
    return lm_loss_sum, n_lm_targets, cls_loss_sum, cls_logits
