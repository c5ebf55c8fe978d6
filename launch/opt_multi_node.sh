#!/usr/bin/env bash
# deepspeed --hostfile launch/hostfile --master_addr "$MASTER_ADDR" --master_port 29500 launch/train.py --model_name_or_path facebook/opt-1.3b --lm --train_file "$TRAIN_FILE" --validation_file "$VALIDATION_FILE" --deepspeed zero3_bf16 --adapter_dim 64 --per_device_train_batch_size 8 --max_seq_length 512 --num_train_epochs 3 --learning_rate 5e-4 --warmup_ratio 0.06 --save_steps 500 --eval_steps 500 --output_dir output/opt-1.3b-meft "$@"
#
# Multi-node OPT-1.3B causal-LM fine-tuning with MEFT under ZeRO-3, bf16, started by the deepspeed launcher
# over ssh on every host of launch/hostfile (copy launch/hostfile.example; lines "host slots=<gpus>").
# Needs passwordless ssh between hosts, this repo and its venv at the same path on each, and a filesystem
# all ranks share for --output_dir (checkpoints are committed by rank 0). MASTER_ADDR is the first host's
# address; TRAIN_FILE / VALIDATION_FILE are JSON lines {"prompt": ..., "answer": ...}.
# num_frozen_layers defaults to 24 // 3 = 8 frozen bottom layers for OPT; override with --num_frozen_layers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the first host of launch/hostfile}"
: "${TRAIN_FILE:?set TRAIN_FILE to a prompt/answer JSONL file}" "${VALIDATION_FILE:?set VALIDATION_FILE}"
deepspeed --hostfile launch/hostfile --master_addr "$MASTER_ADDR" --master_port 29500 launch/train.py --model_name_or_path facebook/opt-1.3b --lm --train_file "$TRAIN_FILE" --validation_file "$VALIDATION_FILE" --deepspeed zero3_bf16 --adapter_dim 64 --per_device_train_batch_size 8 --max_seq_length 512 --num_train_epochs 3 --learning_rate 5e-4 --warmup_ratio 0.06 --save_steps 500 --eval_steps 500 --output_dir output/opt-1.3b-meft "$@"
