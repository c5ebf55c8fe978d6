"""A watchdog process per rank that ends the rank once the rest of the job is gone.

A collective timeout (--ddp_timeout) ends every rank that waits for a peer. It cannot end the peer that
is stuck (a stalled filesystem, a wedged GPU, a stopped process): nothing runs in it any more. So each rank
starts a small separate process that asks the job's rendezvous store (the TCPStore that rank 0, or
torchrun's agent on the first node, serves at MASTER_ADDR:MASTER_PORT) every few seconds whether it is still
there. When the store closes (its process exited after a failure) or does not answer within the timeout (its
process is the stuck one), the watchdog prints one line naming its rank and host, gives the rank a few
seconds to end by itself, then kills it with SIGKILL, so its launcher exits non-zero too.

The watchdog exits as soon as its rank does; a rank stops it (`stop_watchdog`) before its final barrier,
since rank 0 leaving at the end of a good run closes the store as well.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL_S = 2.0  # between store checks
GRACE_S = 10.0  # a live rank that saw the failure too ends itself with its own, better error line

_process: subprocess.Popen | None = None


def start_watchdog(master_addr: str, master_port: int, rank: int, timeout_s: float) -> None:
    """Start this rank's watchdog (once per process)."""
    global _process
    if _process is not None:
        return
    package_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {package_root!r}); from meft_ds.training.watchdog import main; main()"
    _process = subprocess.Popen([sys.executable, "-c", code, master_addr, str(master_port), str(os.getpid()),
                                 str(rank), str(timeout_s)], stdin=subprocess.DEVNULL)
    atexit.register(stop_watchdog)


def stop_watchdog() -> None:
    global _process
    if _process is not None:
        _process.terminate()
        try:
            _process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _process.kill()
        _process = None


def _parent_alive(parent: int) -> bool:
    return os.getppid() == parent


def _ask(store, key: str, timeout_s: float) -> Exception | None:
    """One round trip to the store; the error, or TimeoutError when no answer came within timeout_s (the
    client's own timeout does not cover a server that accepts the request and never answers)."""
    outcome: list = []

    def ask():
        try:
            store.add(key, 1)
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 - reported to the caller
            outcome.append(error)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else TimeoutError(f"no answer in {timeout_s:.0f} s")


def main() -> None:
    import datetime

    from torch.distributed import TCPStore

    master_addr, master_port, parent, rank, timeout_s = sys.argv[1:6]
    parent, timeout = int(parent), datetime.timedelta(seconds=float(timeout_s))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        store = TCPStore(master_addr, int(master_port), is_master=False, timeout=timeout, wait_for_workers=False)
    except Exception:  # noqa: BLE001 - the store is already gone: the rank sees that itself, nothing to watch
        return
    key = f"meft_ds/watchdog/{rank}"
    while _parent_alive(parent):
        error = _ask(store, key, float(timeout_s))
        if error is not None:  # closed or not answering: either way the job is over
            if not _parent_alive(parent):
                return
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"error: rank {rank} on {socket.gethostname()}: watchdog: the job's rendezvous store at "
                  f"{master_addr}:{master_port} closed or stopped answering ({reason}); another rank failed "
                  f"or hangs; ending this rank in {GRACE_S:.0f} s", file=sys.stderr, flush=True)
            deadline = time.monotonic() + GRACE_S
            while _parent_alive(parent) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _parent_alive(parent):
                os.kill(parent, signal.SIGKILL)
            return
        time.sleep(POLL_S)
