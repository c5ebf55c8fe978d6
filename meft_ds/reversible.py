"""The reversible core: one MEFT layer, the stack, and the autograd Function (arithmetic: coupling.py).

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
import torch.utils.checkpoint
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .coupling import ExactCoupling, Stream

# F or G: called as block(meft_layer, hidden_states, inputs) -> hidden_states.
BlockFn = Callable[["MEFTLayer", torch.Tensor, dict], torch.Tensor]


@contextlib.contextmanager
def reduce_at_last_slice(params: list[nn.Parameter]):
    """For a loop over slices whose backwards each add to `params`' gradients: yields mark(last), to call before
    each slice's backward. DeepSpeed ZeRO 1-3 reduce a weight's gradient as soon as it arrives unless its
    `ds_grad_is_ready` is False (docs/method.md, ZeRO rule 4), so it is False for every slice but the last, and
    False throughout when an enclosing loop has set it so (token slices inside batch slices); restored after."""
    ready = [getattr(p, "ds_grad_is_ready", True) for p in params]

    def mark(last: bool) -> None:
        for p, was in zip(params, ready):
            p.ds_grad_is_ready = was and last
    try:
        yield mark
    finally:
        for p, was in zip(params, ready):
            p.ds_grad_is_ready = was


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


def batch_slices(batch: int, chunks: int) -> list[slice]:
    """At most `chunks` contiguous slices of a batch of `batch` sequences, as even as possible (1 per sequence
    when the batch is smaller)."""
    n = max(1, min(chunks, batch))
    bounds = [batch * i // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def chunk_seed(seed: int | None, index: int) -> int | None:
    """The dropout seed of a batch chunk: the sub-block's own seed for the first (so one chunk draws what an
    unchunked block draws), distinct ones for the others."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63


