#!/usr/bin/env bash
# The test command: installs what is missing (scripts/bootstrap.sh), then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `... tests/test_gradients.py`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its CPU ops once per environment: the cache lives in the venv, so two environments
# on one machine never rebuild each other's ops (the build uses -march=native: never share it across machines).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${MEFT_VENV:-$ROOT/.venv}/torch_extensions}"
exec "${MEFT_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
