"""dual_head_loss, torch and reference paths: values and every gradient vs a float64 truth."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clsgen_dist.ops import dual_head, dual_head_loss
from clsgen_dist.ops import chunked, recompute
from clsgen_dist.ops.chunked import TorchChunkBackend

from ._util import (
    CASES,
    CASES_BY_NAME,
    TOL,
    Case,
    assert_no_worse_than_torch,
    bf16_runs,
    compare,
    make_inputs,
    reference_f64,
    run_op,
)

ROOT = Path(__file__).resolve().parents[2]


def _args(inp: dict) -> list:
    """The op's positional arguments from ``make_inputs``' dict."""
    return [inp[k] for k in ("hidden", "lm_weight", "targets", "cls_weight", "cls_bias", "cls_index", "cls_labels")]


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32_matches_float64(case: Case, impl: str, seed: int):
    inp = make_inputs(case, dtype=torch.float32, device="cpu", seed=seed)
    out = run_op(inp, impl=impl, chunk_size=case.chunk_size, accum_dtype=case.accum_dtype)
    compare(out, reference_f64(inp), **TOL[torch.float32], name=f"{impl}/{case.name}/seed={seed}")


def _many_chunks(monkeypatch, max_ratio: int | None = None) -> None:
    """grad_mode="recompute" at test sizes: no tail temporary until d W's free rows run out, so the
    backward walks many vocabulary chunks with their scratch inside d W, then a tail."""
    monkeypatch.setattr(recompute, "TAIL_BYTES", 0)
    monkeypatch.setattr(recompute, "MIN_COLS", 1)
    if max_ratio is not None:
        monkeypatch.setattr(recompute, "MAX_RATIO", max_ratio)


@pytest.mark.parametrize("schedule", ["many_chunks", "row_blocks", "default"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_recompute_fp32_matches_float64(case: Case, schedule: str, seed: int, monkeypatch):
    """grad_mode="recompute" on the torch path: many vocabulary chunks (scratch in d W), rows in
    blocks with d W accumulated over them (r capped at 1), or the default (at these sizes, all of
    it one tail temporary)."""
    if schedule != "default":
        _many_chunks(monkeypatch, max_ratio=1 if schedule == "row_blocks" else None)
    inp = make_inputs(case, dtype=torch.float32, device="cpu", seed=seed)
    out = run_op(inp, impl="torch", grad_mode="recompute", chunk_size=case.chunk_size, accum_dtype=case.accum_dtype)
    compare(out, reference_f64(inp), **TOL[torch.float32], name=f"recompute-{schedule}/{case.name}/seed={seed}")


def test_recompute_plan_covers_the_vocabulary_once():
    """The column chunks tile [0, V) in order; every scratch lies past its chunk's rows and inside
    d W; they shrink; the tail is the only temporary and stays small."""
    for rows, vocab, hdim, gb, wb in [(16384, 128256, 4096, 2, 2), (4096, 49152, 576, 4, 4), (300, 3000, 20, 4, 2),
                                      (1, 10, 3, 4, 4), (5000, 100, 8, 4, 4)]:
        plan = recompute.column_plan(rows, vocab, hdim, gb, wb)
        assert plan[0][0] == 0 and plan[-1][1] == vocab and plan[-1][2] is None
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        assert all(v0 < v1 for v0, v1, _ in plan)
        for v0, v1, off in plan[:-1]:
            assert off % recompute.ALIGN == 0 and off >= v1 * hdim * wb
            assert off + rows * (v1 - v0) * gb <= vocab * hdim * wb
        widths = [v1 - v0 for v0, v1, _ in plan[:-1]]
        assert widths == sorted(widths, reverse=True)
        tail = plan[-1][1] - plan[-1][0]
        assert rows * tail * gb <= max(recompute.TAIL_BYTES, rows * recompute.MIN_COLS * (1 + rows * gb / (hdim * wb)) * gb)
    # with an fp32 accumulator of d W[v0:v1] after each scratch (rows in blocks, bf16 d W)
    for rows, vocab, hdim in [(16384, 151936, 896), (300, 3000, 20), (7, 50, 3)]:
        plan = recompute.column_plan(rows, vocab, hdim, 2, 2, col_bytes=hdim * 4)
        assert plan[-1][1] == vocab and all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        for v0, v1, off in plan[:-1]:
            acc = recompute._align(off + rows * (v1 - v0) * 2)
            assert off >= v1 * hdim * 2 and acc + (v1 - v0) * hdim * 4 <= vocab * hdim * 2
    big = recompute.column_plan(16384, 128256, 4096, 2, 2)  # the GPU benchmark shape
    assert len(big) < 50 and 16384 * (big[-1][1] - big[-1][0]) * 2 <= 2**20 + 2**19


@pytest.mark.parametrize("accum", [torch.float32, torch.bfloat16])
def test_recompute_row_blocks_sum_d_weight_in_accum_dtype(accum: torch.dtype, seed: int, monkeypatch):
    """Rows in many blocks (r capped at 1) with a bf16 weight: with fp32 accumulation d W is summed
    over the blocks in an fp32 accumulator inside d W's free rows and rounded once (error ~ one bf16
    rounding of the truth); summed in bf16 itself, the 75 block roundings show."""
    _many_chunks(monkeypatch, max_ratio=1)
    case = Case("blocks", N=600, H=16, V=301, M=0, ignore_frac=0.0)
    inp = make_inputs(case, dtype=torch.bfloat16, device="cpu", seed=seed)
    out = run_op(inp, impl="torch", grad_mode="recompute", accum_dtype=accum)
    truth = reference_f64(inp)["lm_weight"]
    err = float((out["lm_weight"].double() - truth).norm() / truth.norm())
    once = float((truth.bfloat16().double() - truth).norm() / truth.norm())  # one rounding
    assert out["lm_weight"].dtype == torch.bfloat16
    if accum == torch.float32:
        assert err <= 1.5 * once + 1e-6, (err, once)
    else:
        assert err > 2 * once, (err, once)  # the control: the accumulator is what keeps it to one rounding


def test_recompute_scratch_lives_in_the_weight_gradient(seed: int, monkeypatch):
    """The recompute backward's [rows, columns] scratch is d W's own storage (the tensor that ends
    up in ``lm_weight.grad``), and nothing else it allocates comes near its size: a separately
    allocated scratch for the first chunk alone would be ~4x the largest allowed allocation."""
    monkeypatch.setattr(recompute, "TAIL_BYTES", 4096)
    case = Case("scratch", N=512, H=64, V=4099, M=3, ignore_frac=0.25, bias=True)
    inp = make_inputs(case, dtype=torch.float32, device="cpu", seed=seed)
    scratches = []
    real = recompute._scratch

    def spy(dw, offset, shape, dtype):
        t = real(dw, offset, shape, dtype)
        scratches.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    monkeypatch.setattr(recompute, "_scratch", spy)
    x = {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
             and k != "cls_labels" else v) for k, v in inp.items()}
    lm = dual_head_loss(*_args(x), lm_bias=x["lm_bias"], impl="torch", grad_mode="recompute", chunk_size=8)[0]
    rec = _StorageRecorder()
    with rec:
        (0.37 * lm).backward()
    n = int((inp["targets"] != -100).sum())
    plan = recompute.column_plan(n, case.V, case.H, 4, 4)
    assert len(scratches) == len(plan) - 1 >= 5
    assert {p for p, _ in scratches} == {x["lm_weight"].grad.untyped_storage().data_ptr()}
    assert sum(k for _, k in scratches) == n * plan[-1][0]  # every column but the tail's, every row
    first = n * (plan[0][1] - plan[0][0]) * 4
    known = {x[k].untyped_storage().data_ptr() for k in ("lm_weight", "hidden")}  # views of the inputs
    known |= {x[k].grad.untyped_storage().data_ptr() for k in ("lm_weight", "hidden")}  # the gradients
    others = {p: b for p, b in rec.storages.items() if p not in known}
    assert max(others.values()) * 4 <= first, sorted(others.values())[-5:]
    truth = _lm_only_grads(inp)
    for k in ("lm_weight", "hidden", "lm_bias"):  # and the values are right
        torch.testing.assert_close(x[k].grad.double() / 0.37, truth[k], rtol=1e-4, atol=2e-5)


def _lm_only_grads(inp: dict) -> dict:
    """float64 gradients of the summed LM loss alone."""
    h = inp["hidden"].detach().double().requires_grad_()
    w = inp["lm_weight"].detach().double().requires_grad_()
    b = inp["lm_bias"].detach().double().requires_grad_()
    keep = inp["targets"] != -100
    z = h[keep] @ w.t() + b
    torch.nn.functional.cross_entropy(z, inp["targets"][keep], reduction="sum").backward()
    return {"hidden": h.grad, "lm_weight": w.grad, "lm_bias": b.grad}


class _StorageRecorder(TorchDispatchMode):
    """Bytes of every storage an aten op returns (by data pointer): what a region allocated."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel():
                st = t.untyped_storage()
                self.storages[st.data_ptr()] = max(self.storages.get(st.data_ptr(), 0), st.nbytes())
        return out


