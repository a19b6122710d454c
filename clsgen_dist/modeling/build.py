"""Building the dual-head model from a config: backbone, tokenizer, LoRA or full fine-tuning."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..distributed.engine import full_numel, gathered, is_partitioned, is_zero3_param
from .attention import register as _register_attention
from .attention import flash_attn_available, torch_varlen_available
from .dual_head import DualHeadModel

log = logging.getLogger("clsgen_dist.modeling")

_register_attention()  # attn_implementation="torch_varlen" (modeling/attention.py)


def resolve_model_path(name_or_path: str) -> str:
    """``default`` → the converted SmolLM2-135M-Instruct folder; anything else as given."""
    if name_or_path == "default":
        from ..assets import default_model_dir

        return str(default_model_dir())
    return name_or_path


def model_folder_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a local Hugging Face model folder, None if nothing does: it
    does not exist, is a file, has no readable config.json, or holds no weight file. Only names and
    config.json are read (no model hub is used at run time)."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if not p.is_dir():
        return "is a file, not a model folder"
    if not (p / "config.json").is_file():
        return "is not a Hugging Face model folder (no config.json)"
    try:
        if not isinstance(json.loads((p / "config.json").read_text()), dict):
            return "has a config.json that is not a JSON object"
    except (OSError, ValueError) as e:
        return f"has an unreadable config.json ({e})"
    if not any(any(p.glob(pattern)) for pattern in ("*.safetensors", "*.bin")):
        return "holds no weights (no *.safetensors or *.bin file next to its config.json)"
    return None


def check_model_folder(name_or_path: str, what: str = "model.name_or_path") -> None:
    """ConfigError unless ``name_or_path`` is ``default`` (the embedded model) or a local Hugging
    Face model folder; cheap, so callers run it before any process group or model load."""
    problem = None if name_or_path == "default" else model_folder_problem(name_or_path)
    if problem:
        raise ConfigError(f"{what}: {name_or_path} {problem}; point it at a local Hugging Face model folder "
                          f"(config.json, weights, tokenizer; no model hub is used at run time), or use 'default'")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def resolve_attn(attn: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """``auto`` → for 16-bit weights on CUDA, flash-attn's ``flash_attention_2`` when the package is
    installed, else PyTorch's varlen flash kernel (``torch_varlen``, torch >= 2.10); otherwise
    ``sdpa``. An explicit varlen kernel (both are 16-bit and CUDA only) is checked here, before
    loading: transformers would only warn, and the first forward would fail."""
    half = dtype in (torch.bfloat16, torch.float16)
    if attn == "auto":
        if device.type != "cuda" or not half:
            return "sdpa"
        if flash_attn_available():
            return "flash_attention_2"
        return "torch_varlen" if torch_varlen_available() else "sdpa"
    if attn in ("torch_varlen", "flash_attention_2"):
        missing = ("the flash-attn package is not installed" if attn == "flash_attention_2" else
                   f"this torch ({torch.__version__}) has no usable torch.nn.attention.varlen.varlen_attn "
                   "(torch >= 2.10)")
        why = ("it runs on CUDA only" if device.type != "cuda" else
               missing if not (torch_varlen_available() if attn == "torch_varlen" else flash_attn_available())
               else f"it needs 16-bit weights, got {dtype}; set model.dtype=bfloat16" if not half else None)
        if why:
            raise ConfigError(f"model.attn_implementation={attn}: {why} (on {device.type}); "
                              "use model.attn_implementation=sdpa")
    return attn


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def add_cls_token(backbone, tokenizer, token: str, *, base_vocab: int | None = None) -> int:
    """Add the dedicated classification token (if missing), grow the embeddings if needed, and return
    its id.

    A token the base model never trained (id ≥ ``base_vocab``, the base tokenizer's size; default:
    ``len(tokenizer)`` before the token is added) gets the mean of the base tokens' embeddings, and
    so does its LM-head row when the head is not tied to the embedding. That holds whether the
    embedding grows or the id lands on one of the spare rows some models pad their vocabulary with
    (transformers would leave such a row as it is, and draw a grown LM-head row at random). Under
    LoRA these rows are frozen and not saved with the adapter: loading and export rebuild them here,
    passing the base tokenizer's size, and get the same values."""
    if base_vocab is None:
        base_vocab = len(tokenizer)
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False) \
            if _accepts_replace(tokenizer) else tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    tid = tokenizer.convert_tokens_to_ids(token)
    emb = backbone.get_input_embeddings().weight
    if tid >= getattr(emb, "ds_shape", emb.shape)[0]:  # ds_shape: the full shape of a ZeRO-3 partition
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if tid >= base_vocab:
        emb = backbone.get_input_embeddings().weight
        out = backbone.get_output_embeddings()
        rows = [emb] + ([out.weight] if out is not None and out.weight is not emb else [])
        with gathered(rows, modifier_rank=0), torch.no_grad():
            for w in rows:
                w[tid] = w[:base_vocab].mean(0)
    return tid


