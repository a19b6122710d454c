"""Saving and loading a trained dual-head model in HF format.

A checkpoint folder holds:
  adapter_model.safetensors + adapter_config.json   (LoRA)  — or —  model.safetensors + config.json (full)
                                                     (QLoRA: the adapter; loading re-quantizes the base to 4-bit,
                                                     ``launch/export.py`` merges it into a 16-bit model)
  cls_head.safetensors                               the classification head (weight [1, H], bias [1])
  tokenizer files                                    (with the cls token, if one was added)
  clsgen_config.yaml                                 the resolved run config (prompt, labels, model)
  COMPLETE                                           written last; folders without it are never loaded

It is written to a temporary sibling and renamed into place, so a killed save never leaves a
folder that looks complete. Under ZeRO-3 every rank must call ``save_checkpoint`` (gathering is
collective); rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, dump_config, load_config
from .distributed import barrier, is_main
from .distributed.engine import full_state_dict
from .modeling import DualHeadModel, load_tokenizer, resolve_model_path
from .distributed.engine import inference_ds_config, is_partitioned
from .modeling.build import (add_cls_token, load_backbone, place_for_inference, resolve_attn, resolve_dtype,
                             zero3_loading)

log = logging.getLogger("clsgen_dist.checkpoint")

CONFIG_NAME = "clsgen_config.yaml"
HEAD_NAME = "cls_head.safetensors"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


@contextmanager
def atomic_folder(out: Path):
    """Yield a temporary sibling of ``out`` to fill; on success write the COMPLETE marker and swap it
    into place (replacing an older ``out``); on any failure remove it. Readers never see a partial
    folder under ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        yield tmp
        (tmp / MARKER).write_text("ok\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model: DualHeadModel, tokenizer, cfg: Config, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    lora = cfg.model.finetune == "lora"
    # Collective under ZeRO-3: every rank gathers, rank 0 writes.
    head_sd = full_state_dict(model.cls_head, rank0_only=True)
    backbone_sd = full_state_dict(model.backbone, trainable_only=lora, rank0_only=True)
    if is_main():
        with atomic_folder(out) as tmp:
            if lora:
                model.backbone.save_pretrained(tmp, state_dict=backbone_sd, safe_serialization=True)
            else:
                model.causal_lm.save_pretrained(tmp, state_dict=backbone_sd, safe_serialization=True)
            save_file({k: v.float().contiguous() for k, v in head_sd.items()}, str(tmp / HEAD_NAME))
            tokenizer.save_pretrained(tmp)
            dump_config(_with_absolute_base(cfg), tmp / CONFIG_NAME)
        log.info("saved checkpoint %s", out)
    barrier()
    return out


def _with_absolute_base(cfg: Config) -> Config:
    """``cfg`` with a relative ``model.name_or_path`` made absolute, so that the checkpoint's adapter
    finds its base from any working directory."""
    import dataclasses

    base = cfg.model.name_or_path
    if base == "default" or Path(base).is_absolute() or not Path(base).exists():
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(Path(base).resolve())))


