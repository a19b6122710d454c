"""The dual-head model: one causal-LM backbone, a classification head and the LM head.

    hidden       = backbone trunk(packed tokens)            # one forward pass, many examples
    cls_logit[i] = cls_head(hidden[cls_index[i]])           # Linear(H, 1), fp32; P(y=1) = sigmoid
    LM loss      = fused CE of hidden[answer rows] against the LM head weight (no [T, V] logits)

The loss is computed inside ``forward`` with global normalisers passed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers.utils import ModelOutput

from ..loss import dual_head_objective


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that the architecture applies to its LM head's output: Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``,
    Gemma 2/3 soft-cap at ``final_logit_softcapping``. (1.0, None) for a plain LM head."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    if getattr(config, "lm_head_multiplier", None):
        scale *= float(config.lm_head_multiplier)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def apply_logit_transform(config, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` of the LM head as the architecture's own forward returns them (see
    :func:`logit_transform`)."""
    scale, cap = logit_transform(config)
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def packed_hidden_states(causal_lm: nn.Module, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                         max_seqlen: int | None = None, *, input_ids: torch.Tensor | None = None,
                         inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The trunk of the HF causal LM ``causal_lm`` on one packed row (``input_ids [1, T]`` or
    ``inputs_embeds [1, T, H]``) → final hidden states ``[T, H]``: the one call that training,
    evaluation and :func:`~clsgen_dist.modeling.build.check_packing` make (see
    :meth:`DualHeadModel.hidden_states`)."""
    kwargs = {}
    if cu_seqlens is not None and causal_lm.config._attn_implementation in ("flash_attention_2", "torch_varlen"):
        cu = cu_seqlens.to(device=position_ids.device, dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
    trunk = getattr(causal_lm, causal_lm.base_model_prefix)
    out = trunk(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=None,
                use_cache=False, **kwargs)
    return out.last_hidden_state[0]  # [T, H]


@dataclass
class DualHeadOutput(ModelOutput):
    """Forward output. A ``ModelOutput`` (a dict) on purpose: ZeRO-3 attaches its pre-backward hook
    (which re-gathers this module's parameters, ``lm_head.weight`` included, for the backward of
    the fused loss) only to tensors inside tuples, lists and dicts."""

    loss: torch.Tensor | None = None  # this micro-batch's share of the step loss (differentiable)
    lm_loss_sum: torch.Tensor | None = None  # detached
    n_lm: torch.Tensor | None = None  # int64 count of answer tokens with a target
    cls_loss_sum: torch.Tensor | None = None  # detached
    cls_logits: torch.Tensor | None = None  # [M] fp32, detached


class ClsHead(nn.Linear):
    """``Linear(H, 1)`` created in fp32 and always computed in fp32, whatever its storage dtype:
    DeepSpeed's bf16 engine casts every parameter of the model to bf16 (its optimizer keeps the fp32
    master copy), and the head must still take fp32 rows and return fp32 logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class DualHeadModel(nn.Module):
    """Wraps a HF causal LM (optionally a peft ``PeftModel``) and adds ``cls_head``.

    ``backbone`` must expose ``get_output_embeddings()`` (the LM head) and a trunk reachable as
    ``base_model`` (LlamaForCausalLM.model, and the like) returning ``last_hidden_state``.
    """

    def __init__(self, backbone: nn.Module, *, loss_impl: str = "auto", loss_chunk_size: int | None = None,
                 loss_grad_mode: str = "eager", loss_accum_dtype: str = "float32") -> None:
        super().__init__()
        self.backbone = backbone
        hidden_size = self.causal_lm.config.hidden_size
        # fp32 head, zero-initialised: P(y=1) = 0.5 and the cls loss is ln 2 at step 0.
        self.cls_head = ClsHead(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.cls_head.weight)
        nn.init.zeros_(self.cls_head.bias)
        self.loss_impl = loss_impl
        self.loss_chunk_size = loss_chunk_size
        self.loss_grad_mode = loss_grad_mode
        self.loss_accum_dtype = getattr(torch, loss_accum_dtype)

    # -- structure ------------------------------------------------------------------------

    @property
    def causal_lm(self) -> nn.Module:
        """The HF ``*ForCausalLM`` module (inside the peft wrapper when there is one)."""
        bb = self.backbone
        return bb.get_base_model() if hasattr(bb, "get_base_model") else bb

    @property
    def trunk(self) -> nn.Module:
        """The transformer without its LM head (``LlamaModel`` for Llama)."""
        lm = self.causal_lm
        return getattr(lm, lm.base_model_prefix)

    @property
    def lm_head(self) -> nn.Linear:
        return self.causal_lm.get_output_embeddings()

    @property
    def config(self):
        return self.causal_lm.config

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own next-token logits of hidden rows ``[R, H]``: the LM head, then whatever
        the architecture applies after it (:func:`logit_transform`), as its HF forward does."""
        return apply_logit_transform(self.config, self.lm_head(h))

    # -- forward --------------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Final hidden states of a packed ``[1, T]`` sequence → ``[T, H]``.

        No attention mask and no cache: transformers then derives the per-example (block-diagonal
        causal) mask from the restarting ``position_ids`` (SDPA/eager), and the varlen kernels
        (flash-attn's, or PyTorch's with ``torch_varlen``) run on ``cu_seqlens``.
        """
        return packed_hidden_states(self.causal_lm, position_ids, cu_seqlens, max_seqlen, input_ids=input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [1, T]
        position_ids: torch.Tensor,  # [1, T]
        targets: torch.Tensor,  # [T]
        cls_index: torch.Tensor,  # [M]
        cls_labels: torch.Tensor,  # [M]
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        *,
        num_lm_tokens: float,
        num_cls_examples: float,
        lm_coef: float = 1.0,
        cls_coef: float = 1.0,
    ) -> DualHeadOutput:
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)  # [T, H]
        head = self.lm_head
        # Under ZeRO-3 lm_head.weight is registered as an external parameter of this module
        # (distributed/engine.py), so it is gathered for the whole forward and its gradient reaches
        # the partitioned parameter.
        cls_w, lm_bias = self.cls_head.weight, head.bias
        scale, cap = logit_transform(self.config)
        if cap is not None:  # refused by build_model; a model wrapped by hand gets the same error here
            raise ValueError(f"final_logit_softcapping={cap}: the fused LM loss cannot soft-cap its logits")
        if scale != 1.0:
            # The model's LM logits are scale * (h @ W.T + b) (Granite, Cohere): feed the fused loss
            # scale * h (and scale * b), and the head w / scale, which leaves the classification
            # logit h @ w.T + b_cls unchanged (autograd carries both factors into the gradients).
            hidden, cls_w = hidden * scale, cls_w / scale
            lm_bias = lm_bias * scale if lm_bias is not None else None
        res = dual_head_objective(
            hidden, head.weight, targets, cls_w, self.cls_head.bias, cls_index, cls_labels,
            lm_bias=lm_bias, num_lm_tokens=num_lm_tokens, num_cls_examples=num_cls_examples,
            lm_coef=lm_coef, cls_coef=cls_coef, impl=self.loss_impl, chunk_size=self.loss_chunk_size,
            grad_mode=self.loss_grad_mode, accum_dtype=self.loss_accum_dtype)
        return DualHeadOutput(**res.__dict__)

    @torch.no_grad()
    def cls_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cls_index: torch.Tensor,
                   cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Classification logits only (evaluation): ``[M]`` fp32."""
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        return self.classify(hidden.index_select(0, cls_index))

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 classification logits ``[M]`` of hidden rows ``[M, H]``. A module call, so that
        ZeRO-3 gathers the head outside ``forward`` too."""
        return self.cls_head(h).squeeze(-1)
