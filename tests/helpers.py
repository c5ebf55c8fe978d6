"""Test helpers: a training step that collects gradients and relative errors (meft_ds.check), graph inspection."""

from __future__ import annotations

import torch

from meft_ds.check import gradient_step as embedding_grad_step  # noqa: F401 - the tests' name for it
from meft_ds.check import relative_error as rel_err  # noqa: F401


def graph_node_names(tensor: torch.Tensor) -> set[str]:
    """Class names of every autograd node `tensor` depends on."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names
