"""Peak memory of QLoRA vs LoRA on a bf16 base vs full fine-tuning, for the default model
(SmolLM2-135M-Instruct), measured side by side in one run.

    python benchmarks/qlora_memory.py                   # CPU: peak RSS, a fresh process per variant
    python benchmarks/qlora_memory.py --device cuda     # torch.cuda.max_memory_allocated

Every variant runs in its own subprocess: ``build_model`` (the project's loader, so QLoRA is exactly
what ``model.quantization=nf4`` trains) + ``--steps`` training steps on one fixed packed row of
``--seq`` tokens (fused loss forward, backward, optimizer step). The optimizer is the one
``build_engine`` picks (``train.optimizer=auto``): torch AdamW, except bitsandbytes ``PagedAdamW8bit``
for QLoRA on CUDA; ``full_fp32_8bit`` names ``adamw_8bit``.
Gradient checkpointing is on in every variant (QLoRA forces it), so the differences are weights,
gradients and optimizer state rather than activations.

Variants:
  qlora       4-bit NF4 linear layers (double quantization, bf16 compute) + LoRA r=16 on all of them
  lora_bf16   LoRA r=16 on a bf16 base
  full_fp32   full fine-tuning, fp32 weights + AdamW: 16 bytes/parameter, what a bf16 mixed-precision
              engine also holds (bf16 weights and gradients, fp32 master weights and moments)
  qlora_fp32  (CPU only) QLoRA as CPU runs of this project compute it: fp32, embeddings fp32
  full_fp32_8bit  full_fp32 with ``train.optimizer=adamw_8bit``: 8-bit moments, 10 bytes/parameter

Measured per variant:
  weights     bytes of the loaded backbone (4-bit weights + their quantization constants), and of
              its linear projections alone next to what they take in 16-bit
  CPU         process peak RSS (``ru_maxrss``: the interpreter and libraries, ~430 MiB, and the load,
              which reads the fp32 checkpoint file through memory-mapped pages) at the end of the
              load and at the end; and anonymous memory (``RssAnon``) after the load and at its peak
              during the training steps (sampled every 2 ms), both minus its value after imports.
              For these two, the weights the loader left memory-mapped are first copied into
              ordinary memory and freed loader buffers are handed back (``malloc_trim``), so every
              variant counts exactly what it holds
  CUDA        ``max_memory_allocated`` over load + steps, and over the steps alone

Results are appended to ``qlora_memory_results.jsonl`` (machine, versions, git SHA, date) and the
markdown table ``qlora_memory.md`` is regenerated from the whole file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

# benchmarks/ is on sys.path as the script folder
from _env import (AnonPeak, command_line, command_note, git_sha, machine, print_this_run, read_records,  # noqa: E402
                  record, run_worker, status_kib, versions)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSONL = HERE / "qlora_memory_results.jsonl"
DEFAULT_MD = HERE / "qlora_memory.md"
VARIANTS = {"cpu": ["qlora", "lora_bf16", "full_fp32", "qlora_fp32", "full_fp32_8bit"],
            "cuda": ["qlora", "lora_bf16", "full_fp32", "full_fp32_8bit"]}
OVERRIDES = {
    "qlora": ["model.quantization=nf4", "model.dtype=bfloat16"],
    "qlora_fp32": ["model.quantization=nf4", "model.dtype=float32"],
    "lora_bf16": ["model.finetune=lora", "model.dtype=bfloat16"],
    "full_fp32": ["model.finetune=full", "model.dtype=float32"],
    "full_fp32_8bit": ["model.finetune=full", "model.dtype=float32", "train.optimizer=adamw_8bit"],
}
MiB = 2**20


# ----------------------------------------------------------------------------------------------
# worker: one variant, in its own process
# ----------------------------------------------------------------------------------------------


def weight_bytes(causal_lm) -> dict:
    """Bytes of the backbone's weights: all of them, and its linear projections alone (4-bit packed
    weights + absmax/code constants, or dense) next to their size in 16-bit. LoRA adapters apart."""
    import torch

    total = linear = linear16 = adapters = 0
    seen: set[int] = set()
    head = causal_lm.get_output_embeddings()
    for mname, mod in causal_lm.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied embeddings count once
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            qs = getattr(p, "quant_state", None)
            if qs is not None:  # bitsandbytes Params4bit: packed bytes + quantization constants
                consts = [qs.absmax, qs.code, getattr(qs, "offset", None)]
                if getattr(qs, "state2", None) is not None:
                    consts += [qs.state2.absmax, qs.state2.code]
                nbytes += sum(t.numel() * t.element_size() for t in consts if isinstance(t, torch.Tensor))
            total += nbytes
            if "lora_" in mname:
                adapters += nbytes
            elif pname == "weight" and mod is not head and (qs is not None or isinstance(mod, torch.nn.Linear)):
                linear += nbytes
                linear16 += 2 * (int(torch.Size(qs.shape).numel()) if qs is not None else p.numel())
    return {"weights_mib": (total - adapters) / MiB, "linear_mib": linear / MiB, "linear_16bit_mib": linear16 / MiB,
            "adapter_mib": adapters / MiB}


def _batch(cfg, tokenizer, seq: int):
    """One packed row of ``seq`` tokens: fixed review snippets with a short explanation each."""
    from clsgen_dist.data.packing import collate
    from clsgen_dist.predict import make_encoder

    enc = make_encoder(cfg, tokenizer)
    texts = ["A warm, funny and beautifully acted film that earns every laugh.",
             "Tedious, overlong and almost entirely devoid of wit.",
             "The cast is superb and the script crackles with energy, though the middle act sags a little.",
             "A muddled mess that never decides what it wants to be."]
    exs, n = [], 0
    while True:
        i = len(exs)
        ex = enc.encode(texts[i % 4], (i + 1) % 2, "The reviewer's words say so.", index=i)
        if n + len(ex) > seq:
            break
        exs.append(ex)
        n += len(ex)
    return collate(exs, capacity=seq)


def _worker(args) -> dict:
    import torch

    import bitsandbytes  # noqa: F401  (imported before the baseline, like every other library)
    from clsgen_dist.config import load_config
    from clsgen_dist.distributed.engine import make_optimizer, param_groups, resolve_optimizer
    from clsgen_dist.modeling import build_model

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    cfg = load_config(None, [f"model.name_or_path={args.model}", f"model.lora_r={args.lora_r}",
                             f"model.lora_alpha={2 * args.lora_r}", "model.gradient_checkpointing=true",
                             f"data.max_seq_len={args.seq}", "data.label_names=[negative, positive]",
                             *OVERRIDES[args.variant]])
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    anon0 = status_kib("RssAnon") / 1024
    model, tok = build_model(cfg.model, device=device, seed=0)
    res = weight_bytes(model.causal_lm)
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    b = _batch(cfg, tok, args.seq).to(device)
    opt = make_optimizer(resolve_optimizer(cfg, cuda), param_groups(model, cfg), lr=1e-4)
    model.train()
    if not cuda:
        import ctypes
        import gc

        res["load_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Tensors the loader did not convert (fp32 from the fp32 file) stay memory-mapped: file-backed
        # pages, resident or not, and one of them keeps the whole file mapped. Copy every weight into
        # ordinary memory so that all variants count their weights the same way.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        # glibc keeps freed buffers mapped; hand them back so that the numbers below measure what the
        # run holds, not what loading left behind
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        res["after_load_mib"] = status_kib("RssAnon") / 1024 - anon0
    if cuda:
        torch.cuda.synchronize()
        res["after_load_mib"] = torch.cuda.memory_allocated() / MiB
        load_peak = torch.cuda.max_memory_allocated() / MiB
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        for _ in range(args.steps):
            out = model(**b.model_inputs(), num_lm_tokens=b.n_lm, num_cls_examples=len(b.cls_index))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())  # a sync point
    res["step_s"] = (time.perf_counter() - t0) / args.steps
    res["losses"] = losses
    res["tokens"] = int(b.n_tokens)
    if cuda:
        res["train_peak_mib"] = torch.cuda.max_memory_allocated() / MiB
        res["peak_mib"] = max(load_peak, res["train_peak_mib"])
        res["mem_method"] = "torch.cuda.max_memory_allocated"
    else:
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["import_rss_mib"] = maxrss0
        res["train_peak_mib"] = anon.peak / 1024 - anon0
        res["mem_method"] = "ru_maxrss (fresh process); after load and training phase: RssAnon"
    return res


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _run_worker(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--device", args.device, "--steps", str(args.steps),
           "--seq", str(args.seq), "--lora-r", str(args.lora_r), "--threads", str(args.threads), "--model", args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_worker(cmd, timeout=args.timeout, env=env)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--variants", default=None, help="comma list; default per device")
    ap.add_argument("--steps", type=int, default=3, help="training steps per variant")
    ap.add_argument("--seq", type=int, default=512, help="tokens in the packed training row")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--model", default="default", help="HF model folder (default: SmolLM2-135M-Instruct); memory "
                    "depends on the shapes only, so a random-weight copy of its config measures the same")
    ap.add_argument("--model-note", default="", help="how the model folder was made, for the table")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    ap.add_argument("--jsonl", type=Path, default=DEFAULT_JSONL)
    ap.add_argument("--md", type=Path, default=DEFAULT_MD)
    ap.add_argument("--render-only", action="store_true", help="only regenerate the markdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        sys.path.insert(0, str(ROOT))
        args.variant = args.worker
        try:
            res = {"status": "ok", **_worker(args)}
        except Exception as e:  # reported, not raised: one variant must not stop the table
            import traceback

            res = {"status": f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                   "traceback": traceback.format_exc()[-4000:]}
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.render_only:
        render(args.jsonl, args.md)
        return

    variants = args.variants.split(",") if args.variants else VARIANTS[args.device]
    now = dt.datetime.now(dt.timezone.utc)
    common = {"run_id": now.strftime("%Y%m%dT%H%M%SZ"), "date": now.isoformat(timespec="seconds"),
              "git_sha": git_sha(), "command": command_line(), "machine": machine(args.device), "device": args.device,
              "versions": versions("torch", "transformers", "peft", "bitsandbytes", "deepspeed"), "steps": args.steps, "seq": args.seq, "lora_r": args.lora_r,
              "model": "SmolLM2-135M-Instruct" if args.model == "default" else args.model, "model_note": args.model_note,
              "threads": args.threads if args.device == "cpu" else None}
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for v in variants:  # one after the other: side by side on the same machine, never concurrently
        res = _run_worker(args, v)
        if res.get("traceback"):
            print(f"--- {v}:\n{res.pop('traceback')}", flush=True)
        if res.get("status") != "ok":
            failed.append((v, res.get("status")))
        rec = {**common, "variant": v, **res}
        record(args.jsonl, rec)
    render(args.jsonl, args.md)
    print_this_run(args.md, common["date"])
    if failed:
        sys.exit(f"variants that did not run: {failed}")


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------


def _fmt(x, nd=0):
    return "–" if x is None else f"{x:,.{nd}f}"


def _ratio(a, b, nd=2):
    return "–" if a is None or not b else f"{a / b:.{nd}f}"


def render(jsonl: Path, md: Path) -> None:
    recs = read_records(jsonl)
    runs: dict[str, list] = {}
    for r in recs:
        runs.setdefault(r["run_id"], []).append(r)
    out = [
        "# QLoRA memory: 4-bit base + LoRA vs LoRA on a bf16 base vs full fine-tuning",
        "",
        "Generated by `benchmarks/qlora_memory.py` from `benchmarks/qlora_memory_results.jsonl` (newest first).",
        "Model: SmolLM2-135M-Instruct (the default; 30 layers, H=576, tied 49,152 × 576 embedding). Each variant "
        "runs alone in a fresh process: model load + a few optimizer steps on one fixed packed row, gradient "
        "checkpointing on everywhere. See the script's docstring for the exact definitions.",
        "",
        "- **weights**: the loaded backbone (4-bit packed weights + quantization constants); **linear**: its linear "
        "projections alone, and how many times smaller they are than in 16-bit. The tied embedding (= LM head, "
        "28.3 M parameters) is never quantized: it stays in the compute dtype.",
        "- **CPU**: *load peak* / *process peak* = `ru_maxrss` (interpreter and libraries ≈ the *imports* column, "
        "plus the load, which reads the fp32 checkpoint file through memory-mapped pages) after the load / at the "
        "end; *after load* / *train peak* = anonymous memory (`RssAnon`) once the model is built / its peak during "
        "the steps (sampled every 2 ms), minus its value after imports: what the run itself holds. For these two, "
        "weights the loader left memory-mapped are copied into ordinary memory and freed loader buffers are handed "
        "back first (`malloc_trim`), so all variants count their weights alike. *s/step* on CPU: a 2-core machine "
        "shared with other jobs, indicative only. **CUDA**: `memory_allocated` after load, `max_memory_allocated` "
        "over load + steps (*peak*) and over the steps alone (*train peak*); a random-weight copy of the model's "
        "config (memory depends on shapes only).",
        "- Ratios are against `lora_bf16` and `full_fp32` of the same run, on the train-peak column. CUDA *s/step* "
        "includes the first step's Triton compilation and autotuning.",
        "- Reading: NF4 with double quantization costs ~4.13 bits per weight (4 + an 8-bit absmax per 64 weights + "
        "an fp32 scale per 256 absmax), so the linear projections take ~1/3.9 of 16-bit; the whole backbone shrinks "
        "less because the tied embedding stays 16-bit (21 % of SmolLM2's bf16 weights, 13 % of Llama-3.1-8B's "
        "embedding + LM head). The training peaks add what every variant pays alike (activations, the loss op, the "
        "LoRA states), which on a 135M model outweighs the weights; on an 8B model the weights dominate.",
        "- `full_fp32_8bit` (`train.optimizer=adamw_8bit`): the Adam moments shrink from 8 to ~2 bytes per "
        "parameter (1,026 → ~260 MiB here), but on CPU the train peak falls by less: bitsandbytes' CPU update "
        "dequantizes one tensor's moments to fp32 at a time and works on fp32 temporaries (moments, gradient "
        "copy, denominator: ~5 × 108 MiB for the 28.3 M-parameter embedding). Its CUDA kernel updates the 8-bit "
        "states in place.",
        "",
    ]
    for run_id in sorted(runs, reverse=True):
        rows = runs[run_id]
        r0 = rows[0]
        by = {r["variant"]: r for r in rows}
        vers = ", ".join(f"{k} {v}" for k, v in r0["versions"].items() if v)
        thr = f", {r0['threads']} threads" if r0.get("threads") else ""
        out += [f"## {r0['device']} — {r0['date']}", "",
                f"{r0['machine']}; {vers}; git {r0['git_sha']}. Model {r0.get('model', '?')}"
                f"{' (' + r0['model_note'] + ')' if r0.get('model_note') else ''}; {r0['steps']} steps of "
                f"{r0['seq']} tokens, LoRA r={r0['lora_r']}{thr}.{command_note(r0)}", ""]
        cpu = r0["device"] == "cpu"
        cols = ["variant", "trainable", "weights MiB", "linear MiB", "linear × 16-bit"]
        cols += ["imports MiB", "load peak MiB", "process peak MiB", "after load MiB", "train peak MiB"] if cpu \
            else ["after load MiB", "peak MiB", "train peak MiB"]
        cols += ["× lora_bf16", "× full_fp32", "s/step", "status"]
        out += ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 2) + "---|"]
        ref_l = by.get("lora_bf16", {}).get("train_peak_mib")
        ref_f = by.get("full_fp32", {}).get("train_peak_mib")
        for r in rows:
            ok = r.get("status") == "ok"
            g = (lambda k: r.get(k)) if ok else (lambda k: None)
            lin = g("linear_mib")
            cells = [r["variant"], _fmt(g("trainable_params")), _fmt(g("weights_mib"), 1), _fmt(lin, 1),
                     _ratio(g("linear_16bit_mib"), lin)]
            cells += [_fmt(g("import_rss_mib")), _fmt(g("load_peak_rss_mib")), _fmt(g("peak_rss_mib")),
                      _fmt(g("after_load_mib")), _fmt(g("train_peak_mib"))] if cpu else \
                [_fmt(g("after_load_mib")), _fmt(g("peak_mib")), _fmt(g("train_peak_mib"))]
            cells += [_ratio(g("train_peak_mib"), ref_l), _ratio(g("train_peak_mib"), ref_f),
                      _fmt(g("step_s"), 2), r.get("status", "?")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    md.write_text("\n".join(out))


if __name__ == "__main__":
    main()
