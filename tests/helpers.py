"""Test helpers: run a training step and collect gradients; relative errors."""

from __future__ import annotations

import torch

from meft_ds import set_backward


def embedding_grad_step(model, batch: dict, mode: str, seed: int = 1234):
    """One forward/backward in `mode`; returns {name: grad} for trainable params and the input embeddings.

    The input embeddings are the output of the (frozen) token embedding module, made to require grad
    so that the gradient reaching the bottom of the stack is compared as well.
    """
    set_backward(model, mode)
    model.train()
    model.zero_grad(set_to_none=True)
    captured = []

    def keep(module, args, output):
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    # Every module sharing the input embedding weight (BART's encoder and decoder each have one).
    weight = model.get_input_embeddings().weight
    handles = [m.register_forward_hook(keep) for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and m.weight is weight]
    try:
        torch.manual_seed(seed)
        loss = model(**batch).loss
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    assert captured, "no input embedding output was captured"
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for i, emb in enumerate(captured):
        grads[f"input_embeddings.{i}"] = None if emb.grad is None else emb.grad.detach().clone()
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().norm().item()
    diff = (a.double() - b.double()).norm().item()
    return diff / scale if scale > 0 else diff


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
