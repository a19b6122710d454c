"""The CLSGen objective with explicit global normalisers.

    loss = cls_coef * sum BCE(cls_logit, y) / num_cls_examples
         + lm_coef  * sum CE(answer tokens)  / num_lm_tokens

``num_cls_examples`` and ``num_lm_tokens`` are *global* counts: summed over every micro-batch of
the optimizer step, over gradient-accumulation steps and over data-parallel ranks. They are passed
in explicitly (torchtitan's ``global_valid_tokens``), so a micro-batch's loss is exactly its share
of the step's loss and the sum over micro-batches and ranks is the step loss, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import dual_head_loss


@dataclass
class DualHeadLoss:
    loss: torch.Tensor  # this micro-batch's share of the step loss (differentiable)
    lm_loss_sum: torch.Tensor  # sum of answer-token CE (detached)
    n_lm: torch.Tensor  # answer tokens with a target (int64, on device)
    cls_loss_sum: torch.Tensor  # sum of BCE (detached)
    cls_logits: torch.Tensor  # [M] fp32 (detached)


def dual_head_objective(
    hidden: torch.Tensor,  # [T, H]
    lm_weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [T]
    cls_weight: torch.Tensor,  # [1, H]
    cls_bias: torch.Tensor,  # [1]
    cls_index: torch.Tensor,  # [M]
    cls_labels: torch.Tensor,  # [M]
    *,
    num_lm_tokens: float,
    num_cls_examples: float,
    lm_coef: float = 1.0,
    cls_coef: float = 1.0,
    lm_bias: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    grad_mode: str = "eager",
    accum_dtype: torch.dtype = torch.float32,
) -> DualHeadLoss:
    lm_sum, n_lm, cls_sum, cls_logits = dual_head_loss(
        hidden, lm_weight, targets, cls_weight, cls_bias, cls_index, cls_labels,
        lm_bias=lm_bias, impl=impl, chunk_size=chunk_size, grad_mode=grad_mode, accum_dtype=accum_dtype)
    # A term whose global count is 0 contributes nothing (max(…, 1) keeps 0/0 out of the graph).
    loss = cls_coef * cls_sum / max(float(num_cls_examples), 1.0) + lm_coef * lm_sum / max(float(num_lm_tokens), 1.0)
    return DualHeadLoss(loss=loss, lm_loss_sum=lm_sum.detach(), n_lm=n_lm, cls_loss_sum=cls_sum.detach(),
                        cls_logits=cls_logits.detach())
