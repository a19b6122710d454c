#!/usr/bin/env bash
# GPU check of the fused dual-head loss, for one lent CUDA GPU (H200), offline. From the repo root:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [all|tests|bench]   # OUT defaults to outputs/gpu_check
#
# 1. pytest tests/ops natively on CUDA: Triton vs float64 truth, vs the torch path and the
#    reference, fp32 and bf16, small odd shapes and N=2048 H=1024 V=32000 (single Triton config:
#    CLSGEN_TRITON_AUTOTUNE=0, to keep compilation short). The two CPU-only tests of tests/ops (the
#    Triton interpreter, and 2 gloo ranks that would JIT-build DeepSpeed's CPU op here first) are
#    left to CI: device time is scarce.
# 1b. The torch_varlen attention path on CUDA (the real kernel against the CPU tests' reference, and
#    packed == alone), then benchmarks/packed_attention_bench.py (sdpa vs torch_varlen, 60 s cap);
#    a whole bf16 build with attn=auto checked on the device (tests/modeling/test_packing_check.py).
# 2. benchmarks/fused_loss_bench.py --device cuda: N in {8192, 16384}, H=4096, V=128256 bf16;
#    naive / torch / triton (eager: fp32 and bf16 accumulation, default and 512-row chunks;
#    recompute and recompute_tiles: fp32 and bf16 accumulation) / liger / cce + the matmul floor,
#    autotuned, each variant checked against naive at full size (BENCH_ARGS narrows it).
# Baselines come from wheels in .whl/ (liger-kernel, cut-cross-entropy; pure python, installed
# --no-deps so torch/triton stay as they are); missing wheels just skip those rows.
# Writes env.txt, pytest.log, bench.log, attention_bench.log, fused_loss_results.jsonl, fused_loss.md,
# packed_attention_results.jsonl, packed_attention.md to $OUT; copy the results and tables back to
# benchmarks/. Hard limits 4 min (tests) + 5.5 min (bench), or TEST_LIMIT + ATTN_LIMIT and
# BENCH_LIMIT seconds: benchmarks/gpu_session.sh runs both stages and the QLoRA check in one
# device call, within one time budget.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-outputs/gpu_check}
STAGE=${1:-all}
case "$STAGE" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench]" >&2; exit 2;; esac
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/clsgen_triton_cache}
unset TRITON_INTERPRET
T0=$SECONDS

source benchmarks/_wheels.sh
install_wheels "$OUT/pip.log" || echo "no wheels installed (see $OUT/pip.log): liger/cce rows will be skipped"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  python3 -c "import liger_kernel, cut_cross_entropy; print('liger + cce importable')" 2>&1 | tail -1
  git rev-parse --short HEAD 2>/dev/null || echo uncommitted
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

RC_TEST=0
RC_BENCH=0
if [ "$STAGE" != bench ]; then
echo "== pytest tests/ops (CUDA native) + torch_varlen attention on CUDA"
# The attention tests need only SmolLM2's tokenizer files, carried in outputs/gpu_assets/smol.
[ -d outputs/gpu_assets/smol ] && export CLSGEN_TEST_TOKENIZER="$PWD/outputs/gpu_assets/smol"
CLSGEN_TRITON_AUTOTUNE=0 timeout "${TEST_LIMIT:-200}" python3 -m pytest -q tests/ops \
  tests/modeling/test_attention.py::test_reference_matches_the_real_kernel \
  tests/modeling/test_packing_equivalence.py tests/modeling/test_packing_check.py \
  --deselect tests/ops/test_triton.py::test_triton_interpreter_matches_truth_torch_and_reference \
  --deselect tests/ops/test_triton.py::test_recompute_under_partitioned_zero3_two_ranks \
  -p no:cacheprovider -rs --durations=8 > "$OUT/pytest.log" 2>&1
RC_TEST=$?
tail -n 25 "$OUT/pytest.log"
echo "pytest rc=$RC_TEST ($((SECONDS - T0))s so far)"
echo "== packed attention benchmark (sdpa vs torch_varlen [vs flash-attn])"
[ -f benchmarks/packed_attention_results.jsonl ] && cp benchmarks/packed_attention_results.jsonl "$OUT/"
timeout "${ATTN_LIMIT:-60}" python3 benchmarks/packed_attention_bench.py --device cuda --jsonl "$OUT/packed_attention_results.jsonl" \
  --md "$OUT/packed_attention.md" > "$OUT/attention_bench.log" 2>&1 || echo "attention bench failed (see attention_bench.log)"
grep '^| ' "$OUT/attention_bench.log" | tail -n 8
fi

if [ "$STAGE" != tests ]; then
echo "== benchmark"
[ -f benchmarks/fused_loss_results.jsonl ] && cp benchmarks/fused_loss_results.jsonl "$OUT/"
# BENCH_ARGS: more flags, e.g. "--shape 16384,4096,128256 --variants naive,triton_recompute_bf16,liger,cce"
# shellcheck disable=SC2086  # word splitting of BENCH_ARGS is intended
timeout "${BENCH_LIMIT:-330}" python3 benchmarks/fused_loss_bench.py --device cuda --timeout 120 --rep-ms 500 \
  --jsonl "$OUT/fused_loss_results.jsonl" --md "$OUT/fused_loss.md" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
RC_BENCH=$?
if [ "$RC_BENCH" -ne 0 ]; then  # e.g. timed out: render what was appended so far
  python3 benchmarks/fused_loss_bench.py --render-only --jsonl "$OUT/fused_loss_results.jsonl" --md "$OUT/fused_loss.md" >> "$OUT/bench.log" 2>&1
fi
sed -n '/^## /,$p' "$OUT/bench.log"  # the tables of this run, printed last by the benchmark
echo "bench rc=$RC_BENCH"
fi

echo "== summary (total $((SECONDS - T0))s): tests rc=$RC_TEST, bench rc=$RC_BENCH; results in $OUT"
[ "$RC_TEST" -eq 0 ] && [ "$RC_BENCH" -eq 0 ]
