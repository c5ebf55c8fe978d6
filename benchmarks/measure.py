"""How the benchmark measures: bytes saved for backward, peak memory, and step time.

The counters are the library's (meft_ds.memory); this module runs them over training steps.
Activation memory (exact, device independent): every tensor autograd saves for backward passes
through a `torch.autograd.graph.saved_tensors_hooks` pack hook. `SavedTensorCounter(track_live=True,
by_module=True)` keys each one by its storage (device, data pointer), skips the storages of the model's
parameters and buffers, counts each storage once, and keeps it "live" until autograd drops it (the pack
hook returns a small holder object whose destructor runs when the graph releases it). Reported:
- saved bytes: live saved storages when the loss is ready, i.e. what is held between forward and
  backward. This is the activation memory of the step.
- peak saved bytes: the most that was live at once during forward + backward. For MEFT it adds the
  graph of the one sub-block being recomputed in backward. Tensors saved inside torch.utils.checkpoint
  regions are invisible here (checkpoint installs its own hooks, which take precedence), so for
  LoRA + checkpointing only the checkpoint inputs are counted, not its recomputation.
Each saved storage is also attributed to the innermost module running when it was saved, which gives
the breakdown by part of the model (embeddings, layers, the reversible stack, head, top level).

Peak tensor memory (exact, device independent): `PeakTensorTracker`, a TorchDispatchMode, counts every
tensor allocated during forward + backward until it is freed and keeps the maximum: saved activations,
recomputation (checkpoint's and MEFT's alike), gradient buffers and the trainable weights' gradients.

Peak memory: on CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was
allocated after the model was built. On CPU, the resident-set high-water mark of a fresh process
(VmHWM, reset after the model is built by writing 5 to /proc/self/clear_refs) minus the resident set
at that point. Not resource.getrusage's ru_maxrss, which is also recorded: in a process started by
fork+exec it never drops below the parent's peak, so it showed the driver's memory for every method.
Both include gradients and AdamW state of the trainable weights.
A tiny warm-up pass (1 x 8 tokens) runs before the baseline so one-time library costs are not counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time

import torch
from torch import nn

from meft_ds.memory import PeakTensorTracker, SavedTensorCounter, proc_status_bytes, reset_peak_resident


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               counter: SavedTensorCounter | None = None, tracker: PeakTensorTracker | None = None) -> dict:
    """One training step (forward, backward, AdamW step); returns its phase times in seconds.

    `*_s` are wall-clock seconds; `*_cpu_s` the process's CPU seconds, which a machine shared with
    other jobs inflates much less (on CPU, with a fixed number of threads, they measure the work done).
    `tracker`, if given, watches forward + backward (not the optimizer step).
    """
    device = batch["input_ids"].device
    clocks = []

    def tick():
        _sync(device)
        clocks.append((time.perf_counter(), time.process_time()))

    tick()
    with tracker if tracker is not None else contextlib.nullcontext():
        loss = model(**batch).loss
        if counter is not None:
            counter.mark_forward_done()
        tick()
        loss.backward()
        tick()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tick()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    phases = {}
    for name, (begin, end) in (("forward", (0, 1)), ("backward", (1, 2)), ("optimizer", (2, 3)), ("step", (0, 3))):
        phases[f"{name}_s"] = clocks[end][0] - clocks[begin][0]
        phases[f"{name}_cpu_s"] = clocks[end][1] - clocks[begin][1]
    return phases


def count_saved(model: nn.Module, batch: dict, steps: int = 2, track_peak: bool = True) -> dict:
    """Saved-for-backward bytes of `steps` training steps (they must agree); the last step's details.

    With `track_peak`, the last step also measures the peak tensor memory of forward + backward.
    """
    optimizer = make_optimizer(model)
    model.train()
    per_step = []
    for step in range(steps):
        tracker = PeakTensorTracker() if track_peak and step == steps - 1 else None
        with SavedTensorCounter(model, track_live=True, by_module=True) as counter:
            train_step(model, optimizer, batch, counter, tracker)
        per_step.append(counter.saved_bytes)
        leftover = counter.live_bytes
    if len(set(per_step)) != 1:
        raise RuntimeError(f"saved bytes differ between identical steps: {per_step}")
    return dict(saved_bytes=counter.saved_bytes, peak_saved_bytes=counter.peak_bytes,
                peak_tensor_bytes=tracker.peak_bytes if tracker is not None else None,
                peak_composition=dict(sorted(tracker.peak_composition.items(), key=lambda kv: -kv[1])[:10])
                if tracker is not None else None,
                leftover_bytes=leftover, breakdown=counter.breakdown,
                largest=[dict(bytes=b, category=c, shape=list(s), dtype=d) for b, c, s, d in counter.largest])


# -- peak memory ---------------------------------------------------------------------------------------
def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory(model: nn.Module, batch: dict, steps: int) -> dict:
    """Peak memory of `steps` training steps over the memory in use once the model is built.

    CUDA: allocator counters. CPU: resident set (meant for a fresh process per method: the
    high-water mark is reset here, but memory the allocator kept from earlier work would hide growth).
    """
    device = batch["input_ids"].device
    optimizer = make_optimizer(model)
    model.train()
    # A tiny forward+backward first, so that one-time costs (lazy imports, library workspaces and
    # caches) are not charged to the method; its gradients are dropped before the baseline.
    tiny = {k: v[:1, :8] if v.dim() == 2 else v[:1] for k, v in batch.items()}
    model(**tiny).loss.backward()
    model.zero_grad(set_to_none=True)
    _release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            train_step(model, optimizer, batch)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(peak_delta_bytes=peak - baseline, baseline_bytes=baseline, source="cuda.max_memory_allocated")
    if not reset_peak_resident():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): Linux >= 4.0 needed")
    baseline = proc_status_bytes("VmRSS")["VmRSS"]
    for _ in range(steps):
        train_step(model, optimizer, batch)
    # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss is at least the parent's peak (the kernel carries
    # the pre-exec high-water mark into signal->maxrss, which clear_refs does not reset).
    peak = proc_status_bytes("VmHWM")["VmHWM"]
    rusage_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peak_delta_bytes=peak - baseline, baseline_bytes=baseline, ru_maxrss_bytes=rusage_peak,
                source="VmHWM (resident high-water mark)")


def state_bytes(model: nn.Module) -> int:
    """Bytes of gradients + AdamW moments of the trainable weights (3 copies of them)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
