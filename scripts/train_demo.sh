#!/usr/bin/env bash
# The main job: installs what is missing (scripts/bootstrap.sh), then fine-tunes the real pretrained
# all-MiniLM-L6-v2 (offline) with MEFT1 on the SST-2 sample in data/sst2 under DeepSpeed ZeRO-2 on
# 2 ranks (bf16, CPU preset), evaluates on the full SST-2 dev set and prints its accuracy.
# Runs the command:
#   OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py --deepspeed cpu --bf16 \
#       --warmup_ratio 0.1 --output_dir output/sst2-meft --overwrite_output_dir
# Extra arguments are appended (e.g. --variant meft3, --max_steps 20).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
VENV="${MEFT_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${MEFT_VENV:-$ROOT/.venv}/torch_extensions}"
exec deepspeed --num_gpus 2 launch/train.py --deepspeed cpu --bf16 --warmup_ratio 0.1 \
    --output_dir output/sst2-meft --overwrite_output_dir "$@"