@pytest.mark.parametrize("grad_mode", ["eager", "recompute"])
@pytest.mark.parametrize("mode", ["fp32", "mixed"])
@pytest.mark.parametrize("case", [CASES_BY_NAME["basic"], CASES_BY_NAME["everything"]], ids=lambda c: c.name)
def test_bf16_no_worse_than_plain_torch(case: Case, mode: str, grad_mode: str, seed: int, monkeypatch):
    """The torch path in bf16, in both of its modes: fp32 (what CPU runs) and mixed (what CUDA runs
    when Triton is missing: 16-bit GEMMs with fp32 output, a 16-bit ``softmax - onehot`` buffer),
    forced here on CPU."""
    if mode == "mixed":
        backend = TorchChunkBackend(mixed=True)
        w = torch.zeros(4, 4, dtype=torch.bfloat16)
        assert backend.compute_dtype(w) == torch.bfloat16 and backend.prepare_weight(w) is w  # no fp32 copy
        monkeypatch.setattr(dual_head, "_backend", lambda impl, device: backend)
        # chunks of 16 rows, each computed in fp32 sub-blocks of 8 (and a partial last one)
        monkeypatch.setattr(chunked, "TORCH_CHUNK_BYTES", 8 * 4 * case.V)
    if grad_mode == "recompute":
        _many_chunks(monkeypatch)
    name = f"torch-{mode}-{grad_mode}-bf16/{case.name}/seed={seed}"
    runs = bf16_runs(case, device="cpu", seed=seed, impl="torch", grad_mode=grad_mode)
    for i, (ours, _, truth) in enumerate(runs):
        compare(ours, truth, **TOL[torch.bfloat16], name=f"{name}+{i}")
        assert ours["hidden"].dtype == ours["lm_weight"].dtype == torch.bfloat16
    assert_no_worse_than_torch(runs, name=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA, where impl=torch picks the mixed mode on its own "
                    "(test_bf16_no_worse_than_plain_torch forces that mode on CPU)")
