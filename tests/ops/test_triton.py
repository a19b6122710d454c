"""The Triton path: under the CPU interpreter (always) and natively on CUDA (when present)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ._triton_cases import (BF16_CASES, GRAD_MODES, LARGE, RECOMPUTE_MODES, SMALL, check_bf16, check_bf16_accum,
                            check_fp32, check_locked_fp32, check_masked_tile, check_model_recompute)

ROOT = Path(__file__).resolve().parents[2]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="native Triton needs CUDA")


def _interpreter_env() -> dict:
    triton = pytest.importorskip("triton")
    import numpy as np
    from packaging.version import Version

    if Version(triton.__version__) < Version("3.7") and Version(np.__version__) >= Version("2.4"):
        # Triton <= 3.6's interpreter turns loop bounds into 1-element arrays that numpy >= 2.4
        # refuses to convert to int (triton-lang/triton#9171, fixed upstream; 3.9 here works)
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not run under numpy {np.__version__}")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_triton_interpreter_matches_truth_torch_and_reference():
    """Every small case, fp32 and bf16, with TRITON_INTERPRET=1 in a fresh interpreter process."""
    env = _interpreter_env()
    script = Path(__file__).with_name("_triton_cases.py")
    p = subprocess.run(
        [sys.executable, str(script), "--device", "cpu"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    print(p.stdout[-20000:], p.stderr[-5000:])
    assert p.returncode == 0, "interpreter cases failed:\n" + "\n".join(
        line for line in p.stdout.splitlines() if not line.startswith("PASS")
    )[-8000:] + p.stderr[-3000:]
    n_bf16 = sum(c.name in BF16_CASES for c in SMALL)
    # per mode: fp32, bf16, masked tile; per recompute mode: bf16 accumulation, the model; the
    # locks; the recompute GEMM kernel's program groups
    expected = len(GRAD_MODES) * (len(SMALL) + n_bf16 + 1) + len(RECOMPUTE_MODES) * (n_bf16 + 1) + n_bf16 + 1
    assert p.stdout.count("PASS ") == expected


def test_recompute_under_partitioned_zero3_two_ranks():
    """grad_mode="recompute" with every parameter partitioned (the tied LM head an empty shard
    between forward and backward): each parameter's full gradient and its value after one AdamW
    step equal a single-process run of the materialised loss (see _recompute_zero3.py)."""
    from tests.integration._run import clean_env, free_port

    env = {**clean_env(), **{k: v for k, v in _interpreter_env().items() if k in ("TRITON_INTERPRET", "PYTHONPATH")}}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")  # CPU ranks on gloo, on a GPU machine too
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(Path(__file__).with_name("_recompute_zero3.py"))]  # `deepspeed` itself, found without PATH
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    line = next((x for x in out.splitlines() if "RECOMPUTE_ZERO3_OK" in x), None)
    assert line is not None and "ranks=2" in line, out[-4000:]
    print(line)
    # init_distributed unlinked the ranks' DeepSpeed shared-memory all-reduce segments (66 MiB each)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@cuda_only
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", SMALL + LARGE, ids=lambda c: c.name)
def test_triton_cuda_fp32(case, grad_mode, seed):
    check_fp32(case, "cuda", seed, grad_mode)


@cuda_only
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", [c for c in SMALL + LARGE if c.name in BF16_CASES], ids=lambda c: c.name)
def test_triton_cuda_bf16(case, grad_mode, seed):
    check_bf16(case, "cuda", seed, grad_mode)


@cuda_only
@pytest.mark.parametrize("grad_mode", RECOMPUTE_MODES)
@pytest.mark.parametrize("case", [c for c in SMALL + LARGE if c.name in BF16_CASES], ids=lambda c: c.name)
def test_triton_cuda_recompute_bf16_accumulation(case, grad_mode, seed):
    check_bf16_accum(case, "cuda", seed, grad_mode)


@cuda_only
@pytest.mark.parametrize("case", [c for c in SMALL + LARGE if c.name in BF16_CASES], ids=lambda c: c.name)
def test_triton_cuda_recompute_locks_lose_nothing(case, seed):
    """The spin-locked accumulation under real concurrency, at fp32 tolerances, three times."""
    check_locked_fp32(case, "cuda", seed, repeats=3)


@cuda_only
@pytest.mark.parametrize("grad_mode", RECOMPUTE_MODES)
def test_triton_cuda_recompute_memory_is_the_gradients(grad_mode):
    """The recompute modes with bf16 accumulation allocate (beyond their inputs) little more than
    the two gradients they return; the eager path also holds its [chunk, V] logits buffer."""
    from clsgen_dist.ops import dual_head_loss

    n, h, v = 4096, 1024, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g, dtype=torch.bfloat16) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    z = targets[:0]
    cw, cb = torch.zeros(1, h, device="cuda"), torch.zeros(1, device="cuda")
    grads = (n * h + v * h) * 2

    def peak(**kw):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        dual_head_loss(hidden, weight, targets, cw, cb, z, z, impl="triton", **kw)[0].backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(grad_mode=grad_mode, accum_dtype=torch.bfloat16)  # compile / autotune outside the measurement
    recompute = peak(grad_mode=grad_mode, accum_dtype=torch.bfloat16)
    eager = peak(grad_mode="eager", accum_dtype=torch.bfloat16, chunk_size=1024)
    print(f"peak beyond inputs: {grad_mode} {recompute / 2**20:.1f} MiB, eager {eager / 2**20:.1f} MiB, "
          f"gradients {grads / 2**20:.1f} MiB")
    assert recompute <= grads + 4 * 2**20
    assert eager >= grads + 1024 * v * 2  # + its [chunk, V] buffer


@cuda_only
@pytest.mark.parametrize("grad_mode", RECOMPUTE_MODES)
def test_triton_cuda_model_recompute(grad_mode, seed):
    check_model_recompute("cuda", seed, grad_mode)


@cuda_only
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_triton_cuda_masked_tile(grad_mode, seed):
    check_masked_tile("cuda", seed, grad_mode)


@cuda_only
def test_auto_picks_triton_on_cuda():
    from clsgen_dist.ops import resolve_impl

    assert resolve_impl("auto", torch.device("cuda")) == "triton"
