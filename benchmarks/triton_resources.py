"""Registers, local memory (spills) and shared memory of our Triton kernels, compiled for sm_90
(H100/H200) on any machine -- no GPU needed: Triton's bundled ptxas and cuobjdump do the work.

    python benchmarks/triton_resources.py            # writes benchmarks/triton_resources.md
    pip install --no-deps --target /tmp/triton36 triton==3.6.0             # another Triton (the GPU image's)
    PYTHONPATH=/tmp/triton36 python benchmarks/triton_resources.py

Each Triton version gets its own section of the table (a rerun replaces its version's section).

For each kernel (``_logits_lse_kernel`` of every gradient mode's forward, ``_grad_gemm_kernel`` of
``grad_mode="recompute"``, ``_recompute_grad_kernel`` of ``grad_mode="recompute_tiles"``) and each
autotune config, at bf16 inputs (what GPUs run; fp32 is for
tests), specialised as the JIT would for the GPU benchmark's N=16384, H=4096, V=128256 (aligned
pointers, unit strides folded, multiples of 16 marked; no bias): registers per
thread, stack frame (bytes of local memory per thread: spills), number of local stores in the SASS,
shared memory, and the number of Hopper warpgroup MMA instructions (0 = no tensor cores).
A spill-free config is a necessary condition for speed, not a measurement of it: timings need a GPU
(benchmarks/fused_loss_bench.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

HERE = Path(__file__).resolve().parent
SHAPE = (16384, 4096, 128256)  # N, H, V
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def _jit(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, args: dict, constexprs: dict, warps: int, stages: int):
    """Compile as the JIT would for these argument values: pointers (``"*bf16"`` ...) 16-byte aligned,
    integers that equal 1 folded into constants, integers divisible by 16 marked so (what lets the
    compiler vectorise and pipeline the loads)."""
    import triton
    from triton.backends.compiler import GPUTarget

    jit = _jit(kernel)
    signature, consts, attrs = {}, dict(constexprs), {}
    for name, value in args.items():
        idx = (jit.arg_names.index(name),)
        if isinstance(value, str):  # a pointer
            signature[name] = value
            attrs[idx] = [["tt.divisibility", 16]]
        elif value == 1:
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[idx] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=jit, signature=signature, attrs=attrs,
                                    constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps, "num_stages": stages})


def _usage(compiled) -> dict:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res)
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local_stores": sass.count("STL"),
            "shared_kib": compiled.metadata.shared / 1024, "wgmma": sass.count("HGMMA")}


def rows() -> list[dict]:
    from clsgen_dist.ops import triton_fused as tf

    out = []
    n, h, v = SHAPE  # the GPU benchmark's larger shape; contiguous tensors
    lse_sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "t_ptr": "*i64", "l_ptr": "*bf16",
               "pm_ptr": "*fp32", "ps_ptr": "*fp32", "tl_ptr": "*fp32", "N": 2048, "V": v, "H_DIM": h,
               "V_PER_SPLIT": 256 * 16, "stride_hn": h, "stride_hh": 1, "stride_wv": h, "stride_wh": 1,
               "stride_ln": v, "stride_pn": 33}
    for store in (True, False):
        for cfg in tf._logits_lse_kernel.configs:
            c = _compile(tf._logits_lse_kernel, lse_sig,
                         dict(HAS_BIAS=False, STORE_LOGITS=store, UPCAST=False, DOT_PRECISION="tf32", EVEN_H=True,
                              **cfg.kwargs), cfg.num_warps, cfg.num_stages)
            out.append({"kernel": "_logits_lse_kernel", "variant": "eager (stores logits)" if store else
                        "recompute forward / eval", "config": cfg, **_usage(c)})
    rc_sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "t_ptr": "*i64", "lse_ptr": "*fp32",
              "go_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "dh_lock_ptr": "*i32",
              "dw_lock_ptr": "*i32", "N": n, "V": v, "H_DIM": h, "stride_hn": h, "stride_hh": 1,
              "stride_wv": h, "stride_wh": 1, "stride_dhn": h, "stride_dwv": h}
    for locked in (False, True):
        sig = {**rc_sig, **({"dh_ptr": "*bf16", "dw_ptr": "*bf16"} if locked else {})}
        for cfg in tf._recompute_grad_kernel.configs:
            c = _compile(tf._recompute_grad_kernel, sig,
                         dict(HAS_BIAS=False, NEED_DH=True, NEED_DW=True, NEED_DB=False, LOCKED=locked, UPCAST=False,
                              DOT_PRECISION="tf32", EVEN_H=True, GROUP_N=8, **cfg.kwargs),
                         cfg.num_warps, cfg.num_stages)
            out.append({"kernel": "_recompute_grad_kernel", "variant": "bf16 accumulators, tile locks" if locked
                        else "fp32 accumulators, atomics", "config": cfg, **_usage(c)})
    gg_sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "t_ptr": "*i64", "lse_ptr": "*fp32",
              "scale_ptr": "*fp32", "g_ptr": "*bf16", "N": n, "VC": 25600, "H_DIM": h, "V0": 25600,
              "stride_hn": h, "stride_hh": 1, "stride_wv": h, "stride_wh": 1, "stride_gn": 25600}
    for cfg in tf._grad_gemm_kernel.configs:  # the first chunk of the GPU shape's column plan
        c = _compile(tf._grad_gemm_kernel, gg_sig,
                     dict(HAS_BIAS=False, UPCAST=False, DOT_PRECISION="tf32", EVEN_H=True, GROUP_N=8, **cfg.kwargs),
                     cfg.num_warps, cfg.num_stages)
        out.append({"kernel": "_grad_gemm_kernel", "variant": "recompute backward (softmax - onehot epilogue)",
                    "config": cfg, **_usage(c)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--md", default=str(HERE / "triton_resources.md"))
    args = ap.parse_args(argv)
    import triton

    from _env import command_line, git_sha, machine

    table = rows()
    head = ["# Triton kernels: resources for sm_90, compiled offline", "",
            f"Generated by `benchmarks/triton_resources.py`, one section per Triton version (the GPU image's may "
            f"differ from a CPU machine's), newest first. Specialised as the JIT would at N, H, V = {SHAPE} (eager "
            "chunks of 2048 rows), bf16, contiguous, aligned, no bias. *stack* = bytes of local memory per thread "
            "(register spills); a config with spills is slower on the GPU, how much only a GPU run says.", ""]
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"## triton {triton.__version__}", "",
             f"{machine()} (no GPU), git {git_sha()}, {when}, `{command_line()}`.", "",
             "| kernel | variant | BLOCK_N×V×H | warps | stages | registers | stack B | local stores | shared KiB | wgmma |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        k = r["config"].kwargs
        lines.append(f"| `{r['kernel']}` | {r['variant']} | {k['BLOCK_N']}×{k['BLOCK_V']}×{k['BLOCK_H']} | "
                     f"{r['config'].num_warps} | {r['config'].num_stages} | {r['regs']} | {r['stack']} | "
                     f"{r['local_stores']} | {r['shared_kib']:.0f} | {r['wgmma']} |")
    md = Path(args.md)
    # keep the sections of other Triton versions (the text from one "## triton" heading to the next)
    old = md.read_text().split("\n## triton ")[1:] if md.is_file() else []
    kept = [f"## triton {sec.rstrip()}" for sec in old if sec.split("\n", 1)[0].strip() != triton.__version__]
    tmp = Path(args.md + ".tmp")
    tmp.write_text("\n".join(head + lines) + "\n" + "".join(f"\n{sec}\n" for sec in kept))
    tmp.replace(md)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
