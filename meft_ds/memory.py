"""Memory as the library measures it, in one place: used by the trainer's telemetry, the benchmarks and tests.

- `SavedTensorCounter`: bytes of the tensors autograd saves for backward (activation memory), exact and
  device independent. Options: `track_live` (which saved storages autograd still holds, and their peak)
  and `by_module` (which part of the model saved them).
- `PeakTensorTracker`: peak bytes of all tensors alive at once during forward + backward (saved
  activations, recomputation, gradient buffers), a CPU stand-in for torch.cuda.max_memory_allocated.
- `unique_bytes`: bytes of a set of tensors, each storage counted once (parameters, gradients, optimizer
  state).
- `proc_status_bytes` / `reset_peak_resident`: the process's resident set and its peak (Linux /proc).
- `format_bytes`: one formatter for every report.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .models import family_for
from .reversible import MEFTLayer, MEFTStack

# Parts of a model in the per-module breakdown of saved bytes (SavedTensorCounter(by_module=True)).
EMBEDDINGS = "embeddings"
LAYERS = "transformer layers"
STACK = "reversible stack (streams, layer inputs)"
HEAD = "head"
TOP_LEVEL = "top level (loss, pooling, masks)"
OTHER = "other (final norm, ...)"
CATEGORIES = (EMBEDDINGS, LAYERS, STACK, HEAD, TOP_LEVEL, OTHER)


def storage_key(tensor: torch.Tensor) -> tuple:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def unique_bytes(tensors) -> int:
    """Bytes of the tensors, each (data_ptr, size) counted once; None and empty tensors are skipped."""
    seen = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in tensors if t is not None and t.numel()}
    return sum(seen.values())


def categorize_modules(model: nn.Module) -> dict[int, str]:
    """id(module) -> the part of the model it belongs to (one of CATEGORIES), for the breakdown of saved bytes.

    Layers and heads come from the model family's registry entry (its layer lists and head names), MEFT
    layers and a stack's frozen layers from the stack; embeddings are the modules named "*embed*", the
    top level the model and its wrappers (named model / base_model: PEFT's, Hugging Face's decoder
    models'). A PEFT model's family is looked up through its base model. Raises ValueError for an
    unsupported model_type.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_for(inner)
    layers = {id(layer) for site in family.sites(inner) for layer in getattr(site.parent, site.attribute)}
    for module in inner.modules():
        if isinstance(module, MEFTStack):
            layers.update(id(layer) for layer in module.frozen_layers)
        elif isinstance(module, MEFTLayer):
            layers.add(id(module))
    heads = {id(getattr(inner, name)) for name in family.head_names
             if isinstance(getattr(inner, name, None), nn.Module)}
    categories: dict[int, str] = {}

    def visit(module: nn.Module, path: tuple[str, ...], inherited: str | None) -> None:
        if isinstance(module, MEFTStack):
            own = STACK  # a stack stands in the layer list; its layers are LAYERS, the stack itself is not
        elif id(module) in layers:
            own = LAYERS
        elif inherited is not None:
            own = inherited
        elif path and "embed" in path[-1]:
            own = EMBEDDINGS
        elif id(module) in heads:
            own = HEAD
        elif all(part in ("base_model", "model") for part in path):  # the model and its wrappers (PEFT, HF)
            own = TOP_LEVEL
        else:
            own = OTHER
        categories.setdefault(id(module), own)
        below = None if own in (TOP_LEVEL, OTHER) else own
        for child_name, child in module.named_children():
            visit(child, (*path, child_name), below)

    visit(model, (), None)
    return categories


class _Held:
    """What the pack hook hands autograd instead of the tensor (track_live): its death marks the storage released."""

    __slots__ = ("counter", "key", "tensor")

    def __init__(self, counter: "SavedTensorCounter", key, tensor: torch.Tensor):
        self.counter, self.key, self.tensor = counter, key, tensor

    def __del__(self):
        self.counter._release(self.key)


class SavedTensorCounter(contextlib.AbstractContextManager):
    """Count the bytes autograd saves for backward inside the `with` block.

    Parameters and buffers of `model` are excluded (they exist whether or not backward runs), and each
    storage is counted once, however many views of it are saved. Device independent and exact: it is
    what a reversible layer must keep small, unlike RSS or allocator peaks which include workspace.
    Tensors saved inside torch.utils.checkpoint regions are invisible (checkpoint installs its own hooks,
    which take precedence), so for checkpointed layers only the checkpoint inputs are counted.

    `bytes`: every storage saved in the block. With `track_live`, the pack hook hands autograd a small
    holder whose destructor marks the storage released: `live_bytes` is what autograd still holds, and
    `peak_bytes` the most it held at once (for MEFT, the stack inputs plus the graph of the one block
    being recomputed in backward). `mark_forward_done()` after the loss is computed records
    `saved_bytes` (live then: what is held between forward and backward) and, with `by_module`, its
    `breakdown` by part of the model (the innermost module running when a storage was saved; see
    categorize_modules) and the `largest` saved storages.
    Usage: `with SavedTensorCounter(model) as counter: loss = model(**batch).loss` then `counter.bytes`.
    """

    def __init__(self, model: nn.Module | None = None, *, track_live: bool = False, by_module: bool = False):
        if by_module and model is None:
            raise ValueError("SavedTensorCounter(by_module=True) needs the model.")
        self.excluded: set[tuple] = set()
        if model is not None:
            self.excluded = {storage_key(t) for t in list(model.parameters()) + list(model.buffers()) if t.numel() > 0}
        self.track_live, self.by_module = track_live, by_module
        self.storages: dict[tuple, int] = {}  # every saved storage -> its bytes
        self.live: dict[tuple, list] = {}  # key -> [holders alive, nbytes, category, shape, dtype]
        self.live_bytes = 0
        self.peak_bytes = 0
        self.saved_bytes: int | None = None
        self.breakdown: dict[str, int] = {}
        self.largest: list[tuple] = []
        self._model = model
        self._categories = categorize_modules(model) if by_module else {}
        self._module_stack: list[nn.Module] = []
        self._stack = contextlib.ExitStack()

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, tensor: torch.Tensor):
        if tensor.is_sparse or tensor.untyped_storage().nbytes() == 0:
            return tensor
        key = storage_key(tensor)
        if key in self.excluded:
            return tensor
        nbytes = tensor.untyped_storage().nbytes()
        self.storages[key] = nbytes
        if not self.track_live:
            return tensor
        entry = self.live.get(key)
        if entry is None:
            module = self._module_stack[-1] if self._module_stack else self._model
            category = self._categories.get(id(module), TOP_LEVEL)
            self.live[key] = [1, nbytes, category, tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[0] += 1
        return _Held(self, key, tensor)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self.live[key]

    def _push(self, module, args) -> None:
        self._module_stack.append(module)

    def _pop(self, module, args, output) -> None:
        if self._module_stack and self._module_stack[-1] is module:
            self._module_stack.pop()

    def __enter__(self):
        if self.by_module:
            for module in self._model.modules():
                self._stack.callback(module.register_forward_pre_hook(self._push).remove)
                self._stack.callback(module.register_forward_hook(self._pop, always_call=True).remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def mark_forward_done(self) -> None:
        """Record saved_bytes (live now), its breakdown and the largest storages. Needs track_live."""
        if not self.track_live:
            raise RuntimeError("SavedTensorCounter.mark_forward_done needs track_live=True.")
        self.saved_bytes = self.live_bytes
        breakdown = defaultdict(int)
        for _, nbytes, category, _, _ in self.live.values():
            breakdown[category] += nbytes
        self.breakdown = dict(sorted(breakdown.items(), key=lambda kv: -kv[1]))
        self.largest = sorted(((nbytes, category, shape, dtype) for _, nbytes, category, shape, dtype
                               in self.live.values()), reverse=True)[:8]


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


def proc_status_bytes(*fields: str, pid: int | str = "self") -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB (VmRSS, VmHWM, RssAnon, ...), in bytes (Linux).

    Raises KeyError naming a field the kernel does not report, OSError when the process is gone.
    """
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                values[key] = int(rest.split()[0]) * 1024
    missing = [field for field in fields if field not in values]
    if missing:
        raise KeyError(f"/proc/{pid}/status has no {', '.join(missing)}")
    return values


def reset_peak_resident() -> bool:
    """Reset the process's resident high-water mark (VmHWM) to its current resident set.

    Writing 5 to /proc/self/clear_refs does it (Linux >= 4.0); False where that is not possible. It does
    not reset resource.getrusage's ru_maxrss after fork+exec (the kernel carries the pre-exec peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}


def format_bytes(value: float | None, unit: str | None = None) -> str:
    """'1.27 GiB': the largest unit that keeps the number >= 1, two decimals ('-' for None).

    With `unit` (a table column headed by it): the bare number in that unit, three decimals below 1,
    two below 10, one above, with thousands separators.
    """
    if value is None:
        return "-"
    if unit is not None:
        number = value / _UNITS[unit]
        digits = 3 if abs(number) < 1 else 2 if abs(number) < 10 else 1
        return f"{number:,.{digits}f}"
    for name, size in _UNITS.items():
        if abs(value) >= size and size > 1:
            return f"{value / size:.2f} {name}"
    return f"{value:.0f} B"
