"""Building the dual-head model from a config: backbone, tokenizer, LoRA or full fine-tuning."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import ModelConfig
from .dual_head import DualHeadModel

log = logging.getLogger("clsgen_dist.modeling")


def resolve_model_path(name_or_path: str) -> str:
    """``default`` → the converted SmolLM2-135M-Instruct folder; anything else as given."""
    if name_or_path == "default":
        from ..assets import default_model_dir

        return str(default_model_dir())
    return name_or_path


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def resolve_attn(attn: str, device: torch.device) -> str:
    if attn != "auto":
        return attn
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def add_cls_token(backbone, tokenizer, token: str) -> int:
    """Add the dedicated classification token (if missing) and grow the embeddings; the new row is
    initialised to the mean embedding. Returns its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False) \
            if _accepts_replace(tokenizer) else tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    tid = tokenizer.convert_tokens_to_ids(token)
    emb = backbone.get_input_embeddings()
    if tid >= emb.weight.shape[0]:
        old = emb.weight.shape[0]
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            w = backbone.get_input_embeddings().weight
            w[old:] = w[:old].mean(0, keepdim=True)
    return tid


def _accepts_replace(tokenizer) -> bool:
    import inspect

    try:
        return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    except (TypeError, ValueError):
        return False


def apply_lora(backbone, cfg: ModelConfig, *, trainable_token_ids: list[int] | None = None):
    from peft import LoraConfig, get_peft_model

    kwargs = {}
    if trainable_token_ids:
        # Only the added token's embedding row trains (tied LM head rows follow).
        kwargs["trainable_token_indices"] = {"embed_tokens": list(trainable_token_ids)}
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, bias="none", **kwargs)
    return get_peft_model(backbone, lcfg)


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu", model_path: str | None = None,
                seed: int | None = None) -> tuple[DualHeadModel, object]:
    """Load backbone + tokenizer, add the cls token if configured, wrap with LoRA or unfreeze all,
    and attach the zero-initialised fp32 classification head. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = model_path or resolve_model_path(cfg.name_or_path)
    if not Path(path).exists():
        raise FileNotFoundError(f"model.name_or_path: {path} does not exist (no model hub is used at run time; "
                                f"point at a local HF model folder, or use 'default')")
    dtype = resolve_dtype(cfg.dtype, device)
    attn = resolve_attn(cfg.attn_implementation, device)
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = load_tokenizer(path)
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    backbone.config.use_cache = False
    token_ids = []
    if cfg.cls_position == "token":
        token_ids = [add_cls_token(backbone, tokenizer, cfg.cls_token)]
    if cfg.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.enable_input_require_grads()
    if cfg.finetune == "lora":
        backbone = apply_lora(backbone, cfg, trainable_token_ids=token_ids)
    else:
        backbone.requires_grad_(True)
    model = DualHeadModel(backbone, loss_impl=cfg.loss_impl, loss_chunk_size=cfg.loss_chunk_size)
    model.to(device)
    log.info("model: %s (%s, attn=%s, finetune=%s), trainable %s / %s params", path, dtype, attn, cfg.finetune,
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
             f"{sum(p.numel() for p in model.parameters()):,}")
    return model, tokenizer
