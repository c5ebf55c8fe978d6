"""Activation memory as autograd sees it: bytes of the tensors saved for backward."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class SavedTensorCounter(contextlib.AbstractContextManager):
    """Count the bytes autograd saves for backward inside the `with` block.

    Parameters and buffers of `model` are excluded (they exist whether or not backward runs), and each
    storage is counted once, however many views of it are saved. Device independent and exact: it is
    what a reversible layer must keep small, unlike RSS or allocator peaks which include workspace.
    Usage: `with SavedTensorCounter(model) as counter: loss = model(**batch).loss` then `counter.bytes`.
    """

    def __init__(self, model: nn.Module | None = None):
        self.excluded: set[int] = set()
        if model is not None:
            tensors = list(model.parameters()) + list(model.buffers())
            self.excluded = {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() > 0 and not tensor.is_sparse:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.excluded:
                self.storages[ptr] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