def slice_inputs(inputs: dict, batch: int, rows: slice) -> dict:
    """The layer inputs of the sequences in `rows`: every tensor of 2 or more dimensions whose first dimension is
    the batch (masks, per-sequence position tables, encoder states) is sliced; 1-D tensors (cache positions) and
    tensors broadcast over the batch (first dimension 1) are passed whole."""
    def take(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == batch and batch > 1:
            return x[rows]
        return x

    return tree_map(take, inputs)


def rows_sliceable(inputs: dict) -> bool:
    """Whether slice_inputs can take rows of every input: False when one is an object other than a tensor or a
    plain value (a key/value cache in evaluation, which must see the whole batch at once)."""
    leaves, _ = tree_flatten(inputs)
    return all(x is None or isinstance(x, (torch.Tensor, bool, int, float, str)) for x in leaves)


class ReconstructionError(RuntimeError):
    """A layer input rebuilt in backward differs from the forward's (exact arithmetic only)."""


class Carry:
    """A layer's input streams, handed over to be consumed (MEFTLayer.forward). A plain object, not a tuple or list:
    DeepSpeed ZeRO-3's module hooks rebuild those among a module's arguments, and the caller's copy would keep
    the streams alive."""

    def __init__(self, *streams: Stream, owned: bool = False):
        self._streams = list(streams)
        # The caller keeps no other reference and reads the streams' storage no more: the layer may overwrite
        # it (ExactCoupling.combine's `consume`). Not for a checkpointed layer, whose recompute reads its inputs.
        self.owned = owned

    @property
    def streams(self) -> tuple[Stream, ...]:
        """The streams, without taking them (empty once taken)."""
        return tuple(self._streams)

    def take(self) -> list[Stream]:
        streams, self._streams = self._streams, []
        return streams


def _call_with_carry(layer, x1, x2, *args):
    """layer(Carry(x1, x2), *args): for torch.utils.checkpoint, whose recompute calls it again with x1, x2."""
    return layer(Carry(x1, x2), *args)


class MEFTLayer(nn.Module):
    """One reversible coupling: F, G, lam, beta and whether the streams are switched on the way out.

    `layer` is the original pretrained layer (adapters attached inside it) and `adapter` the
    stand-alone adapter of MEFT1/2; F and G are callables over them supplied by the model family.
    Streams (see coupling.py) carry float values in the stream dtype; F and G run in `compute_dtype`
    (the dtype of the model's own hidden states, e.g. bf16 under DeepSpeed) and are upcast before
    coupling. The stack passes the stream arithmetic (`coupling`, coupling.py) to forward and backward_step.

    With `chunks` > 1 (the stack's MEFTConfig.batch_chunks, in training), F and G run on at most that many
    slices of the batch, one after another, in forward and in the reversible backward: every block maps each
    sequence on its own, so only the recomputed slice's graph (attention maps, FFN intermediates) is alive at
    once. Each slice draws dropout from its own seed (chunk_seed), the same in forward and backward.

    A block may say how it is made: `parts` = (first, second), block = second o first, where `second` maps every
    token on its own (a feed-forward block; `first` None: nothing before it) and `first` every sequence on its
    own (an attention block). `second` then runs on `ffn_chunks` slices of the tokens and `first` on
    `attention_chunks` slices of the sequences, one after another, in forward (evaluation too) and in the
    reversible backward, where each slice is recomputed and back-propagated before the next
    (`recompute_backward`). The slices draw their dropout masks one after another from the block's generator,
    in the same order in forward and in the recompute, so the recomputed output is the forward's bit for bit.
    """

    def __init__(self, layer: nn.Module, adapter: nn.Module | None, f: BlockFn, g: BlockFn,
                 lam: float, beta: float, switched: bool, ffn_chunks: int = 1, attention_chunks: int = 1):
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self.f, self.g = f, g
        self.lam, self.beta, self.switched = lam, beta, switched
        self.ffn_chunks, self.attention_chunks = ffn_chunks, attention_chunks
        # Set by the stack for the exact arithmetic (MEFTStack.first_nonfinite_layer); a 4-element tensor.
        self.record_nonfinite, self.nonfinite_flags = False, None

    def _token_slices(self, value: torch.Tensor) -> list[slice]:
        """At most ffn_chunks slices of `value`'s tokens (the batch's sequences laid end to end). In evaluation
        too: the modules then run in the order of training's forward, which DeepSpeed ZeRO-3 has recorded as
        its prefetch plan (a different order at evaluation makes it discard that plan)."""
        return batch_slices(value.shape[:-1].numel(), self.ffn_chunks)

    def _block_forward(self, block: BlockFn, value: torch.Tensor, inputs: dict) -> torch.Tensor:
        """block(value), its token-wise part slice by slice (see the class docstring)."""
        parts = getattr(block, "parts", None)
        if parts is None:
            return block(self, value, inputs)
        first, second = parts
        if first is not None:
            value = self._sequence_wise_forward(first, value, inputs)
        pieces = self._token_slices(value)
        if len(pieces) == 1:
            return second(self, value, inputs)
        flat = value.reshape(1, -1, value.shape[-1])
        out = torch.cat([second(self, flat[:, s], inputs) for s in pieces], dim=1)
        return out.reshape(*value.shape[:-1], out.shape[-1])

    def _sequence_slices(self, value: torch.Tensor, inputs: dict) -> list[slice]:
        """At most attention_chunks slices of `value`'s sequences; one (the whole batch) when an input cannot be
        sliced by rows (a key/value cache, in evaluation)."""
        if self.attention_chunks == 1 or not rows_sliceable(inputs):  # the default skips the walk over the inputs
            return [slice(0, value.shape[0])]
        return batch_slices(value.shape[0], self.attention_chunks)

    def _sequence_wise_forward(self, block: BlockFn, value: torch.Tensor, inputs: dict) -> torch.Tensor:
        """block(value) for a block that maps every sequence on its own, on attention_chunks slices of the batch."""
        rows = self._sequence_slices(value, inputs)
        if len(rows) == 1:
            return block(self, value, inputs)
        batch = value.shape[0]
        return torch.cat([block(self, value[r], slice_inputs(inputs, batch, r)) for r in rows])

    def _sequence_wise_backward(self, block: BlockFn, value: torch.Tensor, grad: torch.Tensor, inputs: dict,
                                compute_dtype: torch.dtype) -> torch.Tensor:
        """block(value) for a sequence-wise block, recomputed with autograd on and back-propagated from `grad`
        slice by slice of the batch as `_sequence_wise_forward` ran it; returns the gradient for `value` (a
        leaf). As with batch slices, DeepSpeed may reduce a trained weight's gradient at the last slice only."""
        batch = value.shape[0]
        rows = self._sequence_slices(value, inputs)
        if len(rows) == 1:
            with torch.enable_grad():
                out = block(self, value.to(compute_dtype), inputs)
            torch.autograd.backward(out, grad)
            return value.grad
        value_grad = torch.empty_like(value)
        with reduce_at_last_slice([p for p in self.parameters() if p.requires_grad]) as mark:
            for i, r in enumerate(rows):
                mark(i == len(rows) - 1)
                leaf = value.detach()[r].requires_grad_(True)
                with torch.enable_grad():  # so that an input that needs a gradient gets it through its slice
                    piece = block(self, leaf.to(compute_dtype), slice_inputs(inputs, batch, r))
                torch.autograd.backward(piece, grad[r])
                value_grad[r] = leaf.grad
                del piece, leaf
        return value_grad

    def _run_one(self, block: BlockFn, value: torch.Tensor, inputs: dict, seed: int | None,
                 compute_dtype: torch.dtype) -> torch.Tensor:
        with seeded_rng(seed, value.device):
            out = self._block_forward(block, value.to(compute_dtype), inputs)
        return out.to(value.dtype)

    def run_block(self, block: BlockFn, value: torch.Tensor, inputs: dict, seed: int | None,
                  compute_dtype: torch.dtype, chunks: int = 1) -> torch.Tensor:
        rows = batch_slices(value.shape[0], chunks)
        if len(rows) == 1:
            return self._run_one(block, value, inputs, seed, compute_dtype)
        outs = [self._run_one(block, value[r], slice_inputs(inputs, value.shape[0], r), chunk_seed(seed, i),
                              compute_dtype) for i, r in enumerate(rows)]
        return torch.cat(outs)

    def forward(self, carry: "Carry", inputs, seeds, compute_dtype, coupling, chunks: int = 1):
        """Equations (1), (2) in `coupling`'s arithmetic; returns the streams as the next layer receives them, and
        the kept remainders. Consumes `carry` (the input streams x1, x2): x1 is dropped as soon as y1 is made, and
        with an owned carry (the reversible forward, which keeps no other reference) the exact arithmetic makes
        y1 and y2 in x1's and x2's integer storage: two integer streams alive while the layer runs, not four."""
        x1, x2 = carry.take()
        # Exact arithmetic: a failed range check made the whole stream NaN, so one element of each stream says
        # whether it was poisoned (inputs: 0, 1; outputs: 2, 3). Summed over the step's forwards. Copies, taken
        # first, so that x1's storage is freed below.
        flags = [x.value.detach()[(0,) * x.value.dim()].clone() for x in (x1, x2)] if self.record_nonfinite else []
        y1, side1 = coupling.combine(x1, self.run_block(self.f, x2.value, inputs, seeds[0], compute_dtype, chunks),
                                     self.lam, consume=carry.owned)
        del x1
        y2, side2 = coupling.combine(x2, self.run_block(self.g, y1.value, inputs, seeds[1], compute_dtype, chunks),
                                     self.beta, consume=carry.owned)
        if self.record_nonfinite:
            flags = torch.stack(flags + [y.value.detach()[(0,) * y.value.dim()] for y in (y1, y2)])
            self.nonfinite_flags = flags if self.nonfinite_flags is None else self.nonfinite_flags + flags
        return ((y2, y1) if self.switched else (y1, y2)), (side1, side2)

    def recompute_backward(self, block: BlockFn, value: torch.Tensor, grad: torch.Tensor, inputs: dict,
                           seed: int | None, compute_dtype: torch.dtype, chunks: int):
        """block(value) recomputed with autograd on and back-propagated from `grad`, slice by slice of the batch
        as forward ran it. Returns (the block's output, detached; the gradient for `value`).

        A trainable weight then receives its gradient once per slice within one backward: DeepSpeed may reduce
        it at the last slice only (reduce_at_last_slice).
        """
        batch = value.shape[0]
        rows = batch_slices(batch, chunks)
        if len(rows) == 1:
            return self._recompute_backward_one(block, value, grad, inputs, seed, compute_dtype)
        out, value_grad = torch.empty_like(value), torch.empty_like(value)
        with reduce_at_last_slice([p for p in self.parameters() if p.requires_grad]) as mark:
            for i, r in enumerate(rows):
                mark(i == len(rows) - 1)
                with torch.enable_grad():  # so that an input that needs a gradient gets it through its slice
                    chunk_inputs = slice_inputs(inputs, batch, r)
                out[r], value_grad[r] = self._recompute_backward_one(
                    block, value[r], grad[r], chunk_inputs, chunk_seed(seed, i), compute_dtype)
                del chunk_inputs
        return out, value_grad

    def _recompute_backward_one(self, block: BlockFn, value: torch.Tensor, grad: torch.Tensor, inputs: dict,
                                seed: int | None, compute_dtype: torch.dtype):
        """block(value) recomputed with autograd on and back-propagated from `grad`.

        Returns (the block's output, detached; the gradient for `value`). A block with `parts` = (first, second)
        is done part by part, drawing the forward's random numbers in the forward's order: `first`, then
        `second` slice by slice of the tokens as forward ran it (each slice's graph freed before the next is
        built), then `first`'s backward. With the block's `split` set (a whole pretrained layer: attention,
        then the FFN), `first` runs without grad before the FFN and again with grad for its own backward, so
        that its graph (the attention maps) is not alive during the FFN's backward: one more forward of the
        attention. The output is the one the forward computed, bit for bit.
        """
        leaf = value.detach().requires_grad_(True)
        parts = getattr(block, "parts", None)
        split = parts is not None and parts[0] is not None and getattr(block, "split", False)
        if parts is None or (not split and self.ffn_chunks == 1):  # in one piece: one graph, one backward
            with torch.enable_grad():
                out = self._run_one(block, leaf, inputs, seed, compute_dtype)
                torch.autograd.backward(out, grad)
            return out.detach(), leaf.grad
        first, second = parts
        with seeded_rng(seed, value.device):
            with torch.set_grad_enabled(not split):  # one stage: first's graph is kept for its backward below
                middle = leaf.to(compute_dtype)
                if first is not None:
                    middle = self._sequence_wise_forward(first, middle, inputs)
            out, middle_grad = self._token_wise_backward(second, middle.detach(), grad, inputs, value.dtype)
        if not split:
            torch.autograd.backward(middle, middle_grad)
            return out, leaf.grad
        del middle  # the attention's output, not needed while it is recomputed
        with seeded_rng(seed, value.device):
            return out, self._sequence_wise_backward(first, leaf, middle_grad, inputs, compute_dtype)

    def _token_wise_backward(self, block: BlockFn, value: torch.Tensor, grad: torch.Tensor, inputs: dict,
                             out_dtype: torch.dtype):
        """block(value) for a token-wise block, recomputed and back-propagated from `grad` slice by slice of the
        tokens as `_block_forward` ran it; returns (the output in `out_dtype`, detached; the gradient for `value`).
        As with batch slices, DeepSpeed may reduce a trained weight's gradient at the last slice only."""
        pieces = self._token_slices(value)
        if len(pieces) == 1:
            leaf = value.requires_grad_(True)
            with torch.enable_grad():
                out = block(self, leaf, inputs).to(out_dtype)
                torch.autograd.backward(out, grad)
            return out.detach(), leaf.grad
        flat, grad = value.reshape(1, -1, value.shape[-1]), grad.reshape(1, -1, grad.shape[-1])
        out = torch.empty(grad.shape, dtype=out_dtype, device=grad.device)
        value_grad = torch.empty_like(flat)
        with reduce_at_last_slice([p for p in self.parameters() if p.requires_grad]) as mark:
            for i, s in enumerate(pieces):
                mark(i == len(pieces) - 1)
                leaf = flat[:, s].detach().requires_grad_(True)
                with torch.enable_grad():
                    piece = block(self, leaf, inputs).to(out_dtype)
                    torch.autograd.backward(piece, grad[:, s])
                out[:, s], value_grad[:, s] = piece.detach(), leaf.grad
                del piece, leaf
        return out.reshape(*value.shape[:-1], out.shape[-1]), value_grad.reshape(value.shape)

    def backward_step(self, carry: list, remainders, inputs, seeds, compute_dtype, coupling, chunks: int = 1):
        """Rebuild this layer's input from its output and propagate gradients, eqs. (3)-(7).

        `carry` = [out1, out2, dout1, dout2] (the output streams and their gradients) is consumed: it is
        emptied, and every tensor is dropped once used, so that only what the next line needs is alive
        while F or G is recomputed and back-propagated (the peak of the whole step). The splits rebuild
        each input stream in the storage of the output stream it comes from. Returns x1, x2, dx1, dx2.
        Parameter gradients are produced with torch.autograd.backward so that they arrive through
        the same accumulation hooks DeepSpeed/DDP use (docs/method.md, ZeRO rule 2).
        """
        out1, out2, dout1, dout2 = carry
        carry.clear()
        y1, y2, dy1, dy2 = (out2, out1, dout2, dout1) if self.switched else (out1, out2, dout1, dout2)
        del out1, out2, dout1, dout2
        y2 = coupling.state_only(y2)
        y1_value = coupling.value_of(y1)
        y1 = coupling.state_only(y1)
        g_out, y1_grad = self.recompute_backward(self.g, y1_value, dy2, inputs, seeds[1], compute_dtype,
                                                 chunks)
        del y1_value
        dy1_total = y1_grad.add_(dy1)                                              # (5)
        del y1_grad, dy1
        x2 = coupling.split(y2, g_out, self.beta, remainders[1])                   # (3)
        del y2, g_out
        beta_dy2 = dy2 if self.beta == 1.0 else self.beta * dy2
        del dy2
        x2 = Stream(coupling.value_of(x2), x2.state)
        f_out, x2_grad = self.recompute_backward(self.f, x2.value, dy1_total, inputs, seeds[0], compute_dtype,
                                                 chunks)
        dx2 = x2_grad.add_(beta_dy2)                                               # (6)
        del x2_grad, beta_dy2
        x1 = coupling.split(y1, f_out, self.lam, remainders[0])                    # (4)
        dx1 = dy1_total if self.lam == 1.0 else dy1_total.mul_(self.lam)           # (7)
        return x1, x2, dx1, dx2


class _Bookkeeping:
    """What the reversible forward keeps per layer besides the top streams, and what backward checks per layer.

    This base class is the float arithmetic's: nothing (its rebuild is approximate by design). Forward calls
    `before_layer` with each layer's input streams and `after_layer` with the remainders the layer returned,
    then `to_save` once, whose tensors go through save_for_backward (the object itself then holds none, so
    saved-tensor hooks see every kept byte). Backward calls `load` with those tensors, then, from the top layer
    down, `remainders(i)` for layer i's split and `check(i, x1, x2, seeds)` with its rebuilt input streams,
    and `finish()` at the end.
    """

    verifies = False  # whether backward compares rebuilt inputs bit for bit (the autocast check relies on it)

    def before_layer(self, x1: Stream, x2: Stream, seeds) -> None:
        pass

    def after_layer(self, remainders) -> None:
        pass

    def to_save(self, x1: Stream, x2: Stream) -> list[torch.Tensor]:
        return []

    def load(self, tensors) -> None:
        pass

    def remainders(self, i: int):
        return None, None

    def check(self, i: int, x1: Stream, x2: Stream, seeds) -> None:
        pass

    def finish(self) -> None:
        pass


class _ExactBookkeeping(_Bookkeeping):
    """The exact arithmetic's: each layer's remainders, and a keyed checksum of each layer's input streams
    taken in forward and compared with the rebuilt ones in backward (a mismatch raises ReconstructionError)."""

    def __init__(self, coupling: ExactCoupling, first_index: int):
        self.coupling, self.first_index = coupling, first_index
        self._remainders, self._checksums = [], []
        self._present: list[bool] = []
        self.verifies = True

    @staticmethod
    def _key(seeds) -> int:
        """A layer's checksum key: its F dropout seed, drawn afresh every forward (so it changes every step)."""
        return seeds[0]

    def _checksum(self, x1: Stream, x2: Stream, seeds) -> torch.Tensor:
        key = self._key(seeds)
        return torch.stack([self.coupling.checksum(x1, key), self.coupling.checksum(x2, key)])

    def before_layer(self, x1, x2, seeds):
        self._checksums.append(self._checksum(x1, x2, seeds))

    def after_layer(self, remainders):
        self._remainders.extend(remainders)

    def to_save(self, x1, x2):
        # A stream poisoned by a non-finite or out-of-range value (coupling.py) is NaN everywhere: one element
        # of each top stream tells backward whether the forward was poisoned.
        poison = torch.stack([x.value.detach()[(0,) * x.value.dim()] for x in (x1, x2)])
        self._present = [r is not None for r in self._remainders]
        tensors = [r for r in self._remainders if r is not None] + self._checksums + [poison]
        self._remainders, self._checksums = [], []
        return tensors

    def load(self, tensors):
        tensors = iter(tensors)
        self._remainders = [next(tensors) if present else None for present in self._present]
        self._checksums = [next(tensors) for _ in range(len(self._present) // 2)]
        # Poisoned forward: the loss and the gradients are NaN already (as in vanilla mode) and the integer
        # states hold no meaningful values, so there is no reconstruction to verify.
        self.verifies = bool(torch.isfinite(next(tensors)).all())

    def remainders(self, i):
        return self._remainders[2 * i], self._remainders[2 * i + 1]

    def check(self, i, x1, x2, seeds):
        if not self.verifies or torch.equal(self._checksum(x1, x2, seeds), self._checksums[i]):
            return
        first = [self.coupling.value_of(x)[(0,) * x.state.dim()] for x in (x1, x2)]
        cause = ("the recomputed F or G output was not finite or out of range"
                 if not torch.isfinite(torch.stack(first)).all() else
                 "the recomputation of F or G was not bit-identical to the forward (RNG, autocast, "
                 "math backend or batch shape changed between forward and backward?)")
        raise ReconstructionError(
            f"MEFT layer {self.first_index + i}: the input streams rebuilt in backward differ from the "
            f"forward's (checksum mismatch): {cause}. This backward was aborted: gradients of the layers "
            "above are incomplete, so zero them and do not step the optimizer.")


class _ReconstructionProbe(_Bookkeeping):
    """MEFTStack.measuring_reconstruction: keeps every layer's input stream values (visible to saved-tensor hooks,
    like cached backprop) and reports the largest relative error of the rebuilt ones to `report(error)`."""

    def __init__(self, coupling, report: Callable[[float], None]):
        self.coupling, self.report = coupling, report
        self._kept: list[torch.Tensor] = []
        self._worst = None

    def before_layer(self, x1, x2, seeds):
        self._kept.append(torch.stack([x1.value, x2.value]))

    def to_save(self, x1, x2):
        kept, self._kept = self._kept, []
        return kept

    def load(self, tensors):
        self._kept = list(tensors)

    def check(self, i, x1, x2, seeds):
        kept = self._kept[i]
        rebuilt = torch.stack([self.coupling.value_of(x1), self.coupling.value_of(x2)]).double()
        error = (rebuilt - kept).norm() / kept.double().norm().clamp_min(1e-30)
        self._worst = error if self._worst is None else torch.maximum(self._worst, error)

    def finish(self):
        if self._worst is not None:
            self.report(self._worst.item())


class _StackRun:
    """What one forward of the reversible part needs again in backward (no tensors: those are saved)."""

    def __init__(self, layers, seeds, compute_dtype, rebuild, coupling, chunks, first_index, report=None,
                 after_layer_backward=None):
        self.layers, self.seeds, self.compute_dtype, self.rebuild = layers, seeds, compute_dtype, rebuild
        self.coupling, self.chunks = coupling, chunks
        # Called with each layer once backward is done with it (MEFTStack.after_layer_backward).
        self.after_layer_backward = after_layer_backward
        # The arithmetic's bookkeeping, and when `report` is set (a callable(error: float)) the reconstruction
        # probe: a diagnostic for sampled steps, not for every step.
        self.bookkeeping = [_ExactBookkeeping(coupling, first_index) if coupling.keeps_remainders
                            else _Bookkeeping()]
        if report is not None:
            self.bookkeeping.append(_ReconstructionProbe(coupling, report))
        self.ledger = self.bookkeeping[0]
        self.last_layer_index = first_index + len(layers) - 1


def _save(ctx, *groups: list[torch.Tensor]) -> None:
    """save_for_backward of several lists of tensors; `_saved(ctx)` gives the lists back."""
    ctx.save_for_backward(*[t for group in groups for t in group])
    ctx.group_sizes = [len(group) for group in groups]


def _saved(ctx) -> list[list[torch.Tensor]]:
    saved, groups, start = ctx.saved_tensors, [], 0
    for size in ctx.group_sizes:
        groups.append(list(saved[start: start + size]))
        start += size
    return groups


class ReversibleFunction(torch.autograd.Function):
    """Runs a list of MEFT layers without caching activations; rebuilds them in backward.

    Saved for backward (all through save_for_backward, so saved-tensor hooks see them): the top two
    streams, the tensors among the layer inputs (masks, rotary tables, encoder states) and what the
    arithmetic's bookkeeping keeps (exact: each layer's remainders and input checksums). Tensors among the
    layer inputs that require grad (e.g. a decoder's encoder_hidden_states) get their gradient. Parameters
    are never inputs of this Function (docs/method.md, ZeRO rule 3). Returns the top streams' values and, for
    the exact arithmetic, their integer states (not differentiable) so that cached layers above continue
    exactly. Backward rebuilds every layer's input in place in the storage of the saved top streams (which
    the returned values/states share): they are not to be read after backward; a second backward through
    the same graph (retain_graph) fails loudly on autograd's version check instead of using them.
    """

    @staticmethod
    def forward(ctx, run: _StackRun, h1, h2, *input_tensors):
        coupling = run.coupling
        inputs = run.rebuild(input_tensors)
        x1, x2 = coupling.encode(h1), coupling.encode(h2)
        for layer, seeds in zip(run.layers, run.seeds):
            for book in run.bookkeeping:
                book.before_layer(x1, x2, seeds)
            carry = Carry(x1, x2, owned=True)
            del x1, x2  # the layer holds the only references: it drops x1 early and overwrites both (MEFTLayer.forward)
            (x1, x2), remainders = layer(carry, inputs, seeds, run.compute_dtype, coupling, run.chunks)
            run.ledger.after_layer(remainders)
        ctx.run = run
        # The integer states get no gradient: without this, autograd would allocate int64 zeros for them.
        ctx.set_materialize_grads(False)
        ctx.autocast = _autocast_state(x1.value.device.type)
        _save(ctx, [coupling.to_saved(x1), coupling.to_saved(x2)], input_tensors,
              *[book.to_save(x1, x2) for book in run.bookkeeping])
        if coupling.keeps_remainders:
            ctx.mark_non_differentiable(x1.state, x2.state)
            return x1.value, x2.value, x1.state, x2.state
        return x1.value, x2.value

    @staticmethod
    def backward(ctx, dx1, dx2, *_state_grads):
        run: _StackRun = ctx.run
        coupling = run.coupling
        (top1, top2), input_tensors, *kept = _saved(ctx)
        for book, tensors in zip(run.bookkeeping, kept):
            book.load(tensors)
        del kept
        # Streams the loss does not depend on get no gradient (materialize_grads is off): zeros.
        dx1 = torch.zeros(top1.shape, dtype=coupling.value_dtype, device=top1.device) if dx1 is None else dx1
        dx2 = torch.zeros(top2.shape, dtype=coupling.value_dtype, device=top2.device) if dx2 is None else dx2
        leaves = [t.detach().requires_grad_(True) if need else t.detach()
                  for t, need in zip(input_tensors, ctx.needs_input_grad[3:])]
        inputs = run.rebuild(leaves)
        # backward_step empties `carry` and refills it through its return value, so no stale stream
        # or gradient stays referenced here while a layer is recomputed.
        carry = [coupling.from_saved(top1), coupling.from_saved(top2), dx1, dx2]
        del top1, top2, dx1, dx2
        with _restored_autocast(ctx.autocast):
            now = _autocast_state(carry[2].device.type)
            if run.ledger.verifies and now != ctx.autocast:
                # With bf16 weights the recomputed values can still match bit for bit while the backward of F
                # and G runs in other dtypes (gradients off by ~0.4%): the checksum alone would not see it.
                raise ReconstructionError(
                    f"MEFT layer {run.last_layer_index}: backward runs under autocast {now}, the forward ran "
                    f"under {ctx.autocast}; the recomputation would not be the forward's. This backward was "
                    "aborted: zero the gradients and do not step the optimizer.")
            for i in reversed(range(len(run.layers))):
                layer, seeds = run.layers[i], run.seeds[i]
                carry = list(layer.backward_step(carry, run.ledger.remainders(i), inputs, seeds, run.compute_dtype,
                                                 coupling, run.chunks))
                if run.after_layer_backward is not None:
                    run.after_layer_backward(layer)
                for book in run.bookkeeping:
                    book.check(i, carry[0], carry[1], seeds)
        for book in run.bookkeeping:
            book.finish()
        input_grads = [leaf.grad if leaf.requires_grad else None for leaf in leaves]
        return (None, carry[2], carry[3], *input_grads)


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


class ReconstructionMeasurement:
    """What MEFTStack.measuring_reconstruction yields: the largest relative error of the rebuilt layer inputs."""

    def __init__(self):
        self.error: float | None = None

    def record(self, error: float) -> None:
        self.error = error if self.error is None else max(self.error, error)


class MEFTStack(nn.Module):
    """Replaces a model's list of layers: frozen layers, then reversible MEFT layers, then cached ones.

    The model calls it once, as if it were its only layer, with the hidden states and the layer
    keyword arguments. `prepare_inputs(args, kwargs, training)` (from the model family) turns those into
    the inputs dict F and G read; `run_frozen(layer, h, inputs)` runs an original layer.
    Both streams start as the stack input; the output is `main + mix * other` where `main` is the stream
    that carries the last pretrained block's output and `mix` a trainable scalar initialised to 0, so
    the converted model starts at the pretrained function up to the lam/beta leak and adapter init.
    """

    def __init__(self, frozen_layers, meft_layers, num_reversible_layers: int, main_stream: int,
                 make_coupling, backward: str, prepare_inputs, run_frozen, batch_chunks: int = 1):
        super().__init__()
        self.frozen_layers = nn.ModuleList(frozen_layers)
        self.meft_layers = nn.ModuleList(meft_layers)
        self.num_reversible_layers = num_reversible_layers
        self.main_stream = main_stream
        # compute dtype -> the stream arithmetic for it (its value dtype: MEFTConfig.torch_stream_dtype_for). One
        # object per compute dtype, never changed: a forward and its backward use the same one whatever runs between.
        self.make_coupling, self._couplings = make_coupling, {}
        exact = isinstance(self.coupling_for(torch.float32), ExactCoupling)
        for layer in self.meft_layers:
            layer.record_nonfinite = exact
        self.backward = backward
        # Slices of the batch F and G run on in training (MEFTConfig.batch_chunks). Not in evaluation: nothing is
        # recomputed there, and a key/value cache must see the whole batch at once.
        self.batch_chunks = batch_chunks
        # Shape (1,), not 0-dim: DeepSpeed's initial broadcast views each parameter as bytes, which a 0-dim tensor
        # refuses.
        self.mix = nn.Parameter(torch.zeros(1))
        self.prepare_inputs, self.run_frozen = prepare_inputs, run_frozen
        self._reconstruction: ReconstructionMeasurement | None = None  # see measuring_reconstruction
        # Optional callable(layer), run in the reversible backward once a layer's recomputation and gradients
        # are done: a partitioning runtime releases the weights it gathered for that recomputation
        # (meft_ds.training.modeling.release_weights_after_recompute, ZeRO-3).
        self.after_layer_backward = None
        # Gradient checkpointing of the layers that use cached backprop (above num_reversible_layers): their
        # activations are recomputed in backward instead of kept; the reversible ones keep none anyway.
        self.checkpoint_cached = False

    @contextlib.contextmanager
    def measuring_reconstruction(self):
        """`with stack.measuring_reconstruction() as result:` forward and backward passes run inside the
        block compare each layer input rebuilt in backward with the one forward saw (extra work per layer);
        afterwards `result.error` is the largest relative error over them (None if no reversible backward
        ran). Gradients are unchanged. Blocks do not nest: raises RuntimeError for a second one."""
        if self._reconstruction is not None:
            raise RuntimeError("this MEFTStack is measuring reconstruction already (blocks do not nest)")
        result = self._reconstruction = ReconstructionMeasurement()
        try:
            yield result
        finally:
            self._reconstruction = None

    def first_nonfinite_layer(self) -> str | None:
        """Where the streams of the forwards since `reset_nonfinite_record` first held NaN / Inf / an out-of-range
        value, in words; None when that is not known (float arithmetic: a non-finite element need not reach the
        one element read per layer, and checking every element would be a second pass over the streams).
        Reads a few flags from the device: for the error path, not for every step."""
        layers = list(self.meft_layers)
        if not layers or not layers[0].record_nonfinite or layers[0].nonfinite_flags is None:
            return None
        first = len(self.frozen_layers)
        flags = torch.stack([layer.nonfinite_flags for layer in layers]).isfinite().cpu()
        if not bool(flags[0, :2].all()):
            return f"the input of MEFT layer {first} (the embeddings or the frozen layers below it)"
        for i in range(len(layers)):
            if not bool(flags[i, 2:].all()):
                return f"MEFT layer {first + i} (its F or G output was not finite or beyond the fixed-point range)"
        return f"none of MEFT layers {first}-{first + len(layers) - 1} (their outputs were finite)"

    def reset_nonfinite_record(self) -> None:
        for layer in self.meft_layers:
            layer.nonfinite_flags = None

    def coupling_for(self, compute_dtype: torch.dtype):
        """The stream arithmetic of a forward whose layers compute in `compute_dtype`."""
        if compute_dtype not in self._couplings:
            self._couplings[compute_dtype] = self.make_coupling(compute_dtype)
        return self._couplings[compute_dtype]

    def forward(self, hidden_states, *args, **kwargs):
        differentiable = self.training and torch.is_grad_enabled()
        inputs = self.prepare_inputs(args, kwargs, differentiable)
        h = hidden_states
        if self.frozen_layers:
            with torch.no_grad():
                for layer in self.frozen_layers:
                    h = self.run_frozen(layer, h, inputs)
        compute_dtype = h.dtype
        # The streams' value dtype follows the model's (bf16 weights: bf16 values for stream_dtype="auto").
        coupling = self.coupling_for(compute_dtype)
        h = h.to(coupling.value_dtype)
        if self.training:
            base = int(torch.randint(0, 2**62, ()).item())
            seeds = [(base + 2 * i, base + 2 * i + 1) for i in range(len(self.meft_layers))]
        else:
            seeds = [(None, None)] * len(self.meft_layers)
        reversible = self.meft_layers[: self.num_reversible_layers]
        chunks = self.batch_chunks if differentiable else 1
        if differentiable and self.backward == "reversible" and len(reversible) > 0:
            if not h.requires_grad:
                # Nothing below needs grad (frozen embeddings / frozen layers); the Function must still run its
                # backward, so its input requires grad instead of a dummy parameter (docs/method.md, ZeRO rule 3).
                h = h.detach().requires_grad_(True)
            split = _Inputs(inputs)
            run = _StackRun(list(reversible), seeds[: len(reversible)], compute_dtype, split.rebuild,
                            coupling, chunks, first_index=len(self.frozen_layers),
                            report=self._reconstruction.record if self._reconstruction is not None else None,
                            after_layer_backward=self.after_layer_backward)
            outputs = ReversibleFunction.apply(run, h, h, *split.tensors)
            states = outputs[2:] if len(outputs) == 4 else (None, None)
            x1, x2 = Stream(outputs[0], states[0]), Stream(outputs[1], states[1])
            rest = zip(self.meft_layers[len(reversible):], seeds[len(reversible):])
        else:
            x1 = x2 = coupling.encode(h)
            rest = zip(self.meft_layers, seeds)
        for layer, layer_seeds in rest:
            if differentiable and self.checkpoint_cached:
                # Non-reentrant: it needs no input that requires grad (the stack input may not) and keeps
                # only the layer's inputs; dropout repeats from the layer's seeds.
                (x1, x2), _ = torch.utils.checkpoint.checkpoint(_call_with_carry, layer, x1, x2, inputs, layer_seeds,
                                                                compute_dtype, coupling, chunks, use_reentrant=False)
            else:
                (x1, x2), _ = layer(Carry(x1, x2), inputs, layer_seeds, compute_dtype, coupling, chunks)
        main, other = (x1.value, x2.value) if self.main_stream == 0 else (x2.value, x1.value)
        return (main + self.mix.to(main.dtype) * other).to(hidden_states.dtype)
