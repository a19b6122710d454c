"""DeepSpeed engine setup: reading a ds_configs/*.json, filling its ``"auto"`` values from the run
config (and refusing values that contradict it), optimizer + scheduler, ZeRO-3 glue."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..config import Config, ConfigError, read_text_file
from .env import is_main

log = logging.getLogger("clsgen_dist.distributed")


def _fill(node: dict, key: str, value, where: str) -> None:
    """Set node[key] = value where it is "auto" or absent; raise if it holds a different value."""
    cur = node.get(key, "auto")
    if cur == "auto":
        node[key] = value
    elif not _same(cur, value):
        raise ConfigError(f"DeepSpeed config {where}.{key} = {cur!r} conflicts with the run config ({value!r}); "
                          f"set it to \"auto\" or change the run config")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def fill_ds_config(ds: dict, cfg: Config, *, world_size: int, dtype: torch.dtype, where: str = "ds_config") -> dict:
    """Return a copy of ``ds`` with batch sizes, clipping, precision and optimizer values taken from
    ``cfg``. Non-"auto" values must agree with ``cfg``."""
    ds = copy.deepcopy(ds)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, where)
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps, where)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * world_size, where)
    _fill(ds, "gradient_clipping", t.max_grad_norm, where)
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        sect = ds.setdefault(key, {"enabled": "auto"})
        _fill(sect, "enabled", on, f"{where}.{key}")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage") == "auto":
        raise ConfigError(f"{where}.zero_optimization.stage must be set explicitly (0-3)")
    opt = ds.get("optimizer")
    ours = resolve_optimizer(cfg)  # the optimizer we build when the JSON names none
    if opt is not None and t.optimizer != "auto":
        raise ConfigError(f"{where} names its own optimizer ({opt.get('type')!r}) and train.optimizer={t.optimizer}; "
                          f"keep one: remove the JSON's 'optimizer' block, or set train.optimizer=auto")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") if isinstance(zero, dict) else "none"
    if opt is None and offload not in (None, "none") and ds.get("zero_force_ds_cpu_optimizer", True):
        # what DeepSpeed would refuse after the model is built, with a traceback
        raise ConfigError(f"{where} offloads the optimizer (zero_optimization.offload_optimizer.device={offload!r}) "
                          f"but has no 'optimizer' block: the offloaded step is DeepSpeed's CPU Adam, built from "
                          f"that block (see ds_configs/zero3_offload.json), not train.optimizer={ours}")
    if opt is None and ours in EIGHT_BIT and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer={ours} needs bitsandbytes (pip install bitsandbytes)")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", t.learning_rate, f"{where}.optimizer.params")
        _fill(params, "weight_decay", t.weight_decay, f"{where}.optimizer.params")
    if "scheduler" in ds:
        raise ConfigError(f"{where}: remove the 'scheduler' block; the schedule comes from train.lr_scheduler")
    ds.setdefault("steps_per_print", 10**9)  # our own logging
    ds.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{where}: 'auto' values this trainer does not fill: {', '.join(leftover)}")
    return ds


def _walk(d: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_ds_config(path: str | Path) -> dict:
    """The DeepSpeed JSON at ``path``; a relative path is looked up in the working directory, then
    in the repository (``ds_configs/zero3.json`` works from anywhere)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (Path(__file__).resolve().parents[2] / p).exists():
        p = Path(__file__).resolve().parents[2] / p
    if not p.is_file():
        raise ConfigError(f"ds_config: {p} not found (the files ship in ds_configs/)")
    text = read_text_file(p, what="ds_config")
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {p} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config: {p} holds a JSON {type(ds).__name__}; expected an object of DeepSpeed settings")
    check_ds_structure(ds, f"ds_config {p}")
    return ds


# the sections this trainer reads (bf16.enabled, zero_optimization.stage, ...), with an example of each
_SECTIONS = {"bf16": '{"enabled": "auto"}', "fp16": '{"enabled": "auto"}', "zero_optimization": '{"stage": 2}',
             "zero_optimization.offload_optimizer": '{"device": "cpu"}',
             "zero_optimization.offload_param": '{"device": "cpu"}', "optimizer": '{"type": "AdamW", "params": {}}',
             "optimizer.params": '{"lr": "auto"}'}


