"""Triton path == float64 truth == torch path == reference: value and every gradient.

Used two ways by ``test_triton.py``:
  * on CPU, as a script in a subprocess with ``TRITON_INTERPRET=1`` (the flag must be set before
    Triton is imported):  ``TRITON_INTERPRET=1 python tests/ops/_triton_cases.py``
  * on CUDA, imported and parametrised natively (small cases + larger shapes).
"""

from __future__ import annotations

import sys
import time
import traceback

import torch

try:
    from . import _util as U
except ImportError:  # run as a script: tests/ops is sys.path[0]
    import _util as U

# Beyond the shared cases: tile-aligned shapes (the EVEN_H specialisation, full tiles) and, on CUDA,
# realistic sizes where autotuned configs, many vocabulary splits and several chunks are used.
SMALL = U.CASES + [U.Case("tile_aligned", N=64, H=64, V=256, M=4, ignore_frac=0.1)]
LARGE = [
    U.Case("large", N=2048, H=1024, V=32000, M=64, ignore_frac=0.2),
    U.Case("large_chunked_bias", N=1500, H=1024, V=32000, M=16, ignore_frac=0.5, bias=True, chunk_size=512,
           logit_scale=3.0),
]
BF16_CASES = ["basic", "everything", "tile_aligned", "large"]


def check_fp32(case: U.Case, device: str, seed: int) -> None:
    inp = U.make_inputs(case, dtype=torch.float32, device=device, seed=seed)
    kw = dict(chunk_size=case.chunk_size, accum_dtype=case.accum_dtype)
    name = f"triton-fp32/{case.name}/{device}/seed={seed}"
    tri = U.run_op(inp, impl="triton", **kw)
    U.compare(tri, U.reference_f64(inp), **U.TOL[torch.float32], name=name)
    U.compare(tri, U.run_op(inp, impl="torch", **kw), **U.TOL[torch.float32], name=name + " vs torch path")
    U.compare(tri, U.run_op(inp, impl="reference"), **U.TOL[torch.float32], name=name + " vs reference")


def check_bf16(case: U.Case, device: str, seed: int) -> None:
    name = f"triton-bf16/{case.name}/{device}/seed={seed}"
    runs = U.bf16_runs(case, device=device, seed=seed, draws=2 if case.N > 1000 else 4, impl="triton")
    for i, (ours, _, truth) in enumerate(runs):
        U.compare(ours, truth, **U.TOL[torch.bfloat16], name=f"{name}+{i}")
        assert ours["hidden"].dtype == ours["lm_weight"].dtype == torch.bfloat16, name
    U.assert_no_worse_than_torch(runs, name=name)


def all_checks(device: str, large: bool) -> list[tuple[str, object]]:
    cases = SMALL + (LARGE if large else [])
    checks = [(f"fp32/{c.name}", lambda c=c: check_fp32(c, device, U.new_seed())) for c in cases]
    bf16 = [c for c in cases if c.name in BF16_CASES]
    checks += [(f"bf16/{c.name}", lambda c=c: check_bf16(c, device, U.new_seed())) for c in bf16]
    return checks


def main() -> int:
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    failed = 0
    for name, fn in all_checks(device, large=device == "cuda"):
        t0 = time.time()
        try:
            fn()
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:  # report every case, then fail
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
