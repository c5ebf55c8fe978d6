"""Process-group setup that works the same under deepspeed, torchrun, mpirun and plain python.

deepspeed and torchrun export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. mpirun does not:
rank and size come from mpi4py here, and MASTER_ADDR is 127.0.0.1 when every rank is on one host (DeepSpeed's
own MPI discovery would take `hostname -I`, a network address) or rank 0's address otherwise. Plain python
is rank 0 of 1 on 127.0.0.1. MASTER_PORT, when not exported, is --master_port.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Variables that only exist in processes started by an MPI launcher (MPICH / Intel MPI, Open MPI).
MPI_MARKERS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
DEFAULT_TIMEOUT_S = 1800  # torch's default collective timeout (Hugging Face's --ddp_timeout default too)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi_environment() -> dict[str, str]:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    if node.Get_size() == world.Get_size():
        address = "127.0.0.1"
    else:  # rank 0's first network address, as DeepSpeed's own MPI discovery takes it (tests/test_multihost.py)
        mine = subprocess.check_output(["hostname", "-I"], text=True).split()[0] if world.Get_rank() == 0 else None
        address = world.bcast(mine, root=0)
    return {"RANK": str(world.Get_rank()), "WORLD_SIZE": str(world.Get_size()),
            "LOCAL_RANK": str(node.Get_rank()), "MASTER_ADDR": address}


def init_distributed(master_port: int, timeout_s: float | None = None) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (backend: the accelerator's, gloo on CPU) once.

    timeout_s: how long a collective waits for a rank that does not arrive before it raises (--ddp_timeout);
    None keeps torch's default (30 minutes). With more than one rank a watchdog process is started too
    (`meft_ds.training.watchdog`): it ends this rank when the job's rendezvous store goes away or stops
    answering, which is how a rank that is itself stuck learns that the others have given up.

    Safe to call again in the same process (tests run several trainings in one process group).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            found = _mpi_environment() if any(k in os.environ for k in MPI_MARKERS) else {
                "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
            for key, value in found.items():
                os.environ[key] = value
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(master_port))
        local_rank = int(os.environ["LOCAL_RANK"])
        if get_accelerator().device_name() != "cpu":
            get_accelerator().set_device(local_rank)
        options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(auto_mpi_discovery=False, **options)
        if dist.get_world_size() > 1:
            from .watchdog import start_watchdog

            start_watchdog(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), dist.get_rank(),
                           timeout_s or DEFAULT_TIMEOUT_S)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(synchronize: bool = True) -> None:
    """Barrier then destroy the group: without it a rank can abort at exit while another still talks.

    synchronize=False skips the barrier, for an exit on error where other ranks may not arrive. The
    watchdog stops first: rank 0's store goes away when rank 0 exits, which must not look like a failure.
    """
    from .watchdog import stop_watchdog

    stop_watchdog()
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def local_main_first(env: DistEnv):
    """Let local rank 0 run the body first (it fills the datasets cache), then the other ranks.

    Rank 0 reaches the barrier even when the body raises, so the others run it too and raise the same
    input error themselves instead of waiting for a rank that has left.
    """
    if env.local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if env.local_rank == 0:
            barrier()


def _device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()  # NCCL only moves accelerator tensors


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Each rank's `values` (same length on every rank), gathered on every rank."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.tolist() for t in gathered]


def all_reduce_mean(value: torch.Tensor) -> float:
    tensor = value.detach().to(device=_device(), dtype=torch.float64).clone()
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def all_gather_objects(value) -> list:
    """Each rank's picklable `value`, gathered on every rank (a list of one without a process group)."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def where() -> str:
    """'rank R on HOST' for error lines (RANK as the launcher set it, before or after init)."""
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
    return f"rank {rank} on {socket.gethostname()}"
