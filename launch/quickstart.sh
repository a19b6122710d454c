#!/usr/bin/env bash
# Set up, then run the embedded default (SmolLM2-135M-Instruct on Rotten Tomatoes) under DeepSpeed.
# Extra arguments pass through as config overrides, e.g.  bash launch/quickstart.sh train.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="${CLSGEN_VENV:-$PWD/.venv}/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/clsgen_dist/torch_extensions}
exec deepspeed launch/train.py overwrite=true "$@"  # each quick start replaces the last one's outputs/default
