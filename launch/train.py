"""Fine-tune a pretrained transformer with MEFT (or LoRA / full) under DeepSpeed.

The same script runs under every launcher (flags: --help; docs/training.md):

    python launch/train.py                                                        # 1 process, defaults
    deepspeed --num_gpus 2 launch/train.py --deepspeed zero2_bf16 --output_dir out   # one node
    deepspeed --hostfile hostfile launch/train.py --deepspeed zero3_bf16 ...        # many nodes
    torchrun --nproc_per_node 2 launch/train.py ...
    mpirun -np 2 python launch/train.py --master_port 29600 ...

Defaults: the offline all-MiniLM-L6-v2 BERT, the SST-2 sample in data/sst2, MEFT1 with r=8, 3 epochs.
"""

import os
import sys
import traceback

from meft_ds.training import parse_args, setup, fit
from meft_ds.training.checkpoint import NonFiniteAdapterError
from meft_ds.training.distributed import shutdown, where
from meft_ds.training.trainer import NonFiniteError

INPUT_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


def main() -> int:
    args = parse_args()
    try:
        run = setup(args)
    except INPUT_ERRORS as error:
        # Bad input, found on every rank before anything was written: one line, no traceback.
        print(f"error: {error}", file=sys.stderr, flush=True)
        shutdown(synchronize=False)
        return 2
    except Exception as error:  # noqa: BLE001 - any other failure ends this rank, saying where
        _exit_on_failure(error)
    try:
        fit(run)
    except (NonFiniteError, NonFiniteAdapterError) as error:
        # Every rank decided the same from the same reduced values: one line, no traceback, nothing exported.
        print(f"error: {error}", file=sys.stderr, flush=True)
        shutdown(synchronize=False)
        return 3
    except Exception as error:  # noqa: BLE001
        _exit_on_failure(error)
    shutdown()
    return 0


def _exit_on_failure(error: Exception) -> None:
    """One line naming this rank and host first, then the traceback, then exit at once: waiting in
    teardown for ranks that may be gone would only delay the others, which see this rank's sockets close."""
    import torch.distributed as dist

    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    hint = ""
    if isinstance(error, dist.DistError) or any(name in message.lower() for name in ("gloo", "nccl")):
        hint = " (a collective failed: another rank probably failed or hangs; its own error line names it)"
    print(f"error: {where()}: {type(error).__name__}: {message}{hint}", file=sys.stderr, flush=True)
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
