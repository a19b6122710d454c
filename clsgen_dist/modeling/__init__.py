"""Dual-head model (backbone + classification head + LM head) and its construction."""

from .build import build_model, load_tokenizer, resolve_model_path
from .dual_head import DualHeadModel, DualHeadOutput

__all__ = ["build_model", "load_tokenizer", "resolve_model_path", "DualHeadModel", "DualHeadOutput"]
