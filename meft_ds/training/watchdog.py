"""A watchdog process per rank that ends the rank once the rest of the job is gone.

A collective timeout (--ddp_timeout) ends every rank that waits for a peer. It cannot end the peer that
is stuck (a stalled filesystem, a wedged GPU, a stopped process): nothing runs in it any more. So each rank
starts a small separate process that asks the job's rendezvous store (the TCPStore that rank 0, or
torchrun's agent on the first node, serves at MASTER_ADDR:MASTER_PORT) every few seconds whether it is still
there, from its first connection on. When the store closes (its process exited after a failure) or does not
answer within the timeout (its process is the stuck one), the watchdog prints one line naming its rank and
host, gives the rank a few seconds to end by itself, then kills it with SIGKILL, so its launcher exits
non-zero too.

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


def start_watchdog(master_addr: str, master_port: int, rank: int, timeout_s: float, grace_s: float = GRACE_S) -> None:
    """Start this rank's watchdog (once per process)."""
    global _process
    if _process is not None:
        return
    package_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {package_root!r}); from meft_ds.training.watchdog import main; main()"
    _process = subprocess.Popen([sys.executable, "-c", code, master_addr, str(master_port), str(os.getpid()),
                                 str(rank), str(timeout_s), str(grace_s)], stdin=subprocess.DEVNULL)
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


def _stopped(pid: int) -> bool:
    """Whether `pid` is stopped (SIGSTOP or traced), from /proc (False where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _end_on_terminate(parent: int, rank: str) -> None:
    """SIGTERM: the rank stops its watchdog this way, and a launcher ending the whole process tree (the deepspeed
    launcher after another local rank failed) sends it to the rank and to this process alike. A stopped rank
    cannot act on its SIGTERM, and the launcher would wait 30 s before killing it: continue it, so the
    termination it was sent takes effect, and say which rank was the stopped one (it cannot say so itself)."""
    if _parent_alive(parent) and _stopped(parent):
        print(f"error: rank {rank} on {socket.gethostname()}: watchdog: this rank was stopped (SIGSTOP, a debugger) "
              "when its launcher ended the job; letting the launcher's SIGTERM end it", file=sys.stderr, flush=True)
        os.kill(parent, signal.SIGCONT)
    os._exit(0)


def _in_time(call, timeout_s: float):
    """(result, None), or (None, error): the call's error, or TimeoutError when it did not return within
    timeout_s. The store client's own timeout covers neither a connection to a server that accepts it and
    never answers the handshake nor a request such a server accepts: both block for good when the store's
    process is stopped, so every store call runs in a thread that is abandoned when it is late."""
    outcome: list = []

    def run():
        try:
            outcome.append((call(), None))
        except Exception as error:  # noqa: BLE001 - reported to the caller
            outcome.append((None, error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else (None, TimeoutError(f"no answer in {timeout_s:.0f} s"))


def main() -> None:
    import datetime

    from torch.distributed import TCPStore

    master_addr, master_port, parent, rank, timeout_s, grace_s = sys.argv[1:7]
    parent, timeout_s, grace_s = int(parent), float(timeout_s), float(grace_s)
    signal.signal(signal.SIGTERM, lambda *_: _end_on_terminate(parent, rank))
    # The first connection is checked like every request: the job can fail or hang before it is made (this
    # process needs a while to import torch on a busy host), and then this rank is the one to end.
    store, error = _in_time(lambda: TCPStore(master_addr, int(master_port), is_master=False, wait_for_workers=False,
                                             timeout=datetime.timedelta(seconds=timeout_s)), timeout_s)
    key = f"meft_ds/watchdog/{rank}"
    while error is None:
        if not _parent_alive(parent):
            os._exit(0)  # here and below: an abandoned store call may still block in its thread; do not wait
        _, error = _in_time(lambda: store.add(key, 1), timeout_s)
        if error is None:
            time.sleep(POLL_S)
    # Closed, refused or not answering: either way the job is over.
    if not _parent_alive(parent):
        os._exit(0)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: rank {rank} on {socket.gethostname()}: watchdog: the job's rendezvous store at "
          f"{master_addr}:{master_port} closed or stopped answering ({reason}); another rank failed "
          f"or hangs; ending this rank in {grace_s:.0f} s", file=sys.stderr, flush=True)
    deadline = time.monotonic() + grace_s
    while _parent_alive(parent) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _parent_alive(parent):
        os.kill(parent, signal.SIGKILL)
    os._exit(0)
