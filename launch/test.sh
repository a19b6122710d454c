#!/usr/bin/env bash
# Set up, then run the default test suite (CPU, ~13 minutes on 2 cores). Arguments go to pytest,
# e.g.  bash launch/test.sh -m slow   (the slow target)   or   bash launch/test.sh tests/data -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="${CLSGEN_VENV:-$PWD/.venv}/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/clsgen_dist/torch_extensions}
exec python -m pytest "$@"
