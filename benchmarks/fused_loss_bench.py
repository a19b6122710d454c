"""Benchmark of the fused LM loss: median forward+backward time and peak memory, side by side.

    python benchmarks/fused_loss_bench.py --device cpu     # N=4096 H=576 V=49152 fp32
    python benchmarks/fused_loss_bench.py --device cuda    # N in {8192, 16384}, H=4096, V=128256 bf16

Variants: ``naive`` (F.linear + F.cross_entropy), ``torch`` (our chunked path), ``triton`` (ours,
CUDA), ``triton_acc_bf16`` (ours with ``accum_dtype=torch.bfloat16``, the accumulation Liger and
CCE use by default), ``triton_acc_bf16_c512`` (the same in 512-row chunks, Liger's chunking at the
GPU shapes), ``triton_recompute`` / ``triton_recompute_bf16`` (ours with ``grad_mode="recompute"``:
no logits buffer; the backward recomputes the logits a chunk of vocabulary columns at a time into
scratch inside the weight gradient and makes the gradients with cuBLAS; ``d hidden`` accumulated
in fp32 / bf16), ``torch_recompute`` (the same on the torch path: CPU), ``triton_recompute_tiles`` /
``triton_recompute_tiles_bf16`` (``grad_mode="recompute_tiles"``: the one-kernel version with
atomic / locked accumulation), ``liger``
(Liger-Kernel fused linear CE) and ``cce`` (Apple cut-cross-entropy) when importable. Every variant
computes the summed LM cross-entropy over all N rows (no ignored rows, no classification
positions) and the gradients of the hidden states and of the LM weight.

Each (shape, variant) runs in a fresh subprocess, so a crash or an OOM cannot leak into the next
one and CPU peak memory can be read from ``ru_maxrss``. Memory reported = peak during the timed
steps minus the memory held once the inputs exist (CPU: ``ru_maxrss`` delta; CUDA:
``max_memory_allocated`` delta). It therefore includes the returned gradients.

Results are appended to a JSONL file (machine, versions, git SHA, date) and the markdown table is
regenerated from the whole file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import sys
import time
from pathlib import Path

# benchmarks/ is on sys.path as the script folder
from _env import (command_line, command_note, git_sha, machine, print_this_run, read_records, record,  # noqa: E402
                  run_worker, versions)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSONL = HERE / "fused_loss_results.jsonl"
DEFAULT_MD = HERE / "fused_loss.md"
# CUDA: the headline shape and variants first, each result recorded as its worker returns, so that a
# run cut off by a device call's time limit keeps what finished
SHAPES = {"cpu": [(4096, 576, 49152)], "cuda": [(16384, 4096, 128256), (8192, 4096, 128256)]}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
VARIANTS = {
    "cpu": ["naive", "torch", "torch_recompute", "liger", "cce"],
    "cuda": ["naive", "triton", "triton_recompute_bf16", "liger", "cce", "triton_acc_bf16", "triton_recompute",
             "torch", "triton_acc_bf16_c512", "triton_recompute_tiles_bf16", "triton_recompute_tiles"],
}
# our variants -> dual_head_loss keywords (accum_dtype by name: torch is imported in the workers only)
OURS = {
    "torch": dict(impl="torch"),
    "triton": dict(impl="triton"),
    "triton_acc_bf16": dict(impl="triton", accum_dtype="bfloat16"),
    "triton_acc_bf16_c512": dict(impl="triton", accum_dtype="bfloat16", chunk_size=512),
    "torch_recompute": dict(impl="torch", grad_mode="recompute"),
    "triton_recompute": dict(impl="triton", grad_mode="recompute"),
    "triton_recompute_bf16": dict(impl="triton", grad_mode="recompute", accum_dtype="bfloat16"),
    "triton_recompute_tiles": dict(impl="triton", grad_mode="recompute_tiles"),
    "triton_recompute_tiles_bf16": dict(impl="triton", grad_mode="recompute_tiles", accum_dtype="bfloat16"),
}
TIMING = {
    "cpu": "median wall time of the timed steps after one warm-up, all variants interleaved step by step in one process",
    "cuda": "triton.testing.do_bench median after compile/autotune warm-up",
}
TARGETS = "Targets: memory <= naive/8 and time <= 1.2x naive (CPU); on GPU memory <= CCE, time <= Liger, <= 1.3x the matmul floor"


# ----------------------------------------------------------------------------------------------
# worker: one variant at one shape, in its own process
# ----------------------------------------------------------------------------------------------


def _loss_fn(variant: str, chunk_size: int | None = None):
    import torch
    import torch.nn.functional as F

    if variant == "naive":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    if variant in OURS:
        sys.path.insert(0, str(ROOT))
        from clsgen_dist.ops import dual_head_loss

        kw = dict(OURS[variant])
        kw["accum_dtype"] = getattr(torch, kw.get("accum_dtype", "float32"))
        kw["chunk_size"] = kw.get("chunk_size", chunk_size)

        def ours(h, w, t):
            z = h.new_zeros((0,), dtype=torch.long)
            cw, cb = h.new_zeros((1, h.shape[1]), dtype=torch.float32), h.new_zeros((1,), dtype=torch.float32)
            return dual_head_loss(h, w, t, cw, cb, z, z, **kw)[0]

        return ours
    if variant == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")
    if variant == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: linear_cross_entropy(h, w, t, reduction="sum")  # defaults (filter_eps="high")
    raise ValueError(variant)


def _check_vs_naive(loss_fn, h, w, t) -> dict:
    """Relative differences of loss and gradients between a variant and the naive one (same inputs)."""
    out = {}
    for name, fn in (("ours", loss_fn), ("naive", _loss_fn("naive"))):
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        out[name] = (loss.detach().double(), h.grad.double(), w.grad.double())
        h.grad = w.grad = None
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {k: float(f"{rel(a, b):.3g}") for k, a, b in zip(("loss", "d_hidden", "d_weight"), out["ours"], out["naive"])}


def _worker(args) -> dict:
    import torch

    n, hdim, vocab = args.shape
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.variant in ("liger", "cce") and dev.type != "cuda":
        raise RuntimeError("needs CUDA (Triton kernels)")
    # In-place init: no [V, H] temporaries, so the CPU baseline RSS is the inputs.
    h = torch.empty(n, hdim, device=dev, dtype=dtype).normal_().requires_grad_()
    w = torch.empty(vocab, hdim, device=dev, dtype=dtype).normal_(std=hdim**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=dev)

    loss_fn = _loss_fn(args.variant, args.chunk_size)

    def step():
        h.grad = None
        w.grad = None
        loss_fn(h, w, t).backward()

    if dev.type == "cuda":
        import triton.testing

        step()  # compile + autotune
        step()
        torch.cuda.synchronize()
        h.grad = w.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(step, warmup=100, rep=args.rep_ms, grad_to_none=[h, w], return_mode="median")
        res = {"median_ms": ms, "peak_mem_mb": peak / 2**20, "mem_method": "torch.cuda.max_memory_allocated delta"}
        if args.variant != "naive":  # sanity check at full size (after timing): vs naive at the same dtype
            res["check_vs_naive"] = _check_vs_naive(loss_fn, h, w, t)
        else:  # the matmul floor: 6 N H V FLOPs at the GEMM rate measured here ([N, H] @ [H, V])
            mm = triton.testing.do_bench(lambda: torch.mm(h.detach(), w.detach().t()), warmup=50, rep=300, return_mode="median")
            res["floor"] = {"status": "ok", "median_ms": 3 * mm, "tflops": 2 * n * hdim * vocab / mm / 1e9}
        return res

    # CPU, memory: a fresh process per variant, two steps (the second is the steady state).
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    step()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb
    return {"peak_mem_mb": peak_kb / 1024, "mem_method": "ru_maxrss delta in a fresh process per variant"}


def _cpu_time_worker(args) -> dict:
    """CPU time of several variants in one process, interleaved rep by rep (rotating the order), so
    that load from other processes on a shared machine hits every variant alike."""
    import torch

    n, hdim, vocab = args.shape
    torch.manual_seed(0)
    h = torch.empty(n, hdim, dtype=getattr(torch, args.dtype)).normal_().requires_grad_()
    w = torch.empty(vocab, hdim, dtype=h.dtype).normal_(std=hdim**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    variants = args.worker.split(",")
    fns = {v: _loss_fn(v, args.chunk_size) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.reps + 1):  # rep 0 is the warm-up
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            h.grad = w.grad = None
            t0 = time.perf_counter()
            fns[v](h, w, t).backward()
            if r:
                times[v].append(time.perf_counter() - t0)
    return {
        v: {"median_ms": 1e3 * statistics.median(x), "min_ms": 1e3 * min(x), "all_ms": [round(1e3 * y) for y in x]}
        for v, x in times.items()
    }


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _run_worker(args, shape, variant: str, mode: str = "run") -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--mode", mode, "--device", args.device, "--dtype", args.dtype,
           "--shape", ",".join(map(str, shape)), "--reps", str(args.reps), "--rep-ms", str(args.rep_ms)]  # fmt: skip
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return run_worker(cmd, timeout=args.timeout)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", action="append", help="N,H,V (repeatable); default per device")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16; default per device")
    ap.add_argument("--variants", default=None, help="comma list; default per device")
    ap.add_argument("--reps", type=int, default=5, help="timed CPU steps (after one warm-up)")
    ap.add_argument("--rep-ms", type=int, default=600, help="do_bench time budget per CUDA variant")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for our variants (default: op's own)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    ap.add_argument("--jsonl", type=Path, default=DEFAULT_JSONL)
    ap.add_argument("--md", type=Path, default=DEFAULT_MD)
    ap.add_argument("--render-only", action="store_true", help="only regenerate the markdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or DTYPES[args.device]

    if args.worker:
        args.variant = args.worker
        args.shape = tuple(int(x) for x in args.shape[0].split(","))
        try:
            res = {"status": "ok", **(_cpu_time_worker(args) if args.mode == "time" else _worker(args))}
        except Exception as e:  # reported, not raised: one variant must not stop the table
            import traceback

            kind = "error" if args.variant in OURS else "skipped"
            msg = " ".join(str(e).split())[:300]
            res = {"status": f"{kind}: {type(e).__name__}: {msg}", "traceback": traceback.format_exc()[-4000:]}
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.render_only:
        render(args.jsonl, args.md)
        return

    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES[args.device]
    variants = args.variants.split(",") if args.variants else VARIANTS[args.device]
    now = dt.datetime.now(dt.timezone.utc)
    common = {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "command": command_line(),
        "machine": machine(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "versions": versions("torch", "triton", "liger-kernel", "cut-cross-entropy"),
    }
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    all_results = []

    def keep(shape, variant: str, res: dict) -> None:
        if res.get("traceback"):
            print(f"--- {variant} at {shape}:\n{res.pop('traceback')}", flush=True)
        rec = {**common, "N": shape[0], "H": shape[1], "V": shape[2], "variant": variant, **res}
        all_results.append(rec)
        record(args.jsonl, rec)

    for shape in shapes:
        if args.device == "cuda":  # everything in one worker per variant, recorded as it returns
            for v in variants:
                res = _run_worker(args, shape, v)
                floor = res.pop("floor", None)
                keep(shape, v, res)
                if floor is not None:
                    keep(shape, "matmul", floor)
            continue
        results = {v: _run_worker(args, shape, v) for v in variants}  # CPU: memory, then time interleaved
        ok = [v for v in variants if results[v].get("status") == "ok"]
        if ok:
            timed = _run_worker(args, shape, ",".join(ok), mode="time")
            for v in ok:
                results[v].update(timed.get(v) or {"status": timed.get("status", "timing failed")})
        for variant, res in results.items():
            keep(shape, variant, res)
    render(args.jsonl, args.md)
    print_this_run(args.md, common["date"])
    ours = [r for r in all_results if r["variant"] in OURS]
    if any(r.get("status") != "ok" for r in ours):
        sys.exit(f"our variants did not all run: {[(r['N'], r['variant'], r.get('status')) for r in ours]}")


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------


def _fmt(x, nd=1):
    return "–" if x is None else f"{x:,.{nd}f}"


def render(jsonl: Path, md: Path) -> None:
    recs = read_records(jsonl)
    groups: dict[tuple, list] = {}
    for r in recs:
        groups.setdefault((r["run_id"], r["device"], r["N"], r["H"], r["V"], r["dtype"]), []).append(r)
    out = [
        "# Fused LM loss: forward + backward",
        "",
        "Generated by `benchmarks/fused_loss_bench.py` from `benchmarks/fused_loss_results.jsonl` (newest first).",
        "Every variant: summed CE over N rows (no ignored rows), gradients of hidden and LM weight.",
        f"Memory = peak during a step minus the memory held with the inputs allocated (so it includes the "
        f"returned gradients). {TARGETS}.",
        "",
        "Variants: `naive` = `F.cross_entropy(F.linear(h, W).float(), t, reduction='sum')`; `torch` = our chunked "
        "path (CPU: fp32 compute; CUDA: 16-bit GEMMs with fp32 output and an fp32 log-sum-exp, except in the H200 "
        "runs at git 3b22bf0, which predate that mode and computed in fp32); `triton` = ours on CUDA with the default `accum_dtype=float32` (the LM weight gradient "
        "is held in fp32 until backward: +4·V·H bytes); `triton_acc_bf16` = ours accumulating it in bf16, as Liger "
        "and CCE do by default; `triton_acc_bf16_c512` = the same in 512-row chunks; `triton_recompute` / "
        "`triton_recompute_bf16` = ours with `grad_mode='recompute'` (no logits buffer; the backward recomputes "
        "the logits a chunk of vocabulary columns at a time into scratch inside the weight gradient and makes the "
        "gradients with cuBLAS, `d hidden` accumulated in fp32 / bf16), `torch_recompute` the same on the torch path; "
        "`triton_recompute_tiles` / `triton_recompute_tiles_bf16` = `grad_mode='recompute_tiles'` (one kernel per "
        "logits tile, gradients accumulated in fp32 by atomics / in bf16 under tile locks; the H200 rows at git "
        "5963ff1 were recorded as `triton_recompute[_bf16]`, the only recompute mode then); `liger` = `liger_fused_linear_cross_entropy` (defaults); `cce` = "
        "`cut_cross_entropy.linear_cross_entropy` (defaults, i.e. `filter_eps='high'` gradient filtering). "
        "On CUDA every non-naive variant is also compared with naive at full size (relative differences in the "
        "status column).",
        "",
    ]
    for key in sorted(groups, key=lambda k: (k[0], k[2]), reverse=True):
        run_id, device, n, h, v, dtype = key
        rows = groups[key]
        r0 = rows[0]
        mem_method = next((r["mem_method"] for r in rows if r.get("mem_method")), "–")
        vers = ", ".join(f"{k} {val}" for k, val in r0["versions"].items() if val)
        out += [f"## {device} N={n} H={h} V={v} {dtype} — {r0['date']}", "",
                f"{r0['machine']}; {vers}; git {r0['git_sha']}.{command_note(r0)}", "",
                f"Memory: {mem_method}. Time: {TIMING[device]}.", ""]  # fmt: skip
        by = {r["variant"]: r for r in rows}
        naive = by.get("naive", {})
        floor = by.get("matmul", {})
        cols = ["variant", "median ms", "time × naive", "peak MiB", "mem × naive"]
        cols += ["time × floor"] if floor.get("status") == "ok" else []
        cols += ["status"]
        out += ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 2) + "---|"]
        for r in rows:
            if r["variant"] == "matmul":
                continue
            ok = r.get("status") == "ok"
            tm = r.get("median_ms") if ok else None
            mem = r.get("peak_mem_mb") if ok else None
            x_t = tm / naive["median_ms"] if tm and naive.get("status") == "ok" else None
            naive_mem = naive.get("peak_mem_mb") if naive.get("status") == "ok" else None
            x_m = mem / naive_mem if mem is not None and naive_mem else None
            cells = [r["variant"], _fmt(tm), _fmt(x_t, 2), _fmt(mem, 0), _fmt(x_m, 3)]
            if floor.get("status") == "ok":
                cells.append(_fmt(tm / floor["median_ms"] if tm else None, 2))
            chk = r.get("check_vs_naive")
            note = f"; vs naive: loss {chk['loss']:.1e}, dh {chk['d_hidden']:.1e}, dW {chk['d_weight']:.1e}" if chk else ""
            note += f"; min {r['min_ms']:,.0f} ms" if ok and r.get("min_ms") else ""
            cells.append(r.get("status", "?") + note)
            out.append("| " + " | ".join(cells) + " |")
        if floor.get("status") == "ok":
            out += ["", f"Matmul floor: 6·N·H·V FLOPs at the measured {dtype} `torch.mm` rate "
                        f"({floor['tflops']:.0f} TFLOP/s) = {floor['median_ms']:.1f} ms."]  # fmt: skip
        out.append("")
    md.write_text("\n".join(out))


if __name__ == "__main__":
    main()
