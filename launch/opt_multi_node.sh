#!/usr/bin/env bash
# deepspeed --hostfile launch/hostfile --master_addr "$MASTER_ADDR" --master_port 29500 launch/train.py --model_name_or_path facebook/opt-1.3b --lm --train_file "$TRAIN_FILE" --validation_file "$VALIDATION_FILE" --deepspeed zero3_bf16 --adapter_dim 64 --per_device_train_batch_size 8 --max_seq_length 512 --num_train_epochs 3 --learning_rate 5e-4 --warmup_ratio 0.06 --save_steps 500 --eval_steps 500 --output_dir output/opt-1.3b-meft --resume_from_checkpoint auto "$@"
#
# Multi-node OPT-1.3B causal-LM fine-tuning with MEFT under ZeRO-3, bf16, started by the deepspeed launcher
# over ssh on every host of launch/hostfile (copy launch/hostfile.example; lines "host slots=<gpus>").
# Needs passwordless ssh between hosts and this repo, its venv, the model and the data at the same paths on
# each (the run compares the hosts' copies at start and refuses differing ones). No shared filesystem is
# needed: each host commits its own ranks' checkpoint files on its own disk; the adapter export lands on the
# first host. Rerun the same command after a failure: --resume_from_checkpoint auto continues from the newest
# checkpoint complete on every host (a fresh start when there is none). A failure on any rank ends every rank
# (a hung one after --ddp_timeout, default 1800 s). MASTER_ADDR is the first host's address;
# TRAIN_FILE / VALIDATION_FILE are JSON lines {"prompt": ..., "answer": ...}.
# Tested (tests/test_multihost.py, two network namespaces on one machine, CPU): this launcher with --no_ssh
# on each host, a tiny OPT under ZeRO-3; not tested: the ssh (pdsh) path itself, GPUs, OPT-1.3B.
# Without ssh, run on host i: deepspeed --hostfile launch/hostfile --no_ssh --node_rank i --master_addr ...
# num_frozen_layers defaults to 24 // 3 = 8 frozen bottom layers for OPT; override with --num_frozen_layers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the first host of launch/hostfile}"
: "${TRAIN_FILE:?set TRAIN_FILE to a prompt/answer JSONL file}" "${VALIDATION_FILE:?set VALIDATION_FILE}"
deepspeed --hostfile launch/hostfile --master_addr "$MASTER_ADDR" --master_port 29500 launch/train.py --model_name_or_path facebook/opt-1.3b --lm --train_file "$TRAIN_FILE" --validation_file "$VALIDATION_FILE" --deepspeed zero3_bf16 --adapter_dim 64 --per_device_train_batch_size 8 --max_seq_length 512 --num_train_epochs 3 --learning_rate 5e-4 --warmup_ratio 0.06 --save_steps 500 --eval_steps 500 --output_dir output/opt-1.3b-meft --resume_from_checkpoint auto "$@"