@pytest.mark.parametrize("case", [CASES_BY_NAME["basic"], CASES_BY_NAME["everything"]], ids=lambda c: c.name)
def test_torch_path_on_cuda_is_mixed_and_no_worse_than_plain_torch(case: Case, seed: int):
    """impl='torch' on CUDA (the fallback without Triton) keeps a bf16 weight bf16 (no fp32 copy) and
    computes the GEMMs with fp32 output, to the same accuracy as plain torch."""
    w = torch.zeros(4, 4, dtype=torch.bfloat16, device="cuda")
    assert TorchChunkBackend().compute_dtype(w) == torch.bfloat16 and TorchChunkBackend().prepare_weight(w) is w
    name = f"torch-cuda-bf16/{case.name}/seed={seed}"
    runs = bf16_runs(case, device="cuda", seed=seed, impl="torch")
    for i, (ours, _, truth) in enumerate(runs):
        compare(ours, truth, **TOL[torch.bfloat16], name=f"{name}+{i}")
    assert_no_worse_than_torch(runs, name=name)


def test_all_ignored_gives_zero_loss_and_zero_grads(seed: int):
    inp = make_inputs(Case("x", ignore_frac=1.0, bias=True), dtype=torch.float32, device="cpu", seed=seed)
    out = run_op(inp, impl="torch")
    assert out["lm_loss_sum"].item() == 0.0 and out["n_lm_targets"].item() == 0
    assert out["lm_weight"].abs().max().item() == 0.0 and out["lm_bias"].abs().max().item() == 0.0


