"""Memory and speed of every rank, gathered to rank 0 and written to TensorBoard as one run per rank.

Every log step each rank measures a few numbers, rank 0 gathers them with one small collective
(`gather_to_rank0`: one float64 vector per rank, no other host sync) and writes them under
`<logging_dir>/rank_<r>/` with the same tag names for every rank, so TensorBoard overlays the ranks in
one chart and no shared filesystem is needed (only rank 0 writes). `RankTelemetry` is what the trainer
uses; the functions below it work on any model / optimizer. docs/telemetry.md has the details.

Tags (bytes unless said otherwise):
  memory/allocated_bytes, memory/reserved_bytes,     CUDA allocator now; peak allocated since the
  memory/peak_allocated_bytes                        previous log step
  memory/resident_bytes, memory/peak_resident_bytes  CPU: process resident set now; its peak since the
                                                     previous log step
  memory/param_bytes, memory/grad_bytes,             what this rank holds (ZeRO shards), gradients
  memory/optimizer_state_bytes                       counted after the step's last backward
  memory/saved_bytes                                 bytes autograd saves for backward in the step's
                                                     forward, its largest micro-batch (--log_saved_bytes)
  train/loss, train/learning_rate                    this rank's loss at the log step; the lr
  perf/step_time_s, perf/samples_per_second,         this rank, averaged over the steps since the
  perf/tokens_per_second                             previous log (tokens: non-padding ones)
  perf/log_time_s                                    what the previous log step's measuring, gathering
                                                     and writing took on this rank (0 at the first)
  reversible/reconstruction_error                    largest relative error of the layer inputs rebuilt
                                                     in backward (--reconstruction_error_steps)
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from ..memory import SavedTensorCounter, proc_status_bytes, reset_peak_resident, unique_bytes
from ..reversible import MEFTStack

RUN_PREFIX = "rank_"
CUDA_MEMORY_TAGS = ("memory/allocated_bytes", "memory/reserved_bytes", "memory/peak_allocated_bytes")
CPU_MEMORY_TAGS = ("memory/resident_bytes", "memory/peak_resident_bytes")


# --- what one rank measures -------------------------------------------------------------------------

def device_memory(device: torch.device) -> dict[str, float]:
    """Memory now and its peak since the previous call (the peak counter is reset after reading).

    CUDA: the caching allocator's allocated, reserved and peak-allocated bytes of `device`. Otherwise
    the process's resident set and its peak from /proc/self/status (Linux; where the peak cannot be
    reset it is the peak since process start). Peak >= current on both.
    """
    if device.type == "cuda":
        stats = {
            "memory/allocated_bytes": float(torch.cuda.memory_allocated(device)),
            "memory/reserved_bytes": float(torch.cuda.memory_reserved(device)),
            "memory/peak_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
        }
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    status = proc_status_bytes("VmRSS", "VmHWM")
    resident, peak = status["VmRSS"], status["VmHWM"]
    reset_peak_resident()
    return {"memory/resident_bytes": float(resident), "memory/peak_resident_bytes": float(max(peak, resident))}


def param_bytes(model: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of the model's parameters on this rank (ZeRO-3: this rank's shards): all of them, or only the
    trainable (True) or frozen (False) ones."""
    # ZeRO-3 keeps a parameter's local shard in `ds_tensor` and leaves the parameter itself empty.
    return unique_bytes(getattr(p, "ds_tensor", p) for p in model.parameters()
                         if trainable is None or p.requires_grad == trainable)


