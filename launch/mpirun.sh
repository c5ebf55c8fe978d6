#!/usr/bin/env bash
# mpirun -np 2 python launch/train.py --master_port 29600 --deepspeed cpu --bf16 --output_dir output/sst2-meft-mpi "$@"
#
# The same SST-2 MEFT run started by MPI (here MPICH from the `mpich` wheel, the venv's mpirun): ranks come
# from mpi4py, MASTER_ADDR is 127.0.0.1 on one host (rank 0's address across hosts), MASTER_PORT is
# --master_port. On a GPU machine use --deepspeed zero2_bf16 instead of `--deepspeed cpu --bf16`.
# Run it with the venv's bin/ first on PATH (its mpirun and python). Open MPI as root needs
# --allow-run-as-root; never mix one MPI's mpirun with an mpi4py built for another.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mpirun -np 2 python launch/train.py --master_port 29600 --deepspeed cpu --bf16 --output_dir output/sst2-meft-mpi "$@"
