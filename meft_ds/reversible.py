"""The reversible core: coupling arithmetic, one MEFT layer, the stack, and the autograd Function.

Nothing here knows about model families. A MEFT layer is two callables F and G (each maps a hidden
state and the layer inputs -- masks, position embeddings, ... -- to a hidden state) plus the factors
lam and beta:

    y1 = lam  * x1 + F(x2)                                   (1)
    y2 = beta * x2 + G(y1)                                   (2)
    x2 = (y2 - G(y1)) / beta                                 (3)  inverse of (2)
    x1 = (y1 - F(x2)) / lam                                  (4)  inverse of (1)
    dy1_total = dy1 + (dG/dy1)^T dy2                         (5)
    dx2 = beta * dy2 + (dF/dx2)^T dy1_total                  (6)
    dx1 = lam * dy1_total                                    (7)

The `backward` switch of a stack picks how the reversible part is differentiated: "reversible"
(the Function below: keeps only the top two streams, rebuilds every layer's input in backward) or
"vanilla" (ordinary autograd through the very same forward, caching every activation). Both draw
dropout masks from the same per-sub-block seeds, so they compute the same function.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

# F or G: called as block(meft_layer, hidden_states, inputs) -> hidden_states.
BlockFn = Callable[["MEFTLayer", torch.Tensor, dict], torch.Tensor]


class FloatCoupling:
    """Equations (1)-(4) in floating point; the stream dtype is the dtype of the tensors given.

    This is the one place the stream arithmetic lives; an exactly invertible arithmetic replaces it.
    """

    @staticmethod
    def combine(x: torch.Tensor, block_out: torch.Tensor, factor: float) -> torch.Tensor:
        return x + block_out if factor == 1.0 else factor * x + block_out

    @staticmethod
    def split(y: torch.Tensor, block_out: torch.Tensor, factor: float) -> torch.Tensor:
        diff = y - block_out
        return diff if factor == 1.0 else diff / factor


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device):
    """Run the body with the RNG of `device` (and the CPU) seeded to `seed`, then restore both.

    Every sub-block's dropout draws from its own seed, derived from one number drawn from the global
    generator per forward: runs are reproducible, the global RNG state is left as it was, and the
    recomputation in backward sees the same masks. Only an integer per sub-block is kept.
    """
    if seed is None:
        yield
        return
    cpu_state = torch.get_rng_state()
    device_state = None
    if device.type == "cuda":
        device_state = torch.cuda.get_rng_state(device)
    try:
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            torch.cuda.set_rng_state(device_state, device)


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    types = {device_type, "cpu"}
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted(types)]


@contextlib.contextmanager
def _restored_autocast(states: list[tuple[str, bool, torch.dtype]]):
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in states:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


class MEFTLayer(nn.Module):
    """One reversible coupling: F, G, lam, beta and whether the streams are switched on the way out.

    `layer` is the original pretrained layer (adapters attached inside it) and `adapter` the
    stand-alone adapter of MEFT1/2; F and G are callables over them supplied by the model family.
    Streams come in and go out in the stream dtype; F and G run in `compute_dtype` (the dtype the
    model's own hidden states have, e.g. bf16 under DeepSpeed) and are upcast before coupling.
    """

    def __init__(self, layer: nn.Module, adapter: nn.Module | None, f: BlockFn, g: BlockFn,
                 lam: float, beta: float, switched: bool):
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self.f, self.g = f, g
        self.lam, self.beta, self.switched = lam, beta, switched
        self.coupling = FloatCoupling

    def run_block(self, block: BlockFn, stream: torch.Tensor, inputs: dict, seed: int | None,
                  compute_dtype: torch.dtype) -> torch.Tensor:
        with seeded_rng(seed, stream.device):
            out = block(self, stream.to(compute_dtype), inputs)
        return out.to(stream.dtype)

    def forward(self, x1, x2, inputs, seeds, compute_dtype):
        """Equations (1), (2); returns the streams as the next layer receives them."""
        y1 = self.coupling.combine(x1, self.run_block(self.f, x2, inputs, seeds[0], compute_dtype), self.lam)
        y2 = self.coupling.combine(x2, self.run_block(self.g, y1, inputs, seeds[1], compute_dtype), self.beta)
        return (y2, y1) if self.switched else (y1, y2)

    def backward_step(self, out1, out2, dout1, dout2, inputs, seeds, compute_dtype):
        """Rebuild this layer's input from its output and propagate gradients, eqs. (3)-(7).

        Parameter gradients are produced with torch.autograd.backward so that they arrive through
        the same accumulation hooks DeepSpeed/DDP use (DEEPSPEED.md rule 2).
        """
        y1, y2, dy1, dy2 = (out2, out1, dout2, dout1) if self.switched else (out1, out2, dout1, dout2)
        with torch.enable_grad():
            y1_leaf = y1.detach().requires_grad_(True)
            g_out = self.run_block(self.g, y1_leaf, inputs, seeds[1], compute_dtype)
            torch.autograd.backward(g_out, dy2)
        dy1_total = dy1 + y1_leaf.grad                                            # (5)
        x2 = self.coupling.split(y2, g_out.detach(), self.beta)                    # (3)
        with torch.enable_grad():
            x2_leaf = x2.detach().requires_grad_(True)
            f_out = self.run_block(self.f, x2_leaf, inputs, seeds[0], compute_dtype)
            torch.autograd.backward(f_out, dy1_total)
        dx2 = self.beta * dy2 + x2_leaf.grad                                       # (6)
        x1 = self.coupling.split(y1, f_out.detach(), self.lam)                     # (4)
        dx1 = self.lam * dy1_total                                                 # (7)
        return x1, x2, dx1, dx2


class _StackRun:
    """What one forward of the reversible part needs again in backward (no tensors: those are saved)."""

    def __init__(self, layers, seeds, compute_dtype, rebuild):
        self.layers, self.seeds, self.compute_dtype, self.rebuild = layers, seeds, compute_dtype, rebuild


class ReversibleFunction(torch.autograd.Function):
    """Runs a list of MEFT layers without caching activations; rebuilds them in backward.

    Saved for backward (all through save_for_backward, so saved-tensor hooks see them): the top two
    streams and the tensors among the layer inputs (masks, rotary tables, encoder states). Tensors among
    the layer inputs that require grad (e.g. a decoder's encoder_hidden_states) get their gradient.
    Parameters are never inputs of this Function (DEEPSPEED.md rule 3).
    """

    @staticmethod
    def forward(ctx, run: _StackRun, x1, x2, *input_tensors):
        inputs = run.rebuild(input_tensors)
        for layer, seeds in zip(run.layers, run.seeds):
            x1, x2 = layer(x1, x2, inputs, seeds, run.compute_dtype)
        ctx.run = run
        ctx.autocast = _autocast_state(x1.device.type)
        ctx.save_for_backward(x1, x2, *input_tensors)
        return x1, x2

    @staticmethod
    def backward(ctx, dx1, dx2):
        run: _StackRun = ctx.run
        out1, out2, *input_tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) if need else t.detach()
                  for t, need in zip(input_tensors, ctx.needs_input_grad[3:])]
        inputs = run.rebuild(leaves)
        with _restored_autocast(ctx.autocast):
            for layer, seeds in zip(reversed(run.layers), reversed(run.seeds)):
                out1, out2, dx1, dx2 = layer.backward_step(out1, out2, dx1, dx2, inputs, seeds, run.compute_dtype)
        input_grads = [leaf.grad if leaf.requires_grad else None for leaf in leaves]
        return (None, dx1, dx2, *input_grads)


class _Inputs:
    """Layer inputs (a dict of tensors and other values) split into tensors and a rebuild recipe."""

    def __init__(self, inputs: dict):
        leaves, self.spec = tree_flatten(inputs)
        self.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self.tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        self.others = [x for x in leaves if not isinstance(x, torch.Tensor)]

    def rebuild(self, tensors) -> dict:
        tensors, others = iter(tensors), iter(self.others)
        leaves = [next(tensors) if is_t else next(others) for is_t in self.is_tensor]
        return tree_unflatten(leaves, self.spec)


class MEFTStack(nn.Module):
    """Replaces a model's list of layers: frozen layers, then reversible MEFT layers, then cached ones.

    The model calls it once, as if it were its only layer, with the hidden states and the layer
    keyword arguments. `prepare_inputs(args, kwargs, training)` (from the model family) turns those into
    the inputs dict F and G read; `run_frozen(layer, h, inputs)` runs an original layer.
    Both streams start as the stack input; the output is `main + mix * other` where `main` is the stream
    that carries the last pretrained block's output and `mix` a trainable scalar initialised to 0, so
    the converted model starts at the pretrained function up to the lam/beta leak and adapter init.
    """

    def __init__(self, frozen_layers, meft_layers, num_reversible: int, main_stream: int,
                 stream_dtype: torch.dtype, backward: str, prepare_inputs, run_frozen):
        super().__init__()
        self.frozen_layers = nn.ModuleList(frozen_layers)
        self.meft_layers = nn.ModuleList(meft_layers)
        self.num_reversible = num_reversible
        self.main_stream = main_stream
        self.stream_dtype = stream_dtype
        self.backward_mode = backward
        self.mix = nn.Parameter(torch.zeros(()))
        self.prepare_inputs, self.run_frozen = prepare_inputs, run_frozen

    def forward(self, hidden_states, *args, **kwargs):
        differentiable = self.training and torch.is_grad_enabled()
        inputs = self.prepare_inputs(args, kwargs, differentiable)
        h = hidden_states
        if self.frozen_layers:
            with torch.no_grad():
                for layer in self.frozen_layers:
                    h = self.run_frozen(layer, h, inputs)
        compute_dtype = h.dtype
        x1 = x2 = h.to(self.stream_dtype)
        if self.training:
            base = int(torch.randint(0, 2**62, ()).item())
            seeds = [(base + 2 * i, base + 2 * i + 1) for i in range(len(self.meft_layers))]
        else:
            seeds = [(None, None)] * len(self.meft_layers)
        reversible = self.meft_layers[: self.num_reversible]
        if differentiable and self.backward_mode == "reversible" and len(reversible) > 0:
            if not x1.requires_grad:
                # Nothing below needs grad (frozen embeddings / frozen layers); the Function must still
                # run its backward, so its input requires grad instead of a dummy parameter (METHOD.md).
                x1 = x2 = x1.detach().requires_grad_(True)
            split = _Inputs(inputs)
            run = _StackRun(list(reversible), seeds[: len(reversible)], compute_dtype, split.rebuild)
            x1, x2 = ReversibleFunction.apply(run, x1, x2, *split.tensors)
            rest = zip(self.meft_layers[len(reversible):], seeds[len(reversible):])
        else:
            rest = zip(self.meft_layers, seeds)
        for layer, layer_seeds in rest:
            x1, x2 = layer(x1, x2, inputs, layer_seeds, compute_dtype)
        main, other = (x1, x2) if self.main_stream == 0 else (x2, x1)
        return (main + self.mix.to(main.dtype) * other).to(hidden_states.dtype)