def test_no_grad_mode_returns_loss_only(seed: int):
    inp = make_inputs(Case("x", bias=True), dtype=torch.float32, device="cpu", seed=seed)
    with torch.no_grad():
        lm, n, cls, logits = dual_head_loss(
            inp["hidden"], inp["lm_weight"], inp["targets"], inp["cls_weight"], inp["cls_bias"], inp["cls_index"],
            inp["cls_labels"], lm_bias=inp["lm_bias"], impl="torch", chunk_size=7,
        )  # fmt: skip
    assert not lm.requires_grad
    truth = reference_f64(inp)
    torch.testing.assert_close(lm.double(), truth["lm_loss_sum"], rtol=1e-5, atol=1e-4)


def test_backward_twice_is_refused(seed: int):
    inp = make_inputs(Case("x"), dtype=torch.float32, device="cpu", seed=seed)
    lm = dual_head_loss(*_args(inp), impl="torch")[0]
    lm.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only run once"):
        lm.backward()


class _OpRecorder(TorchDispatchMode):
    """Largest output of any aten op, and the row counts that reach a matmul with the LM weight."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.max_numel, self.mm_rows, self.outputs = vocab, 0, [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                self.outputs.add((tuple(t.shape), t.dtype))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if func.overloadpacket is torch.ops.aten.mm else (args[1], args[2])
            if b.dim() == 2 and b.shape[1] == self.vocab:  # hidden @ W.T
                self.mm_rows.append(a.shape[0])
        return out


def test_peak_memory_never_holds_n_by_v_logits(seed: int):
    # Large V, H << N so that the gradient buffers ([V, H], [n, H]) are far below N x V.
    case = Case("mem", N=512, H=16, V=4099, M=3, ignore_frac=0.25, bias=True)
    inp = make_inputs(case, dtype=torch.float32, device="cpu", seed=seed)
    n_valid = int((inp["targets"] != -100).sum())
    rec = _OpRecorder(case.V)
    with rec:
        out = run_op(inp, impl="torch", chunk_size=32)
    assert rec.max_numel <= max(32 * case.V, case.V * case.H, case.N * case.H), rec.max_numel
    assert rec.max_numel < case.N * case.V // 4
    # ignored rows are dropped before the matmul with the LM weight
    assert rec.mm_rows and max(rec.mm_rows) <= 32 and sum(rec.mm_rows) == n_valid
    compare(out, reference_f64(inp), **TOL[torch.float32], name=f"mem/seed={seed}")
    # the reference does materialise [N, V]: the recorder would catch a regression
    ref = _OpRecorder(case.V)
    with ref:
        run_op(inp, impl="reference")
    assert ref.max_numel >= case.N * case.V


def test_bf16_accumulation_holds_d_hidden_in_bf16(seed: int):
    """accum_dtype=bf16 with bf16 inputs: no fp32 [n, H] d-hidden buffer (the fp32 default has one),
    and d hidden stays within about one bf16 rounding of the fp32-held one, and close to the truth."""
    case = Case("acc16", N=200, H=24, V=301, M=4, ignore_frac=0.2, bias=True)
    inp = make_inputs(case, dtype=torch.bfloat16, device="cpu", seed=seed)
    rows = (int((inp["targets"] != -100).sum()), case.H)
    runs = {}
    for acc in (torch.float32, torch.bfloat16):
        rec = _OpRecorder(case.V)
        with rec:
            runs[acc] = run_op(inp, impl="torch", chunk_size=32, accum_dtype=acc)
        runs[acc]["fp32_dh_buffer"] = (rows, torch.float32) in rec.outputs
    assert runs[torch.float32]["fp32_dh_buffer"] and not runs[torch.bfloat16]["fp32_dh_buffer"]
    a, b = runs[torch.bfloat16]["hidden"].double(), runs[torch.float32]["hidden"].double()
    assert float((a - b).norm() / b.norm()) <= 2**-8
    compare(runs[torch.bfloat16], reference_f64(inp), **TOL[torch.bfloat16], name=f"acc16/seed={seed}")


def test_default_chunk_respects_budget():
    from clsgen_dist.ops.chunked import TORCH_CHUNK_BYTES, TorchChunkBackend

    w = torch.empty(0)
    for n, v in [(4096, 49152), (16384, 128256), (10, 123), (100000, 32000)]:
        rows = TorchChunkBackend().default_chunk_rows(n, v, w)
        assert 1 <= rows <= n and (rows * v * 4 <= TORCH_CHUNK_BYTES or rows <= 8)


def test_auto_resolves_once_and_logs(monkeypatch, caplog, seed: int):
    monkeypatch.setattr(dual_head, "_resolved", {})
    inp = make_inputs(Case("x"), dtype=torch.float32, device="cpu", seed=seed)
    with caplog.at_level(logging.INFO, logger="clsgen_dist.ops"):
        for _ in range(2):
            run_op(inp, impl="auto")
    msgs = [r.getMessage() for r in caplog.records if r.name == "clsgen_dist.ops"]
    assert msgs == ["dual_head_loss: impl=torch (cpu)"]
    with pytest.raises(ValueError, match="impl='nope'"):
        dual_head.resolve_impl("nope", torch.device("cpu"))


def test_import_and_cpu_path_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
        "import torch; from clsgen_dist.ops import dual_head_loss\n"
        "h = torch.randn(6, 4, requires_grad=True); w = torch.randn(9, 4, requires_grad=True)\n"
        "t = torch.tensor([1, -100, 3, 8, 0, -100]); i = torch.tensor([2])\n"
        "lm, n, c, z = dual_head_loss(h, w, t, torch.randn(1, 4), torch.zeros(1), i, torch.ones(1))\n"
        "(lm + c).backward(); assert int(n) == 4 and h.grad is not None\n"
        "assert 'clsgen_dist.ops.triton_fused' not in sys.modules\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


def test_input_validation():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="targets must be int64"):
        dual_head_loss(h, w, torch.zeros(4, dtype=torch.int32), torch.randn(1, 3), torch.zeros(1),
                       torch.zeros(0, dtype=torch.long), torch.zeros(0), impl="torch")  # fmt: skip


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch, seed: int):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = make_inputs(Case("x"), dtype=torch.float32, device="cpu", seed=seed)
    with pytest.raises(ValueError, match="needs CUDA"):
        run_op(inp, impl="triton")


@pytest.mark.parametrize("frozen", ["no_grad", "nothing_trains"])
def test_bf16_weight_without_gradients(frozen: str, seed: int):
    """Evaluation (no_grad) or everything frozen with a bf16 LM weight: the loss-only path upcasts
    the weight like the gradient path does (it fed the bf16 weight to an fp32 matmul)."""
    inp = make_inputs(Case("x", bias=True), dtype=torch.bfloat16, device="cpu", seed=seed)
    truth = reference_f64(inp)["lm_loss_sum"]
    inp = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inp.items()}
    with torch.no_grad() if frozen == "no_grad" else torch.enable_grad():
        lm = dual_head_loss(*_args(inp), lm_bias=inp["lm_bias"], impl="torch")[0]
    torch.testing.assert_close(lm.double(), truth, rtol=1e-4, atol=1e-3)  # fp32 compute on the bf16 values


def test_no_grad_chunk_size_bounds_the_buffer(monkeypatch, seed: int):
    """``chunk_size`` bounds the ``[chunk, V]`` buffer without gradients too."""
    from clsgen_dist.ops.chunked import TorchChunkBackend

    rows, grads = [], []
    lse_and_grad = TorchChunkBackend._lse_and_grad

    def spy(logits, targets, need_grad):
        rows.append(logits.shape[0])  # the [chunk, V] fp32 buffer
        grads.append(need_grad)
        return lse_and_grad(logits, targets, need_grad)

    monkeypatch.setattr(TorchChunkBackend, "_lse_and_grad", staticmethod(spy))
    inp = make_inputs(Case("x", N=23, ignore_frac=0.0), dtype=torch.float32, device="cpu", seed=seed)
    with torch.no_grad():
        dual_head_loss(*_args(inp), impl="torch", chunk_size=5)
    assert rows == [5, 5, 5, 5, 3] and not any(grads)  # and no gradient work without grad mode


@pytest.mark.parametrize("grad_mode", ["eager", "recompute"])
def test_mixed_forward_without_a_chunk_buffer_stays_in_the_fp32_budget(grad_mode: str, monkeypatch, seed: int):
    """The mixed mode (16-bit weight on CUDA without Triton) has no 16-bit ``[chunk, V]`` buffer
    when the forward makes no gradients (evaluation; and the recompute forward, which keeps only
    the log-sum-exp): its fp32 logits scratch is then TORCH_CHUNK_BYTES worth of rows at a time, as
    in the gradient path's sub-blocks -- not ``chunk_size`` rows in fp32, twice the bytes of the
    eager path's 16-bit chunk buffer (0.5 GiB at the default 1024 rows and a 128k vocabulary)."""
    backend = TorchChunkBackend(mixed=True)
    monkeypatch.setattr(dual_head, "_backend", lambda impl, device: backend)
    case = Case("x", N=64, ignore_frac=0.0)
    monkeypatch.setattr(chunked, "TORCH_CHUNK_BYTES", 8 * 4 * case.V)  # fp32 sub-blocks of 8 rows
    rows = []
    lse_and_grad = TorchChunkBackend._lse_and_grad

    def spy(logits, targets, need_grad):
        rows.append(logits.shape[0])  # the fp32 logits scratch
        return lse_and_grad(logits, targets, need_grad)

    monkeypatch.setattr(TorchChunkBackend, "_lse_and_grad", staticmethod(spy))
    inp = make_inputs(case, dtype=torch.bfloat16, device="cpu", seed=seed)
    truth = reference_f64(inp)["lm_loss_sum"]
    with torch.no_grad() if grad_mode == "eager" else torch.enable_grad():
        lm = dual_head_loss(*_args(inp), impl="torch", grad_mode=grad_mode, chunk_size=32)[0]
    assert rows and max(rows) <= 8 and sum(rows) == case.N, rows
    torch.testing.assert_close(lm.double(), truth, rtol=1e-4, atol=1e-3)
    if grad_mode == "recompute":
        lm.backward()
        assert inp["lm_weight"].grad is not None


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_bad_targets_and_labels_are_refused(impl: str, seed: int):
    """A target outside [0, V) (other than -100) or a label other than 0/1 is a ValueError naming
    it; on CUDA an out-of-range gather is a device-side assert, and the Triton kernel would return a
    wrong loss without complaint."""
    inp = make_inputs(Case("x", N=9, V=40, M=3, ignore_frac=0.3), dtype=torch.float32, device="cpu", seed=seed)
    for bad, needle in [(40, "outside [0, 40)"), (-1, "outside [0, 40)"), (-7, "first at row 4: -7")]:
        t = inp["targets"].clone()
        t[4] = bad
        with pytest.raises(ValueError, match=re.escape(needle)):
            dual_head_loss(inp["hidden"], inp["lm_weight"], t, *_args(inp)[3:], impl=impl)
    labels = torch.tensor([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match=r"cls_labels must be 0 or 1, got 2.0 at position 1"):
        dual_head_loss(*_args(inp)[:6], labels, impl=impl)


def test_accum_dtype_must_be_floating(seed: int):
    inp = make_inputs(Case("x"), dtype=torch.float32, device="cpu", seed=seed)
    with pytest.raises(ValueError, match="accum_dtype=torch.int64"):
        dual_head_loss(*_args(inp), impl="torch", accum_dtype=torch.int64)


def test_double_backward_is_refused(seed: int):
    """The gradients are made in the forward (eager) or by a kernel: no second-order graph. Asking
    for one raises instead of silently dropping the LM loss's second-order term."""
    inp = make_inputs(Case("x"), dtype=torch.float32, device="cpu", seed=seed)
    lm = dual_head_loss(*_args(inp), impl="torch")[0]
    scale = torch.tensor(3.0, requires_grad=True)  # the upstream gradient is part of the graph
    (g,) = torch.autograd.grad(scale * lm, inp["hidden"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        g.pow(2).sum().backward()


def test_mixed_dtypes_in_the_reference(seed: int):
    """bf16 hidden states with an fp32 weight (and the reverse) run on every CPU path."""
    inp = make_inputs(Case("x", bias=True), dtype=torch.float32, device="cpu", seed=seed)
    x = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inp.items()}
    x["hidden"] = x["hidden"].bfloat16()
    with torch.no_grad():
        out = [dual_head_loss(*_args(x), lm_bias=x["lm_bias"], impl=i)[0] for i in ("torch", "reference")]
    torch.testing.assert_close(out[0], out[1], rtol=1e-2, atol=1e-2)