@contextmanager
def zero3_loading(ds_config: dict | None):
    """Inside the block, transformers builds and loads models partitioned by DeepSpeed ZeRO-3
    (``zero.Init``; rank 0 reads the weights, one module at a time, and each rank keeps its share)
    when ``ds_config`` (a filled ZeRO-3 config) is given; a no-op for None."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_ds

    before = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)  # a caller's own (HF Trainer's): put back
    live = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers holds only a weak reference to it)
    try:
        yield
    finally:
        if before is None:
            hf_ds.unset_hf_deepspeed_config()
        else:
            hf_ds._hf_deepspeed_config_weak_ref = before


def _accepts_replace(tokenizer) -> bool:
    import inspect

    try:
        return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    except (TypeError, ValueError):
        return False


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of ``cfg.quantization`` (None for ``none``)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # The packed 4-bit bytes are stored as elements of the compute dtype, not uint8: ZeRO-3 partitions
    # every parameter and DeepSpeed's bf16 engine casts every floating one to bf16; with storage ==
    # compute dtype (== the engine dtype) neither touches the packed bytes (QLoRA x ZeRO-3).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)


def load_backbone(path: str, cfg: ModelConfig, *, dtype: torch.dtype, attn: str, device: torch.device):
    """The HF causal LM, in ``dtype`` or, with ``cfg.quantization=nf4``, with 4-bit NF4 linear layers
    (quantized while loading, straight onto ``device``)."""
    from transformers import AutoModelForCausalLM

    qcfg = quantization_config(cfg, dtype)
    if qcfg is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                    quantization_config=qcfg, device_map={"": device})
    for m in backbone.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time its
        # layer runs in eval mode, and from then on multiplies with a kernel that has no backward: the
        # next training step silently loses every gradient through the base weights (a dev evaluation
        # mid-training is enough). Keep the one differentiable format for training and inference alike.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return backbone


def prepare_kbit(backbone, dtype: torch.dtype):
    """Freeze the 4-bit backbone and turn gradient checkpointing on (peft's k-bit preparation)."""
    from peft import prepare_model_for_kbit_training

    backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    # peft upcasts every non-4-bit weight to fp32 (for fp16 stability). With bf16 compute that doubles
    # the embeddings and LM head (+2 GiB on Llama-3.1-8B), and DeepSpeed's bf16 engine casts them back
    # anyway: keep them in the compute dtype.
    for p in backbone.parameters():
        if p.dtype != dtype and p.dtype.is_floating_point and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)
    return backbone


