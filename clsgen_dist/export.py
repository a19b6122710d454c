"""Export a LoRA / QLoRA checkpoint as one plain model: the adapter merged into a 16-bit base.

    python launch/export.py --checkpoint runs/a/final --output runs/a/merged [--dtype bfloat16|float32]

The adapter is merged into plain 16-bit (or fp32) linear layers, never into 4-bit ones (which
would re-quantize the merged weights), and the result loads without bitsandbytes. For a QLoRA
checkpoint the default ``--base dequantized`` merges into the NF4 weights the adapter was trained
on, dequantized: the export gives the probabilities of the trained model, to 16-bit rounding
(max |dp| 2e-4 in bf16 on an H200). ``--base original`` merges into the base's own weights
instead, which takes the quantization error back out from under an adapter trained with it: max
|dp| 2e-3 to 7e-3 on the tiny test model, 5e-3 on a random-weight SmolLM2-135M (H200). For a
plain LoRA checkpoint both are the same.

The output is a complete checkpoint that ``load_checkpoint``, ``CLSGen.from_pretrained``,
``launch/eval.py`` and ``launch/predict.py`` load as a full model::

  model.safetensors + config.json, tokenizer files, cls_head.safetensors (copied),
  clsgen_config.yaml (model.finetune=full, model.quantization=none), COMPLETE (written last)

It is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from .checkpoint import CONFIG_NAME, HEAD_NAME, CheckpointError, atomic_folder, check_checkpoint, rebuild_cls_token
from .config import dump_config
from .modeling import load_tokenizer, resolve_model_path
from .modeling.build import load_backbone, resolve_dtype

log = logging.getLogger("clsgen_dist.export")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
EXPORT_MARKER = "EXPORTED_FROM"  # in an export folder: the adapter checkpoint it was merged from


def merged_backbone(checkpoint: str | Path, *, dtype: torch.dtype = torch.bfloat16, base: str = "dequantized",
                    device: str | torch.device | None = None, base_model: str | None = None):
    """The checkpoint's causal LM with its LoRA adapter merged in, in ``dtype``, on the CPU, and the
    checkpoint's config. ``device`` (default: CUDA when available) only re-quantizes a QLoRA base."""
    from peft import PeftModel

    p = Path(checkpoint)
    cfg = check_checkpoint(p, base_model=base_model)
    if not (p / "adapter_config.json").is_file():
        raise CheckpointError(f"{p}: a full model already (no adapter_config.json): nothing to merge")
    if base not in ("dequantized", "original"):
        raise ValueError(f"base must be 'dequantized' or 'original', got {base!r}")
    path = resolve_model_path(cfg.model.name_or_path)
    if base == "dequantized" and cfg.model.quantization != "none":
        # The 4-bit weights the adapter was trained on, quantized as load_checkpoint(device=device)
        # does, then dequantized into plain linear layers.
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backbone = load_backbone(path, cfg.model, dtype=resolve_dtype(cfg.model.dtype, device), attn="sdpa",
                                 device=device)
        rebuild_cls_token(backbone, load_tokenizer(str(p)), cfg, path)
        backbone = backbone.dequantize().to("cpu", dtype)
    else:
        backbone = load_backbone(path, dataclasses.replace(cfg.model, quantization="none"), dtype=dtype,
                                 attn="sdpa", device=torch.device("cpu"))
        rebuild_cls_token(backbone, load_tokenizer(str(p)), cfg, path)
    model = PeftModel.from_pretrained(backbone, str(p))
    return model.merge_and_unload(), cfg


def check_export_target(src: Path, out: Path) -> None:
    """The export replaces ``out`` whole: refuse the checkpoint itself, a folder that contains it
    (``--output runs/a`` for ``runs/a/final`` would delete the run), a file, and a non-empty folder
    that is not an earlier export (marked by ``EXPORT_MARKER``; a run's checkpoint is not one)."""
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise CheckpointError(f"--output {out} is {'the checkpoint' if o == s else 'a folder holding the checkpoint'} "
                              f"{src}; the export replaces its --output folder whole: choose a new folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {out}: is a file; expected a folder (created if missing)")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        what = "a clsgen checkpoint, not an earlier export" if (out / CONFIG_NAME).is_file() else "a non-empty folder"
        raise CheckpointError(f"--output {out}: {what}; the export replaces its --output folder whole: "
                              f"choose a new or empty folder")


def export_merged(checkpoint: str | Path, output: str | Path, *, dtype: str = "bfloat16",
                  base: str = "dequantized", device: str | torch.device | None = None,
                  base_model: str | None = None) -> Path:
    """Write the merged model of ``checkpoint`` as a full checkpoint at ``output`` (atomically)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, out = Path(checkpoint), Path(output)
    check_export_target(src, out)
    merged, cfg = merged_backbone(src, dtype=DTYPES[dtype], base=base, device=device, base_model=base_model)
    cfg.model.finetune, cfg.model.quantization = "full", "none"
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(src)).save_pretrained(tmp)
        shutil.copyfile(src / HEAD_NAME, tmp / HEAD_NAME)
        dump_config(cfg, tmp / CONFIG_NAME)
        (tmp / EXPORT_MARKER).write_text(f"{src.resolve()}\n")
    log.info("exported %s (%s, base=%s) to %s", src, dtype, base, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Merge a LoRA/QLoRA checkpoint's adapter into a 16-bit base and write "
                                            "a full checkpoint (HF model folder + classification head).")
    p.add_argument("--checkpoint", required=True, help="adapter checkpoint folder (e.g. outputs/run/final)")
    p.add_argument("--output", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weight dtype of the export")
    p.add_argument("--base", choices=("dequantized", "original"), default="dequantized",
                   help="QLoRA: merge into the dequantized 4-bit base the adapter was trained on (default: "
                        "reproduces the trained model) or into the base's own 16-bit weights")
    p.add_argument("--device", default=None, help="where a QLoRA base is re-quantized (default: cuda if "
                   "available, else cpu; the same as where the trained model is loaded for eval/predict)")
    from .cli import BASE_MODEL_HELP, user_errors

    p.add_argument("--base-model", default=None, help=BASE_MODEL_HELP)
    args = p.parse_args(argv)
    from .logs import setup_logging

    setup_logging()
    with user_errors():
        from .fileio import check_output_path

        check_output_path(args.output, folder=True)  # before the model loads (check_export_target: the rest)
        out = export_merged(args.checkpoint, args.output, dtype=args.dtype, base=args.base, device=args.device,
                            base_model=args.base_model)
        print(out)
    return 0
