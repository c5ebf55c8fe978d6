"""How things are measured: bytes saved for backward, peak memory, and step time.

Activation memory (exact, device independent): every tensor autograd saves for backward passes
through a `torch.autograd.graph.saved_tensors_hooks` pack hook. `SavedTensorCounter` keys each one by
its storage (device, data pointer), skips the storages of the model's parameters and buffers, counts
each storage once, and keeps it "live" until autograd drops it (the pack hook returns a small holder
object whose destructor runs when the graph releases it). Reported:
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
import functools
import gc
import resource
import time
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from meft_ds.reversible import MEFTStack

from .setups import HEAD_NAMES


class _Held:
    """What the pack hook hands autograd instead of the tensor; its death marks the storage released."""

    __slots__ = ("counter", "key", "tensor")

    def __init__(self, counter: "SavedTensorCounter", key, tensor: torch.Tensor):
        self.counter, self.key, self.tensor = counter, key, tensor

    def __del__(self):
        self.counter._release(self.key)


def storage_key(tensor: torch.Tensor) -> tuple:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def categorize_modules(model: nn.Module) -> dict[int, str]:
    """id(module) -> the part of the model it belongs to, for the breakdown of saved bytes."""
    categories = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, MEFTStack):
            category = "reversible stack (streams, layer inputs)"
        elif "meft_layers" in parts or any(p in ("layer", "layers") and i + 1 < len(parts) and parts[i + 1].isdigit()
                                           for i, p in enumerate(parts)):
            category = "transformer layers"
        elif any("embed" in p for p in parts):
            category = "embeddings"
        elif any(p in HEAD_NAMES for p in parts):
            category = "head"
        elif name == "" or all(p in ("base_model", "model") for p in parts):
            category = "top level (loss, pooling, masks)"
        else:
            category = "other (final norm, ...)"
        categories[id(module)] = category
    # MEFT stacks sit at "...layer.0": their meft_layers children are layers, the stack itself is not.
    return categories


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward. Use as a context manager around forward+backward.

    `mark_forward_done()` after the loss is computed records `saved_bytes` and its breakdown.
    """

    def __init__(self, model: nn.Module):
        self.excluded = {storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self.categories = categorize_modules(model)
        self.live: dict[tuple, list] = {}  # key -> [holders alive, nbytes, category, shape, dtype]
        self.live_bytes = 0
        self.peak_bytes = 0
        self.saved_bytes = None
        self.breakdown: dict[str, int] = {}
        self.largest: list[tuple] = []
        self._module_stack: list[nn.Module] = []
        self._model = model
        self._stack = contextlib.ExitStack()

    # -- hooks -------------------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        key = storage_key(tensor)
        if key in self.excluded or tensor.untyped_storage().nbytes() == 0:
            return tensor
        entry = self.live.get(key)
        if entry is None:
            nbytes = tensor.untyped_storage().nbytes()
            module = self._module_stack[-1] if self._module_stack else self._model
            category = self.categories.get(id(module), "top level (loss, pooling, masks)")
            self.live[key] = [1, nbytes, category, tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[0] += 1
        return _Held(self, key, tensor)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self.live[key]

    def __enter__(self):
        for module in self._model.modules():
            self._stack.enter_context(_Handle(module.register_forward_pre_hook(self._push)))
            self._stack.enter_context(_Handle(module.register_forward_hook(self._pop, always_call=True)))
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def _push(self, module, args):
        self._module_stack.append(module)

    def _pop(self, module, args, output):
        if self._module_stack and self._module_stack[-1] is module:
            self._module_stack.pop()

    # -- results -----------------------------------------------------------------------------------
    def mark_forward_done(self) -> None:
        self.saved_bytes = self.live_bytes
        breakdown = defaultdict(int)
        for _, nbytes, category, _, _ in self.live.values():
            breakdown[category] += nbytes
        self.breakdown = dict(sorted(breakdown.items(), key=lambda kv: -kv[1]))
        self.largest = sorted(((nbytes, category, shape, dtype) for _, nbytes, category, shape, dtype
                               in self.live.values()), reverse=True)[:8]


class _Handle(contextlib.AbstractContextManager):
    def __init__(self, handle):
        self.handle = handle

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakTensorTracker(TorchDispatchMode):
    """Peak bytes of tensors allocated inside the `with` block and alive at the same time.

    Every op's output storage that is not one of its inputs' storages (views and in-place results are
    not allocations) is counted until Python's weak reference to the storage reports it freed. Nothing
    that existed before the block counts: weights, optimizer state. Device independent, exact at the
    tensor level: a CPU stand-in for torch.cuda.max_memory_allocated without allocator rounding or
    library workspaces. Backward runs on the calling thread on CPU, so its ops are seen too.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[tuple, tuple[int, str]] = {}  # key -> (bytes, "shape dtype")
        self._refs: dict[tuple, weakref.ref] = {}
        self._by_kind: dict[str, int] = defaultdict(int)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_composition: dict[str, int] = {}  # "shape dtype" -> bytes alive at the peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            key = storage_key(tensor)
            storage = tensor.untyped_storage()
            nbytes = storage.nbytes()
            if key in inputs or key in self._live or nbytes == 0:
                continue
            kind = "x".join(map(str, tensor.shape)) + " " + str(tensor.dtype).replace("torch.", "")
            self._live[key] = (nbytes, kind)
            self._refs[key] = weakref.ref(storage, functools.partial(self._free, key))
            self._by_kind[kind] += nbytes
            self.current_bytes += nbytes
            if self.current_bytes > self.peak_bytes * 1.001:  # snapshots at +0.1% steps keep this cheap
                self.peak_composition = {k: v for k, v in self._by_kind.items() if v}
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out

    def _free(self, key, _ref=None) -> None:
        nbytes, kind = self._live.pop(key, (0, None))
        if kind is not None:
            self._by_kind[kind] -= nbytes
        self.current_bytes -= nbytes
        self._refs.pop(key, None)


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
        with SavedTensorCounter(model) as counter:
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
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak_rss() -> bool:
    """Reset the resident high-water mark to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): Linux >= 4.0 needed")
    baseline = _status_kib("VmRSS") * 1024
    for _ in range(steps):
        train_step(model, optimizer, batch)
    # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss is at least the parent's peak (the kernel carries
    # the pre-exec high-water mark into signal->maxrss, which clear_refs does not reset).
    peak = _status_kib("VmHWM") * 1024
    rusage_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peak_delta_bytes=peak - baseline, baseline_bytes=baseline, ru_maxrss_bytes=rusage_peak,
                source="VmHWM (resident high-water mark)")


def state_bytes(model: nn.Module) -> int:
    """Bytes of gradients + AdamW moments of the trainable weights (3 copies of them)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
