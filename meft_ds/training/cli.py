"""The trainer's command line: `python -m meft_ds.train`, the `meft-train` console script and launch/train.py.

Exit status: 0 done; 2 bad input (one `error:` line, nothing written); 3 stopped on a non-finite loss or
adapter (one `error:` line, nothing exported); 1 any other failure (one line naming the rank and host,
then the traceback; the process exits at once).
"""

import os
import sys
import traceback

from .args import parse_args
from .checkpoint import NonFiniteAdapterError
from .distributed import shutdown, where
from .trainer import NonFiniteError, fit, setup

INPUT_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """Run the trainer with `argv` (default: the command line); the exit status: 0 done, 2 bad input (one
    `error:` line), 3 stopped on a non-finite loss or adapter; any other failure exits 1 at once."""
    args = parse_args(argv)
    try:
        run = setup(args)
    except INPUT_ERRORS as error:
        # Bad input, found on every rank before anything was written: one line, no traceback.
        print(f"error: {error}{_origin(error)}", file=sys.stderr, flush=True)
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


def _origin(error: Exception) -> str:
    """" (ValueError in deepspeed/ops/op_builder/builder.py, line 710)" when the error was raised outside meft_ds
    (a library's own check, not this package's input validation, whose messages say what to fix): without it such
    a one-line error would not say where to look. The path is relative to the package directory it is in."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    path = frames[-1].filename.replace(os.sep, "/")
    if "/meft_ds/" in path or "/launch/" in path:
        return ""
    short = path.rsplit("-packages/", 1)[-1] if "-packages/" in path else os.path.basename(path)
    return f" ({type(error).__name__} in {short}, line {frames[-1].lineno})"


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