def check_checkpoint(path: str | Path, *, base_model: str | None = None) -> Config:
    """The checkpoint's run config, or CheckpointError saying what is missing: the folder, its
    marker and config, the head, the weights (adapter or full model), or a LoRA adapter's base.
    ``base_model`` replaces the base recorded in the config (the base moved, or lives elsewhere on
    this machine); it must be the same model."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint folder (e.g. outputs/run/final)")
    if not (p / MARKER).is_file() or not (p / CONFIG_NAME).is_file():
        missing = " and ".join(n for n in (MARKER, CONFIG_NAME) if not (p / n).is_file())
        if (p / "trainer_state.json").is_file():
            hint = ("; it is a training-state checkpoint (train.save_every), which resume=true continues: "
                    "the model to load is the run's final/ folder")
        elif (p / "final" / MARKER).is_file():
            hint = f"; it is a run's output folder: the checkpoint is {p / 'final'}"
        elif (p / MARKER).is_file() or (p / CONFIG_NAME).is_file():
            hint = ""
        else:
            hint = " (it is no checkpoint folder: a run writes its model to OUTPUT_DIR/final)"
        raise CheckpointError(f"{p}: not a complete clsgen checkpoint, missing {missing}{hint}")
    adapter = (p / "adapter_config.json").is_file()
    weights = (["adapter_model.safetensors"] if adapter else
               ["model.safetensors", "model.safetensors.index.json"])
    missing = [name for name in [HEAD_NAME] + (["config.json"] if not adapter else []) if not (p / name).is_file()]
    if not any((p / w).is_file() for w in weights):
        missing.append(" or ".join(weights))
    if missing:
        raise CheckpointError(f"{p}: incomplete clsgen checkpoint, missing {', '.join(missing)}")
    cfg = load_config(p / CONFIG_NAME)
    if base_model is not None:
        cfg.model.name_or_path = base_model
    base = cfg.model.name_or_path
    if adapter and base != "default" and not Path(base).exists():
        where = "--base-model" if base_model is not None else f"model.name_or_path in {CONFIG_NAME}"
        raise CheckpointError(f"{p}: the LoRA adapter's base model {base} ({where}) does not exist; it is needed to "
                              f"load the adapter: pass the base's folder on this machine with --base-model")
    return cfg


def _inference_attn(asked: str | None, trained: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention to load with: ``asked``, else the one the run trained with if it runs here (a
    checkpoint trained with a CUDA varlen kernel still loads on a CPU), else ``auto``'s choice."""
    if asked is not None:
        return resolve_attn(asked, device, dtype)
    try:
        return resolve_attn(trained, device, dtype)
    except ConfigError as e:
        attn = resolve_attn("auto", device, dtype)
        log.info("trained with %s; loading with %s here (%s)", trained, attn, e)
        return attn


def rebuild_cls_token(backbone, tokenizer, cfg: Config, base_path: str) -> None:
    """With ``model.cls_position=token``, the cls token's frozen rows are not saved with a LoRA
    adapter: rebuild them on its base (``base_path``) exactly as training made them."""
    if cfg.model.cls_position == "token":
        add_cls_token(backbone, tokenizer, cfg.model.cls_token, base_vocab=len(load_tokenizer(base_path)))


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu", dtype: str | None = None,
                    attn_implementation: str | None = None, base_model: str | None = None,
                    ds_config: dict | None = None):
    """Returns (model, tokenizer, cfg) with the model in eval mode on ``device``. ``base_model``:
    the LoRA adapter's base folder, if not where the config says (see :func:`check_checkpoint`).

    ``ds_config`` (a ZeRO-3 JSON; every rank must call this): the model is built partitioned over
    the ranks (as training builds it, :func:`~clsgen_dist.modeling.build.zero3_loading`) and put
    under a DeepSpeed inference engine, which gathers each module's weights for its forward: no
    rank holds the whole model. Every forward is then collective; the evaluation loops lock-step
    the ranks. A 4-bit base loads whole on every rank, as without ``ds_config`` (there is no
    partitioned 4-bit load)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    cfg = check_checkpoint(p, base_model=base_model)
    device = torch.device(device)
    tdtype = resolve_dtype(dtype or cfg.model.dtype, device)
    attn = _inference_attn(attn_implementation, cfg.model.attn_implementation, device, tdtype)
    tokenizer = load_tokenizer(str(p))
    zero3 = inference_ds_config(ds_config, tdtype)
    with zero3_loading(zero3 if cfg.model.quantization == "none" else None):
        if (p / "adapter_config.json").is_file():
            from peft import PeftModel

            # model.quantization=nf4: the same 4-bit base the adapter was trained on
            base_path = resolve_model_path(cfg.model.name_or_path)
            base = load_backbone(base_path, cfg.model, dtype=tdtype, attn=attn, device=device)
            rebuild_cls_token(base, tokenizer, cfg, base_path)
            backbone = PeftModel.from_pretrained(base, str(p))
        else:
            backbone = AutoModelForCausalLM.from_pretrained(str(p), dtype=tdtype, attn_implementation=attn)
    model = DualHeadModel(backbone, **cfg.model.loss_options())
    head = load_file(str(p / HEAD_NAME))
    model.cls_head.load_state_dict({k: v.float() for k, v in head.items()})
    if zero3 is not None and not is_partitioned(model):
        log.info("%s: a 4-bit base loads whole on every rank (there is no partitioned 4-bit load)", p)
    place_for_inference(model, zero3, device)
    model.eval()
    return model, tokenizer, cfg
