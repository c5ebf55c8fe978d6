#!/usr/bin/env bash
# deepspeed --num_gpus 2 launch/train.py --deepspeed zero2_bf16 --task_name sst2 --data_dir data/sst2 --output_dir output/sst2-meft "$@"
#
# Single-node GLUE: MEFT1 (r=8) on the offline all-MiniLM-L6-v2, SST-2 sample, ZeRO-2, bf16, 2 ranks.
# Runs on GPUs and on a CPU machine alike (on CPU, DeepSpeed compiles its fused Adam once, ~3 min, into
# TORCH_EXTENSIONS_DIR; `--deepspeed cpu --bf16` avoids that compile with torch's AdamW).
# Other tasks: --task_name rte --data_dir <GLUE RTE dir>; other GPUs: edit --num_gpus. Extra flags are
# appended, e.g. `bash launch/glue_single_node.sh --num_train_epochs 10 --learning_rate 5e-4`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per rank
deepspeed --num_gpus 2 launch/train.py --deepspeed zero2_bf16 --task_name sst2 --data_dir data/sst2 --output_dir output/sst2-meft "$@"
