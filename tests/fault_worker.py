"""launch/train.py with one fault injected into one rank, for the multi-host failure tests.

MEFT_TEST_FAULT=<kind>:<rank>:<step> makes rank <rank> fail at optimizer step <step> (1-based):
  raise         raises an exception while fetching its data (an error on one rank only)
  kill          SIGKILLs itself (a dead rank)
  stop          SIGSTOPs itself (a hung host: the process stays, nothing runs in it)
  kill_in_save  SIGKILLs itself while saving the checkpoint of that step, after writing its files and
                before committing them (the other hosts may already have committed theirs)
MEFT_TEST_FAULT_TIME_FILE, if set, receives time.time() just before the fault.
Without the variable it is launch/train.py unchanged.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _inject(kind: str, rank: int, step: int) -> None:
    from meft_ds.training import checkpoint, trainer

    if int(os.environ.get("RANK", "-1")) != rank:
        return

    def note_time():
        if os.environ.get("MEFT_TEST_FAULT_TIME_FILE"):
            Path(os.environ["MEFT_TEST_FAULT_TIME_FILE"]).write_text(f"{time.time()}\n")
    if kind == "kill_in_save":
        replace = checkpoint.os.replace

        def failing_replace(source, target):
            if Path(source).name == f".tmp-checkpoint-{step}":
                note_time()
                os.kill(os.getpid(), signal.SIGKILL)
            return replace(source, target)

        checkpoint.os.replace = failing_replace
        return
    micro_batch, calls = trainer.micro_batch, []

    def failing_micro_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:  # one micro-batch per step in these tests
            note_time()
            if kind == "raise":
                raise RuntimeError(f"injected data error at step {step}")
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[kind])
        return micro_batch(*args, **kwargs)

    trainer.micro_batch = failing_micro_batch


if __name__ == "__main__":
    fault = os.environ.get("MEFT_TEST_FAULT")
    if fault:
        kind, rank, step = fault.split(":")
        _inject(kind, int(rank), int(step))
    sys.argv[0] = str(REPO / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