def grad_bytes(model: torch.nn.Module, optimizer=None) -> int:
    """Gradient bytes this rank holds: the parameters' .grad plus ZeRO's gradient partitions.

    Meaningful between the last backward of a step and the optimizer step (ZeRO frees them in step).
    """
    tensors = [p.grad for p in model.parameters()]
    partitions = getattr(optimizer, "averaged_gradients", None)  # ZeRO 1-3: this rank's reduced partition
    if isinstance(partitions, dict):
        tensors += [t for grads in partitions.values() if grads is not None for t in grads]
    return unique_bytes(tensors)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes this rank's optimizer holds: its fp32 (master) parameters and their Adam moments.

    DeepSpeed wraps the torch optimizer (ZeRO / mixed precision); the innermost one holds state for
    exactly this rank's fp32 partition (the keys of its `state`; ZeRO-3 swaps the partitions in and out
    of `param_groups` around each step), so the figure shrinks with the number of ranks under ZeRO:
    12 bytes per trainable weight in total (4 master + 2 x 4 moments). Counted after the first step,
    once Adam's moments exist.
    """
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    tensors = list(optimizer.state.keys())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return unique_bytes(tensors)


def reversible_stacks(model: torch.nn.Module) -> list[MEFTStack]:
    """The MEFT stacks of `model` whose backward rebuilds inputs (reversible mode, >= 1 reversible layer)."""
    return [m for m in model.modules()
            if isinstance(m, MEFTStack) and m.backward == "reversible" and m.num_reversible_layers > 0]


# --- gathering and writing --------------------------------------------------------------------------

def gather_to_rank0(stats: dict[str, float], device: torch.device) -> list[dict[str, float]] | None:
    """Every rank's stats to rank 0 in one collective: a list indexed by rank there, None elsewhere.

    Every rank must pass the same keys (the order does not matter). Without an initialised process
    group this is rank 0 of 1 and returns [stats].
    """
    keys = sorted(stats)
    if not (dist.is_available() and dist.is_initialized()):
        return [dict(stats)]
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=backend_device)
    is_root = dist.get_rank() == 0
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())] if is_root else None
    dist.gather(local, gathered, dst=0)
    if not is_root:
        return None
    return [dict(zip(keys, row.cpu().tolist())) for row in gathered]


class RankWriter:
    """Rank 0 writes `<logging_dir>/rank_<r>/` for every rank r; other ranks hold no writer."""

    def __init__(self, logging_dir: str, world_size: int, rank: int):
        self.writers = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writers = [SummaryWriter(os.path.join(logging_dir, f"{RUN_PREFIX}{r}")) for r in range(world_size)]

    def write(self, per_rank: list[dict[str, float]] | None, step: int) -> None:
        if self.writers is None or per_rank is None:
            return
        for writer, stats in zip(self.writers, per_rank, strict=True):
            for tag, value in stats.items():
                writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        for writer in self.writers or ():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers or ():
            writer.close()


# --- the trainer's view -----------------------------------------------------------------------------

class RankTelemetry:
    """Per-rank statistics of a training loop, logged every `logging_steps` steps (and at `last_step`).

    Per optimizer step the loop calls
        begin_step(step)                        step: the 1-based number of the step about to run
        with telemetry.forward(): loss = ...    once per micro-batch
        after_backward(last_micro_step)         after each engine.backward
        end_step(step, seconds, samples, tokens, loss, learning_rate)
    Between log steps this only adds to three Python numbers (no device work); a log step measures
    memory and bytes held, then makes the one gather. The reconstruction error of a sampled step is
    written at the next log step (the largest of the samples since the previous log); sampling is
    decided by the step number, so every rank sends the same keys.

    Raises ValueError when reconstruction_error_steps > 0 and the model has no reversible MEFT stack.
    """

    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device, *, logging_dir: str, rank: int,
                 world_size: int, logging_steps: int, last_step: int, reconstruction_error_steps: int = 0,
                 log_saved_bytes: bool = False):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.logging_steps, self.last_step = logging_steps, last_step
        self.reconstruction_error_steps = reconstruction_error_steps
        self.log_saved_bytes = log_saved_bytes
        self.stacks = reversible_stacks(model) if reconstruction_error_steps else []
        if reconstruction_error_steps and not self.stacks:
            raise ValueError("--reconstruction_error_steps needs a MEFT model with reversible layers "
                             "(--method meft --backward reversible, --num_reversible_layers > 0).")
        self.writer = RankWriter(logging_dir, world_size, rank)
        self._reset_window()
        self.logging = self.sampling = False
        self.last_log_seconds = 0.0  # what the previous log step's measuring, gather and writing took
        self._step_extras: dict[str, float] = {}
        self._measuring = contextlib.ExitStack()  # the stacks' measuring_reconstruction blocks of a sampled step
        self._measurements = []

    def _reset_window(self) -> None:
        self.window_seconds, self.window_steps, self.window_samples, self.window_tokens = 0.0, 0, 0, 0
        self.window_reconstruction_error: float | None = None

    def is_log_step(self, step: int) -> bool:
        return step % self.logging_steps == 0 or step == self.last_step

    def begin_step(self, step: int) -> None:
        self.logging = self.is_log_step(step)
        self.sampling = bool(self.reconstruction_error_steps) and step % self.reconstruction_error_steps == 0
        if self.sampling:  # every micro-batch of the step, every stack: the result keeps the largest error
            self._measurements = [self._measuring.enter_context(s.measuring_reconstruction()) for s in self.stacks]
        self._step_extras = {}

    def forward(self):
        """Context for one micro-batch's forward: counts the bytes saved for backward on log steps when
        log_saved_bytes is set (saved-tensor hooks: a Python call per saved tensor)."""
        if not (self.logging and self.log_saved_bytes):
            return contextlib.nullcontext()
        return _SavedBytes(self.model, self._step_extras)

    def after_backward(self, last_micro_step: bool) -> None:
        if self.logging and last_micro_step:
            self._step_extras["memory/grad_bytes"] = float(grad_bytes(self.model, self.optimizer))

    def end_step(self, step: int, seconds: float, samples: int, tokens: int, loss: float,
                 learning_rate: float) -> list[dict[str, float]] | None:
        """Account the step; on a log step gather every rank's stats and write them (returns them on
        rank 0, None elsewhere and between log steps)."""
        self.window_seconds += seconds
        self.window_steps += 1
        self.window_samples += samples
        self.window_tokens += tokens
        if self.sampling:  # max over micro-batches and stacks; each stack reports its max over layers
            self._measuring.close()
            error = max([0.0, *(m.error for m in self._measurements if m.error is not None)])
            self.window_reconstruction_error = max(error, self.window_reconstruction_error or 0.0)
        if not self.logging:
            return None
        log_start = time.perf_counter()
        stats = {
            **device_memory(self.device),
            "memory/param_bytes": float(param_bytes(self.model)),
            "memory/optimizer_state_bytes": float(optimizer_state_bytes(self.optimizer)),
            **self._step_extras,
            "train/loss": float(loss),
            "train/learning_rate": float(learning_rate),
            "perf/step_time_s": self.window_seconds / self.window_steps,
            "perf/samples_per_second": self.window_samples / self.window_seconds,
            "perf/tokens_per_second": self.window_tokens / self.window_seconds,
            "perf/log_time_s": self.last_log_seconds,
        }
        if self.window_reconstruction_error is not None:
            stats["reversible/reconstruction_error"] = self.window_reconstruction_error
        per_rank = gather_to_rank0(stats, self.device)
        self.writer.write(per_rank, step)
        self._reset_window()
        self.last_log_seconds = time.perf_counter() - log_start
        return per_rank

    def close(self) -> None:
        self._measuring.close()
        self.writer.close()


class _SavedBytes(SavedTensorCounter):
    """SavedTensorCounter that records the largest forward of the step under memory/saved_bytes."""

    def __init__(self, model: torch.nn.Module, extras: dict):
        super().__init__(model)
        self.extras = extras

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        key = "memory/saved_bytes"
        self.extras[key] = max(self.extras.get(key, 0.0), float(self.bytes))
        return result
