"""Kernels and their launchers (no transformers / deepspeed / peft imports in this layer).

``dual_head_loss`` is the one entry point; ``impl=`` picks Triton (CUDA), the chunked torch path
(CPU and fallback) or the naive reference. Triton is imported lazily, only when it is used.
"""

from .dual_head import dual_head_loss, resolve_impl
from .reference import dual_head_loss_reference

__all__ = ["dual_head_loss", "dual_head_loss_reference", "resolve_impl"]
