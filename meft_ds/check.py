"""check_gradients: does the reversible backward give this model, on this batch, the gradients that ordinary
backprop through the same architecture gives?

The reversible backward rebuilds each layer's input from its output instead of keeping it; the reference is
the same MEFT model with `backward="vanilla"` (autograd keeps every activation). Both runs use the same weights,
batch and dropout masks (the same seed), so any difference is the backward's: summation order (~1e-7 relative
in fp32, exact arithmetic), reconstruction error (float arithmetic, growing with depth), or a bug.

    from meft_ds import check_gradients
    result = check_gradients(model, batch)        # batch: the model's keyword inputs, labels included
    print(result)                                 # worst tensor and its relative error
    assert result.max_error < 1e-5
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .convert import set_backward
from .reversible import MEFTStack


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is zero)."""
    scale = b.double().norm().item()
    diff = (a.double() - b.double()).norm().item()
    return diff / scale if scale > 0 else diff


def gradient_step(model: nn.Module, batch: dict, backward: str, seed: int = 1234):
    """One forward/backward of `model` with the given backward ("reversible" | "vanilla"): (loss, {name: grad}).

    The gradients are the trainable parameters' and the input embeddings' (`input_embeddings.<i>`, one per module
    sharing the input embedding weight: the gradient that reaches the bottom of the stack). The model is left in
    train mode, with the backward it was given and its parameter gradients set.
    """
    set_backward(model, backward)
    model.train()
    model.zero_grad(set_to_none=True)
    captured = []

    def keep(module, args, output):
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    weight = model.get_input_embeddings().weight
    handles = [m.register_forward_hook(keep) for m in model.modules()
               if isinstance(m, nn.Embedding) and m.weight is weight]
    try:
        torch.manual_seed(seed)  # the same dropout masks in both runs
        loss = model(**batch).loss
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError("no input embedding output was captured (the model's input embeddings did not run)")
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for i, emb in enumerate(captured):
        grads[f"input_embeddings.{i}"] = None if emb.grad is None else emb.grad.detach().clone()
    return loss.detach(), grads


@dataclasses.dataclass
class GradientCheck:
    loss_reversible: float
    loss_vanilla: float
    errors: dict  # {tensor name: relative error of the reversible gradient}; tensors without a gradient left out

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def worst(self) -> str | None:
        return max(self.errors, key=self.errors.get, default=None)

    def __str__(self) -> str:
        return (f"reversible vs vanilla backward: largest relative gradient error {self.max_error:.3g} "
                f"({self.worst}), over {len(self.errors)} tensors; loss {self.loss_reversible:.6g} vs "
                f"{self.loss_vanilla:.6g}")


def check_gradients(model: nn.Module, batch: dict, reference: nn.Module | None = None,
                    seed: int = 1234) -> GradientCheck:
    """Gradients of the reversible backward against cached backprop, per tensor (see the module docstring).

    reference: another MEFT model with the same weights to run in vanilla mode (e.g. one with float stream
    arithmetic, to measure the exact arithmetic against plain float backprop); default `model` itself.
    Each model's backward mode is restored afterwards; parameter gradients are cleared.
    """
    models = [model] if reference is None else [model, reference]
    modes = [{stack: stack.backward for stack in m.modules() if isinstance(stack, MEFTStack)} for m in models]
    if not modes[0]:
        raise ValueError("check_gradients needs a model converted by make_reversible; this one has no MEFT stack.")
    try:
        loss_v, vanilla = gradient_step(reference if reference is not None else model, batch, "vanilla", seed)
        loss_r, reversible = gradient_step(model, batch, "reversible", seed)
    finally:
        for m, saved in zip(models, modes):
            for stack, mode in saved.items():
                stack.backward = mode
            m.zero_grad(set_to_none=True)
    errors = {name: relative_error(reversible[name], ref) for name, ref in vanilla.items()
              if ref is not None and reversible.get(name) is not None}
    return GradientCheck(float(loss_r), float(loss_v), errors)