def apply_lora(backbone, cfg: ModelConfig):
    """LoRA adapters on ``lora_target_modules``. An added cls token keeps its mean-initialised
    embedding frozen under LoRA: it only marks the position, and the adapted layers above it learn
    what to put there (peft's trainable-token wrapper would hide the LM head's plain ``weight``
    from the fused loss). Those frozen rows are not saved with the adapter: loading and export
    rebuild them with :func:`add_cls_token`, as here."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, bias="none")
    try:
        model = get_peft_model(backbone, lcfg)
    except ValueError as e:  # a module name not in the model, or one peft cannot adapt in it (a Mamba out_proj)
        raise ConfigError(f"model.lora_target_modules={cfg.lora_target_modules!r}: peft cannot apply it to "
                          f"{backbone.config.model_type}: {e}") from None
    if hasattr(model.get_output_embeddings(), "base_layer"):
        # The fused loss multiplies by lm_head.weight itself: an adapter there would get no gradient
        # and the trained loss would not be the model's.
        raise ConfigError(f"model.lora_target_modules={cfg.lora_target_modules!r} puts a LoRA adapter on the LM "
                          f"head; the fused loss reads its weight directly, so leave the output layer out "
                          f"('all-linear' does)")
    return model


def check_trainable_architecture(path: str) -> None:
    """ConfigError for a model whose LM logits the fused loss cannot reproduce: a soft-cap after the
    LM head (Gemma 2 and 3's ``final_logit_softcapping``). A plain scale (Granite, Cohere) is fine."""
    from transformers import AutoConfig

    from .dual_head import logit_transform

    config = AutoConfig.from_pretrained(path)
    _, cap = logit_transform(getattr(config, "text_config", None) or config)
    if cap is not None:
        raise ConfigError(f"model.name_or_path: {path} ({config.model_type}) soft-caps its LM logits "
                          f"(final_logit_softcapping={cap}); the fused dual-head loss trains uncapped logits, "
                          f"which would not be this model's distribution, so it cannot be trained here")


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """``module`` in eval mode inside the block, then every submodule back in its own mode (peft
    leaves its dropout modules in train mode under a base in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def check_lm_logits(backbone, path: str) -> None:
    """ConfigError unless the LM logits the dual-head model computes (the LM head on the trunk's
    hidden state, then the transforms :func:`~clsgen_dist.modeling.dual_head.logit_transform`
    knows) equal the model's own HF forward on a short input: an architecture that changes its
    logits in another way (a multiplier of its own, a scaled hidden state before the head) would
    otherwise train and score a distribution that is not the model's."""
    from .dual_head import apply_logit_transform

    with _eval_mode(backbone):
        device = next(backbone.parameters()).device
        vocab = backbone.get_input_embeddings().num_embeddings
        ids = ((torch.arange(8, device=device) * 7919 + 11) % vocab)[None]  # any tokens will do
        ref = backbone(input_ids=ids, use_cache=False).logits[0, -1].float()
        h = getattr(backbone, backbone.base_model_prefix)(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
        ours = apply_logit_transform(backbone.config, backbone.get_output_embeddings()(h)).float()
    err, size = (ours - ref).abs().max().item(), ref.abs().max().item()
    if not err <= 1e-2 * size + 1e-3:
        raise ConfigError(f"model.name_or_path: {path} ({backbone.config.model_type}) computes its LM logits in a way "
                          f"the fused dual-head loss does not reproduce (max |difference| {err:.3g} on logits up to "
                          f"{size:.3g}): training would not optimise this model's distribution, so it is refused")


def _refuse_inference_mode() -> None:
    if torch.is_inference_mode_enabled():  # its tensors can never take part in a gradient
        raise RuntimeError("the packing check of a model being built or loaded needs a gradient, which "
                           "torch.inference_mode() forbids: build or load the model outside that block "
                           "(torch.no_grad() is fine), then run inference in it")


def check_packing(backbone, path: str) -> None:
    """ConfigError unless a packed row keeps its examples apart in this model, as training and
    evaluation assume: the hidden states of an example must not depend on the example packed before
    it. Attention does that through the restarting ``position_ids`` (SDPA and eager) or
    ``cu_seqlens`` (the varlen kernels); a layer that carries state along the sequence (a state-space
    mixer as in Falcon-H1, a short convolution as in LFM2, linear attention as in Qwen3-Next) leaks
    the first example into the second unless its kernel is told where examples end.

    Checked exactly, in any dtype: the gradient of the second example's hidden states with respect
    to the first one's input embeddings is zero where the boundary holds (masked attention gives
    exact zeros), and not zero where anything crosses it. Runs the model as training does
    (:func:`~clsgen_dist.modeling.dual_head.packed_hidden_states`, on the training device; under
    ZeRO-3, on the engine's model). Only the embeddings' gradient is computed: no parameter gradient
    is made. Not seen: a dependence through a discrete choice over the row (an expert capacity
    limit), which no causal LM in transformers has."""
    from .dual_head import packed_hidden_states

    _refuse_inference_mode()
    with _eval_mode(backbone):
        embed = backbone.get_input_embeddings()
        device = embed.weight.device
        ids = ((torch.arange(16, device=device) * 7919 + 11) % embed.num_embeddings)[None]  # two examples of 8
        pos = torch.arange(8, device=device).repeat(2)[None]
        cu = torch.tensor([0, 8, 16], device=device, dtype=torch.int32)
        with torch.enable_grad():
            emb = embed(ids).detach().requires_grad_(True)
            second = packed_hidden_states(backbone, pos, cu, 8, inputs_embeds=emb)[8:].float()  # [8, H]
            mix = torch.cos(torch.arange(second.numel(), device=device, dtype=torch.float32)).view_as(second)
            (grad,) = torch.autograd.grad((second * mix).sum(), emb)
    leak = grad[0, :8].float().abs().max().item()
    if leak != 0:
        raise ConfigError(f"model.name_or_path: {path} ({backbone.config.model_type}, attn_implementation="
                          f"{backbone.config._attn_implementation}) lets one example of a packed row change the next "
                          f"one's hidden states (gradient {leak:.3g} across the boundary, 0 expected): a layer that "
                          f"carries state along the sequence (a state-space or recurrent mixer, a short convolution, "
                          f"linear attention), or an attention implementation, does not stop where an example "
                          f"ends. Training and evaluation here pack several examples per row, so this model is "
                          f"refused")


def check_backbone(backbone, path: str, *, partitioned: bool = False) -> None:
    """Both checks a backbone must pass before it is trained: :func:`check_lm_logits` and
    :func:`check_packing`. ``partitioned``: the backbone runs under a ZeRO-3 engine, and a forward
    that fails there is a ConfigError too (an architecture that reads a weight outside the module
    owning it, such as Falcon-H1's Mamba convolution, gets an empty shard that ZeRO-3 never gathered)."""
    _refuse_inference_mode()  # (before the try: it is not a failure of the partitioned forward)
    try:
        check_lm_logits(backbone, path)
        check_packing(backbone, path)
    except (ConfigError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, IndexError, ValueError, TypeError, AttributeError) as e:
        if not partitioned:
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        raise ConfigError(f"model.name_or_path: {path} ({backbone.config.model_type}) fails its first forward with its "
                          f"weights partitioned under ZeRO-3 ({type(e).__name__}: {first}): a layer that reads a "
                          f"weight outside the module owning it (as the Mamba and short-convolution layers of "
                          f"transformers' hybrid models do) gets an empty shard that ZeRO-3 never gathered, so this "
                          f"model cannot be trained partitioned here") from e


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu", model_path: str | None = None,
                seed: int | None = None, zero3: dict | None = None) -> tuple[DualHeadModel, object]:
    """Load backbone + tokenizer, add the cls token if configured, wrap with LoRA or unfreeze all,
    and attach the zero-initialised fp32 classification head. Returns (model, tokenizer).

    ``cfg.quantization=nf4`` (QLoRA): the linear layers load frozen in 4-bit, gradient checkpointing
    is on, and LoRA adapts them (``cfg.lora_target_modules``, all linear projections by default).

    ``zero3`` (the filled DeepSpeed config of a ZeRO-3 run, with ``cfg.zero3_init``): the backbone is
    built already partitioned (:func:`zero3_loading`; every rank must call this). A 4-bit backbone
    loads whole as always. The backbone checks (:func:`check_backbone`) then need the gathered
    weights, which only the DeepSpeed engine provides: the caller runs them on the engine's model
    (see :func:`is_partitioned`)."""
    device = torch.device(device)
    path = model_path or resolve_model_path(cfg.name_or_path)
    check_model_folder(path)
    check_trainable_architecture(path)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = resolve_attn(cfg.attn_implementation, device, dtype)
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = load_tokenizer(path)
    with zero3_loading(zero3 if cfg.quantization == "none" else None):
        backbone = load_backbone(path, cfg, dtype=dtype, attn=attn, device=device)
        backbone.config.use_cache = False
        partitioned = is_partitioned(backbone)
        if not partitioned:
            if cfg.quantization == "none":  # (a 4-bit backbone loaded onto the device already) the checks run
                backbone.to(device)  # the training kernels, some of which exist there only (flash-attn, torch_varlen)
            check_backbone(backbone, path)
        if cfg.cls_position == "token":
            add_cls_token(backbone, tokenizer, cfg.cls_token)
    if cfg.quantization != "none":
        backbone = prepare_kbit(backbone, dtype)
    elif cfg.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.enable_input_require_grads()
    if cfg.finetune == "lora":
        if seed is not None:
            # the adapters' random init must not depend on how the backbone loaded: resizing the
            # embedding for a cls token draws from the generator, differently when partitioned
            torch.manual_seed(seed)
        backbone = apply_lora(backbone, cfg)
    else:
        backbone.requires_grad_(True)
    model = DualHeadModel(backbone, **cfg.loss_options())
    if partitioned:  # zero.Init placed the partitions (on the device, or the host under offload_param)
        partition_the_rest(model)
    else:
        model.to(device)
    log.info("model: %s (%s, attn=%s, finetune=%s, quantization=%s%s), trainable %s / %s params", path, dtype, attn,
             cfg.finetune, cfg.quantization, ", loaded partitioned (ZeRO-3)" if partitioned else "",
             f"{sum(full_numel(p) for p in model.parameters() if p.requires_grad):,}",
             f"{sum(full_numel(p) for p in model.parameters()):,}")
    return model, tokenizer


def partition_the_rest(model: torch.nn.Module, *, cast: bool = True) -> None:
    """Partition the parameters made after a partitioned load, which are whole on every rank: a
    resized embedding (transformers builds it whole under ZeRO-3), the adapters, the head. As
    ``deepspeed.initialize`` does with a model that is not partitioned yet: in the dtype of the
    others (its 16-bit engine casts every parameter, but leaves a partitioned model as it is, and
    needs one dtype), from rank 0's values, placed where zero.Init places partitions. Done here so
    that no rank holds a whole (vocabulary x hidden) matrix until then. ``cast=False`` (inference,
    no optimizer) keeps each parameter's dtype: the fp32 head stays fp32."""
    params = list(model.parameters())
    anchor = next(p for p in params if is_zero3_param(p))
    whole = [p for p in params if not is_zero3_param(p)]
    for p in whole:
        if cast and p.dtype.is_floating_point and p.dtype != anchor.dtype:
            p.data = p.data.to(anchor.dtype)  # the head still computes in fp32 (ClsHead)
    if whole:
        anchor.convert_to_zero_parameters(param_list=whole)


def place_for_inference(model: DualHeadModel, zero3: dict | None, device: torch.device) -> None:
    """A model loaded for inference onto its device: a partitioned one (loaded under
    :func:`zero3_loading` with ``zero3``, an :func:`~clsgen_dist.distributed.engine.inference_ds_config`)
    gets its remaining parameters partitioned, in their own dtype (the fp32 head stays fp32), and a
    DeepSpeed inference engine that gathers each module's weights for its forward."""
    if is_partitioned(model):
        from ..distributed.engine import build_inference_engine

        partition_the_rest(model, cast=False)
        build_inference_engine(model, zero3)
    else:
        model.to(device)
