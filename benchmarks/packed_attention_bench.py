"""Benchmark of attention over packed rows: the model's forward+backward with each attention path.

    python benchmarks/packed_attention_bench.py --device cuda   # 2 Llama-3.1-8B layers, T in {8192, 16384}, bf16
    python benchmarks/packed_attention_bench.py --device cpu    # a small check that the script runs (sdpa, eager)

One packed row of examples whose lengths are drawn (seeded) from 64-512 tokens goes through a
random-weight Llama trunk built from a config (no download), forward and backward, as in training:
no attention mask, position ids restarting per example, ``cu_seqlens`` passed as
``DualHeadModel.hidden_states`` passes them. Paths: ``sdpa`` (transformers derives the
block-diagonal ``[T, T]`` mask from the position ids and SDPA runs a masked kernel over the whole
row), ``torch_varlen`` (PyTorch's varlen flash kernel on ``cu_seqlens``, CUDA), and
``flash_attention_2`` (flash-attn's varlen kernel) when the package is installed. Every path's
hidden states are checked against ``sdpa``'s.

Reported: median step time (``triton.testing.do_bench`` on CUDA; wall clock on CPU) and peak memory
above the inputs, side by side in one process. Results are appended to a JSONL file with the
machine, versions and git SHA, and the markdown table is regenerated from the whole file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

from _env import command_line, command_note, git_sha, machine, versions  # noqa: E402  (benchmarks/ is on sys.path as the script folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
DEFAULT_JSONL = HERE / "packed_attention_results.jsonl"
DEFAULT_MD = HERE / "packed_attention.md"
MODELS = {  # (hidden, heads, kv heads, intermediate, layers)
    "cuda": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 num_hidden_layers=2),
    "cpu": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512,
                num_hidden_layers=2),
}
TOKENS = {"cuda": [8192, 16384], "cpu": [2048]}


def _lengths(total: int, seed: int = 0) -> list[int]:
    """Example lengths in [64, 512] filling ``total`` tokens exactly (the last one takes the rest)."""
    import random

    rng = random.Random(seed)
    out = []
    while sum(out) < total:
        out.append(min(rng.randint(64, 512), total - sum(out)))
    return out


def _paths(device: str) -> list[str]:
    if device == "cpu":
        return ["sdpa", "eager"]
    from clsgen_dist.modeling.attention import flash_attn_available, torch_varlen_available

    return (["sdpa"] + (["torch_varlen"] if torch_varlen_available() else [])
            + (["flash_attention_2"] if flash_attn_available() else []))


def measure(device: str, tokens: int, rep_ms: int) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clsgen_dist.modeling import DualHeadModel
    from clsgen_dist.modeling.build import resolve_attn  # noqa: F401  (registers torch_varlen)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = _lengths(tokens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(device)
    ids = torch.randint(0, 32000, (1, tokens), device=device)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, **MODELS[device])
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model = DualHeadModel(lm).train()
    rows, ref = [], None
    for attn in _paths(device):
        lm.config._attn_implementation = attn
        grad = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)

        def step():
            h = model.hidden_states(ids, pos, cu, max(lens))
            h.backward(grad)
            return h

        out = step().detach().float()
        if ref is None:
            ref = out
        err = float((out - ref).abs().max())
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            import triton.testing

            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = triton.testing.do_bench(step, warmup=3, rep=rep_ms, return_mode="median",
                                         grad_to_none=list(model.parameters()))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
                model.zero_grad(set_to_none=True)
            ms, peak = statistics.median(times), None
        model.zero_grad(set_to_none=True)
        rows.append(dict(attn=attn, ms=round(ms, 3), peak_mib=None if peak is None else round(peak, 1),
                         max_abs_diff_vs_sdpa=err))
    for r in rows:
        r["time_vs_sdpa"] = round(r["ms"] / rows[0]["ms"], 3)
    return [dict(tokens=tokens, examples=len(lens), sum_sq_over_t_sq=round(sum(n * n for n in lens) / tokens**2, 4),
                 **r) for r in rows]


def render(jsonl: Path, md: Path) -> None:
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    lines = ["# Packed attention: forward+backward of the model trunk per attention path", "",
             "Generated by `benchmarks/packed_attention_bench.py` from `packed_attention_results.jsonl`. "
             "`Σl²/T²`: the share of the row's T² query-key pairs that lie inside examples (the work a "
             "varlen kernel does, against the masked kernel's T²).", ""]
    for run in recs:
        lines += [f"## {run['date']} · {run['machine']} · git {run['git']}", "",
                  f"{run['model']}; {run['dtype']}; {json.dumps(run['versions'])}.{command_note(run)}", "",
                  "| tokens | examples | Σl²/T² | attention | median ms | × sdpa | peak MiB | max abs diff vs sdpa |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in run["rows"]:
            lines.append(f"| {r['tokens']} | {r['examples']} | {r['sum_sq_over_t_sq']} | {r['attn']} | {r['ms']} | "
                         f"{r['time_vs_sdpa']} | {r['peak_mib'] if r['peak_mib'] is not None else '–'} | "
                         f"{r['max_abs_diff_vs_sdpa']:.3g} |")
        lines.append("")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(md)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--rep-ms", type=int, default=300, help="CUDA: do_bench repetition time per path")
    p.add_argument("--jsonl", type=Path, default=DEFAULT_JSONL)
    p.add_argument("--md", type=Path, default=DEFAULT_MD)
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    rows = []
    for t in TOKENS[args.device]:
        rows += measure(args.device, t, args.rep_ms)
        for r in rows[-len(_paths(args.device)):]:
            print(json.dumps(r), flush=True)
    m = MODELS[args.device]
    run = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(args.device),
               git=git_sha(), command=command_line(), dtype="bfloat16" if args.device == "cuda" else "float32",
               model=(f"random Llama trunk: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
                      f"{m['num_attention_heads']}/{m['num_key_value_heads']} heads, MLP {m['intermediate_size']}"),
               versions=versions("torch", "transformers", "flash-attn"), rows=rows)
    with args.jsonl.open("a") as f:
        f.write(json.dumps(run) + "\n")
    render(args.jsonl, args.md)
    print(args.md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