def check_ds_structure(ds: dict, where: str) -> None:
    """ConfigError unless the sections of ``ds`` that are read here are objects and
    ``zero_optimization.stage`` (when given) is 0-3, before any process group or model exists."""
    for name, example in _SECTIONS.items():
        parent, _, key = name.rpartition(".")
        node = ds.get(parent) if parent else ds
        if isinstance(node, dict) and node.get(key) is not None and not isinstance(node[key], dict):
            raise ConfigError(f"{where}: {name} must be an object like {example}, got {json.dumps(node[key])}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == "auto":
        raise ConfigError(f"{where}: zero_optimization.stage must be set explicitly (0-3), got 'auto'")
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {json.dumps(stage)}")


def zero_stage(ds: dict) -> int:
    """``zero_optimization.stage`` (0 when absent); ConfigError unless it is 0-3."""
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage must be set explicitly (0-3), got {stage!r}")
    return stage


# train.optimizer values that are bitsandbytes 8-bit optimizers
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")


def resolve_optimizer(cfg: Config, cuda: bool | None = None, name: str | None = None) -> str:
    """``cfg.train.optimizer`` (or ``name``) with ``auto`` resolved: ``paged_adamw_8bit`` for QLoRA on
    CUDA (``cuda``: this process trains on a GPU; default ``torch.cuda.is_available()``, as
    ``init_distributed`` decides), else ``adamw_torch``."""
    name = name or cfg.train.optimizer
    if name != "auto":
        return name
    if cuda is None:
        cuda = torch.cuda.is_available()
    return "paged_adamw_8bit" if cfg.model.quantization != "none" and cuda else "adamw_torch"


def optimizer_setting(cfg: Config, ds: dict | None, name: str | None = None) -> str:
    """The optimizer a run steps with, as its checkpoints record it: ``ds_config:<type>`` when the
    DeepSpeed JSON ``ds`` names one (DeepSpeed builds it), else :func:`resolve_optimizer`."""
    if ds is not None and isinstance(ds.get("optimizer"), dict):
        return f"ds_config:{ds['optimizer'].get('type')}"
    return resolve_optimizer(cfg, name=name)


def make_optimizer(name: str, groups: list[dict], **kw) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a resolved ``train.optimizer``) over ``groups``."""
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes (pip install bitsandbytes)") from None
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, **kw)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(groups, **kw)  # on CPU bitsandbytes warns and keeps them unpaged
    raise ValueError(name)


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_scheduler == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if t.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """The optimizer's groups: the backbone's matrices with ``train.weight_decay``; its vectors (norm
    gains, biases) without, as in HF Trainer; the classification head at ``train.head_learning_rate``
    without decay."""
    head, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("cls_head."):
            head.append(p)
        else:  # a ZeRO-3 partitioned parameter keeps its full shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    lr = cfg.train.learning_rate
    head_lr = lr if cfg.train.head_learning_rate is None else cfg.train.head_learning_rate
    groups = [{"params": decay, "lr": lr, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0},
              {"params": head, "lr": head_lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def register_direct_reads(model: torch.nn.Module) -> None:
    """ZeRO-3: the fused loss reads ``lm_head.weight`` (and the classification head's parameters)
    directly instead of calling the modules: tell ZeRO-3 that the top-level forward uses them, so
    they are gathered there (and again for the backward, through the hook on the dict output) and
    their gradients reach the partitioned parameters."""
    import deepspeed

    for p in (model.lm_head.weight, model.cls_head.weight, model.cls_head.bias):
        deepspeed.zero.register_external_parameter(model, p)


def build_engine(model: torch.nn.Module, cfg: Config, ds: dict):
    """``deepspeed.initialize`` with our optimizer (``train.optimizer``, unless the JSON names one) and
    LR schedule. A 4-bit model needs nothing else: ZeRO-1/2 only shard the trainable (LoRA, head)
    parameters, and ZeRO-3 partitions the packed 4-bit weights like any other since they are stored
    in the compute dtype (modeling/build.py)."""
    import deepspeed

    if zero_stage(ds) == 3:
        register_direct_reads(model)
    groups = param_groups(model, cfg)
    optimizer = None
    if "optimizer" not in ds:
        name = resolve_optimizer(cfg, next(model.parameters()).is_cuda)
        optimizer = make_optimizer(name, groups, lr=cfg.train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=cfg.train.weight_decay)
        if name in EIGHT_BIT and zero_stage(ds) > 0:
            # ZeRO accepts only the optimizers it knows; set here (it follows from the run config),
            # so the ds_config.json written to output_dir does not show it
            ds = {**ds, "zero_allow_untested_optimizer": True}
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine


def require_zero3_for_inference(ds: dict, where: str) -> None:
    """ConfigError unless ``ds`` is a ZeRO-3 config: lower stages do not partition the parameters,
    so every rank would hold the whole model anyway."""
    if zero_stage(ds) != 3:
        raise ConfigError(f"{where}: evaluating a partitioned model needs a ZeRO-3 config (zero_optimization.stage "
                          f"3, e.g. ds_configs/zero3.json), got stage {zero_stage(ds)}; without one every rank "
                          f"holds the whole model")


def load_inference_ds_config(path: str | Path | None) -> dict | None:
    """The ZeRO-3 JSON of eval's and predict's ``--ds-config`` (see :func:`load_ds_config`; None
    without one), or ConfigError naming that flag unless it is stage 3: checked before any process
    group starts."""
    if not path:
        return None
    ds = load_ds_config(path)
    require_zero3_for_inference(ds, f"--ds-config {path}")
    return ds


def inference_ds_config(ds: dict | None, dtype: torch.dtype, *, where: str = "ds_config") -> dict | None:
    """A copy of the ZeRO-3 JSON ``ds`` for evaluating a model partitioned over the ranks (None for
    None): no optimizer or its offload, one row per rank (batch values play no part in inference),
    the precision of ``dtype``. ConfigError unless it is stage 3."""
    if ds is None:
        return None
    from .env import world_size

    require_zero3_for_inference(ds, where)
    ds = {k: copy.deepcopy(v) for k, v in ds.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
    ds["zero_optimization"].pop("offload_optimizer", None)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world_size(),
              bf16={"enabled": dtype == torch.bfloat16}, fp16={"enabled": dtype == torch.float16})
    ds.setdefault("steps_per_print", 10**9)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{where}: 'auto' values that evaluation does not fill: {', '.join(leftover)}")
    return ds


def build_inference_engine(model: torch.nn.Module, ds: dict):
    """``deepspeed.initialize`` without an optimizer (ZeRO-3 inference) for a model built
    partitioned: installs the hooks that gather each module's weights around its forward. The
    weights the dual-head model reads directly are registered (:func:`register_direct_reads`)."""
    import deepspeed

    from .env import world_size as n_ranks

    register_direct_reads(model)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    if is_main():
        log.info("model partitioned over %d ranks (ZeRO-3 inference): %s of %s parameters on this rank",
                 n_ranks(), f"{sum(p.ds_tensor.numel() for p in model.parameters() if is_zero3_param(p)):,}",
                 f"{sum(full_numel(p) for p in model.parameters()):,}")
    return engine


def is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds ZeRO-3-partitioned parameters."""
    return any(is_zero3_param(p) for p in module.parameters())


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter (a ZeRO-3 partition's ``numel()`` is 0 outside a gather)."""
    return p.ds_numel if is_zero3_param(p) else p.numel()


def local_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameter storage this rank holds for ``module``: its partitions under ZeRO-3,
    every weight otherwise."""
    return sum((p.ds_tensor if is_zero3_param(p) else p).numel() * p.element_size() for p in module.parameters())


@contextmanager
def gathered(params: list[torch.nn.Parameter], *, modifier_rank: int | None = None):
    """Full values of (possibly ZeRO-3-partitioned) parameters inside the block, on every rank.
    ``modifier_rank``: changes that rank makes inside the block are kept (partitioned again on
    exit); with None the block must only read them."""
    z3 = [p for p in params if is_zero3_param(p)]
    if not z3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(z3, modifier_rank=modifier_rank):
        yield


def full_state_dict(module: torch.nn.Module, *, trainable_only: bool = False,
                    rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s parameters (gathered under ZeRO-3) and persistent buffers, on every
    rank, or only on rank 0 with ``rank0_only`` (the others still take part in the gathers and get ``{}``):
    a full copy per rank would cost a node 8 x 16 GB of host memory for an 8B model on 8 GPUs."""
    out = {}
    keep = not rank0_only or is_main()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    # gather in groups to bound the peak of gathered memory
    group: list[tuple[str, torch.nn.Parameter]] = []

    def flush():
        with gathered([p for _, p in group]):
            if keep:
                for n, p in group:
                    out[n] = p.detach().to("cpu", copy=True)
        group.clear()

    budget, used = 256 * 2**20, 0
    for n, p in named:
        group.append((n, p))
        used += full_numel(p) * p.element_size()
        if used > budget:
            flush()
            used = 0
    if group:
        flush()
    if not trainable_only and keep:
        # persistent buffers only, as the module's own state_dict() (rotary inv_freq is not one:
        # saved, a checkpoint loads with an "unexpected keys" report)
        persistent = set(module.state_dict(keep_vars=True))
        for n, b in module.named_buffers():
            if n in persistent:
                out[n] = b.detach().to("cpu", copy=True)
    return out


def model_state_bytes(engine) -> int:
    """Bytes of model state this rank holds: its parameter partitions (all of each parameter when
    unpartitioned) + its optimizer state (fp32 master partitions and Adam moments)."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in engine.module.parameters():
        add(p.ds_tensor if is_zero3_param(p) else p)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in getattr(inner, "state", {}).values():
        for v in state.values():
            add(v)
    # ZeRO's fp32 master partitions (stage 1/2: single_partition_of_fp32_groups; stage 3: fp32_partitioned_groups_flat)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(opt, name, None) or []:
            add(t)
    return total
