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

import json
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
from .modeling.build import (add_cls_token, load_backbone, model_folder_problem, place_for_inference, resolve_attn,
                             resolve_dtype, zero3_loading)

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
    """The checkpoint's run config, or CheckpointError saying what is missing or wrong: the folder,
    its marker and config, the head, the weights (adapter or full model), the tokenizer files, a
    truncated or corrupt file (headers and small JSON files only: no weight is read), or a LoRA
    adapter's base. ``base_model`` replaces the base recorded in the config (the base moved, or
    lives elsewhere on this machine); it must be the same model: a base of another architecture or
    hidden size is refused here, before any model loads."""
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
    tokenizer = [] if (p / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    vocab = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")  # fast, BPE, WordPiece, SP, tiktoken
    if not any(any(p.glob(pattern)) for pattern in vocab):
        tokenizer.insert(0, "tokenizer.json")
    if tokenizer:
        missing.append(f"tokenizer files ({' / '.join(tokenizer)})")
    if missing:
        raise CheckpointError(f"{p}: incomplete clsgen checkpoint, missing {', '.join(missing)}")
    head_shape = _check_readable(p, adapter)
    try:
        cfg = load_config(p / CONFIG_NAME)
    except ConfigError as e:  # say whose config it is: not the user's own, which the bare message would suggest
        msg = str(e).removeprefix(f"{p / CONFIG_NAME}: ")
        raise CheckpointError(f"{p / CONFIG_NAME} (the checkpoint's saved run config): {msg}; was it written by "
                              f"another version of clsgen-dist, or edited? Load it with the version that wrote "
                              f"it, or correct that file") from None
    recorded = cfg.model.name_or_path
    if base_model is not None:
        cfg.model.name_or_path = base_model
    base = cfg.model.name_or_path
    if adapter and base != "default":
        where = "--base-model" if base_model is not None else f"model.name_or_path in {CONFIG_NAME}"
        problem = model_folder_problem(base)
        if problem:
            raise CheckpointError(f"{p}: the LoRA adapter's base model {base} ({where}) {problem}; it is needed to "
                                  f"load the adapter: pass the base's folder on this machine with --base-model")
        differs = _base_differences(p, Path(base), head_shape, shapes=base_model is not None)
        if differs:
            trained = f" (the run trained on {recorded})" if base_model is not None else ""
            raise CheckpointError(f"{p}: the base model {base} ({where}) is not the one this LoRA adapter was trained "
                                  f"on: {'; '.join(differs)}; pass that base's folder{trained} with --base-model")
    return cfg


def _check_readable(p: Path, adapter: bool) -> list[int]:
    """CheckpointError for a truncated or corrupt file of the checkpoint ``p``, found without
    reading any weights: the safetensors headers (``safe_open`` reads the header only, and checks
    that the file holds every tensor it announces) and the small JSON files. Returns the shape of
    the classification head's weight ([1, hidden size])."""
    from safetensors import SafetensorError, safe_open

    jsons = ["adapter_config.json" if adapter else "config.json", "tokenizer_config.json"]
    tensors = [HEAD_NAME, "adapter_model.safetensors"] if adapter else [HEAD_NAME]
    if not adapter and (p / "model.safetensors.index.json").is_file():
        jsons.append("model.safetensors.index.json")
    elif not adapter:
        tensors.append("model.safetensors")

    def unreadable(name: str, e: object) -> CheckpointError:
        return CheckpointError(f"{p / name}: unreadable (truncated or corrupt: {str(e).strip()[:200]}); "
                               f"re-copy the checkpoint")

    loaded = {}
    for name in jsons:
        try:
            loaded[name] = json.loads((p / name).read_text())
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise unreadable(name, e) from None
        if not isinstance(loaded[name], dict):
            raise unreadable(name, f"expected a JSON object, got a {type(loaded[name]).__name__}")
    if "model.safetensors.index.json" in loaded:
        shards = sorted(set((loaded["model.safetensors.index.json"].get("weight_map") or {}).values()))
        gone = [s for s in shards if not (p / s).is_file()]
        if gone or not shards:
            raise CheckpointError(f"{p}: incomplete clsgen checkpoint, model.safetensors.index.json lists "
                                  f"{'missing shards ' + ', '.join(gone) if gone else 'no weight files'}")
        tensors += shards
    head_shape: list[int] = []
    for name in tensors:
        try:
            with safe_open(str(p / name), framework="pt") as f:
                if name == HEAD_NAME and "weight" in f.keys():
                    head_shape = list(f.get_slice("weight").get_shape())
        except (OSError, SafetensorError) as e:
            raise unreadable(name, e) from None
    return head_shape


def _base_differences(p: Path, base: Path, head_shape: list[int], *, shapes: bool = False) -> list[str]:
    """How the base model folder ``base`` (a valid one) differs from the model the LoRA adapter of
    checkpoint ``p`` was trained on, as far as its config and the checkpoint tell without loading a
    weight: the architecture peft records (``auto_mapping`` in adapter_config.json), and the hidden
    size (the input of the classification head, sized as :class:`DualHeadModel` sizes it). With
    ``shapes`` (a base other than the run's, ``--base-model``), if those agree: every adapted
    module, looked up in the base built on the meta device (no memory, about a second for 8B)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(base))
    except (OSError, ValueError, KeyError):  # a config this transformers cannot read: loading will say so
        return []
    out = []
    trained = (json.loads((p / "adapter_config.json").read_text()).get("auto_mapping") or {}).get("base_model_class")
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)

    def family(name: str) -> str:  # "Gemma3ForCausalLM" and "Gemma3ForConditionalGeneration": one model
        return name.split("For")[0]

    # the class transformers maps a model type to may change between versions: compare the families,
    # also of the classes the base's own config.json names
    known = {family(c) for c in [cls, *(getattr(config, "architectures", None) or [])] if c}
    if trained and known and family(trained) not in known:
        out.append(f"its config.json makes a {cls or ', '.join(config.architectures)} ({config.model_type}), the "
                   f"adapter was trained on a {trained}")
    hidden = getattr(config, "hidden_size", None)
    if len(head_shape) == 2 and isinstance(hidden, int) and hidden != head_shape[1]:
        out.append(f"its hidden size is {hidden} (config.json), the adapter's is {head_shape[1]} (the input size of "
                   f"{HEAD_NAME})")
    if out or not shapes:
        return out
    return _adapter_misfits(p, config)


def _adapter_misfits(p: Path, config) -> list[str]:
    """The adapter's LoRA matrices that do not fit the model ``config`` builds: a module it lacks
    (fewer layers, other names), or other in/out features (``lora_A`` is [r, in], ``lora_B`` [out, r])."""
    import re

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            modules = dict(AutoModelForCausalLM.from_config(config).named_modules())
    except Exception as e:  # noqa: BLE001 (a model that cannot be built bare: loading will tell)
        log.debug("no meta-device build of the base to check the adapter against: %s", e)
        return []
    absent, misfit = [], []
    with safe_open(str(p / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if not m:
                continue
            name, ab = m.groups()
            module = modules.get(name)
            if module is None:
                absent += [name] if name not in absent else []
                continue
            shape = f.get_slice(key).get_shape()
            have, want = (getattr(module, "in_features", None), shape[1]) if ab == "A" else \
                (getattr(module, "out_features", None), shape[0])
            if isinstance(have, int) and have != want:
                misfit.append(f"{name} has {'in' if ab == 'A' else 'out'} features {have} there, {want} in the adapter")
    out = []
    if absent:
        out.append(f"it lacks {len(absent)} of the modules the adapter adapts (fewer layers, or other module names; "
                   f"e.g. {absent[0]})")
    if misfit:
        out.append(f"{len(misfit)} of the adapter's LoRA matrices do not fit its layers (e.g. {misfit[0]})")
    return out


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
                    ds_config: dict | None = None, checked: Config | None = None):
    """Returns (model, tokenizer, cfg) with the model in eval mode on ``device``. ``base_model``:
    the LoRA adapter's base folder, if not where the config says (see :func:`check_checkpoint`).
    ``checked``: the config :func:`check_checkpoint` returned for this ``path`` and ``base_model``
    (a command that checked the checkpoint before its process group started): it is used, not
    checked again (the check reads every safetensors header and, with ``base_model``, builds the
    base on the meta device). Without it, the checkpoint is checked here.

    ``ds_config`` (a ZeRO-3 JSON; every rank must call this): the model is built partitioned over
    the ranks (as training builds it, :func:`~clsgen_dist.modeling.build.zero3_loading`) and put
    under a DeepSpeed inference engine, which gathers each module's weights for its forward: no
    rank holds the whole model. Every forward is then collective; the evaluation loops lock-step
    the ranks. A 4-bit base loads whole on every rank, as without ``ds_config`` (there is no
    partitioned 4-bit load)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    cfg = checked if checked is not None else check_checkpoint(p, base_model=base_model)
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
