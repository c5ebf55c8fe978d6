"""Fine-tune a pretrained transformer with MEFT (or LoRA / full) under DeepSpeed.

The same script runs under every launcher (flags: --help; docs/training.md):

    python launch/train.py                                                        # 1 process, defaults
    deepspeed --num_gpus 2 launch/train.py --deepspeed zero2_bf16 --output_dir out   # one node
    deepspeed --hostfile hostfile launch/train.py --deepspeed zero3_bf16 ...        # many nodes
    torchrun --nproc_per_node 2 launch/train.py ...
    mpirun -np 2 python launch/train.py --master_port 29600 ...

Defaults: the offline all-MiniLM-L6-v2 BERT, the SST-2 sample in data/sst2, MEFT1 with r=8, 3 epochs.
"""

import sys

from meft_ds.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
