"""Stream arithmetic: how y = factor * x + block_out is computed and inverted.

A stream is a `Stream(value, state)`: `value` is the float tensor F and G read (and that carries
autograd in cached mode); `state` is what the arithmetic really keeps (None for float arithmetic).

- FloatCoupling: y = factor * x + b and x = (y - b) / factor in the stream dtype. Each inverse
  multiplies rounding error by 1/factor, so deep stacks lose their gradients (docs/numerics.md).
- ExactCoupling: streams are int64 fixed point with `frac_bits` fractional bits; factor = 1/m with an
  integer m; y = floor(x / m) + q(b) and x = m * (y - q(b)) + (x mod m), exactly, by keeping the
  remainder x mod m (one uint8 per element for m <= 256, else int32; only where m > 1). Block outputs are quantised
  deterministically (round to nearest). Gradients pass straight through the quantisation, so they
  follow the same equations (5)-(7) as the float arithmetic with factor = 1/m. Reconstruction is
  bit-exact as long as the recomputed F and G are bit-identical to the forward's; a checksum of each
  layer's input streams, taken in forward and verified in backward, turns any difference into an error.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Stream(NamedTuple):
    value: torch.Tensor
    state: torch.Tensor | None


class FloatCoupling:
    needs_side_buffers = False

    def __init__(self, value_dtype: torch.dtype):
        self.value_dtype = value_dtype

    def encode(self, hidden: torch.Tensor) -> Stream:
        return Stream(hidden.to(self.value_dtype), None)

    def combine(self, x: Stream, block_out: torch.Tensor, factor: float):
        value = x.value + block_out if factor == 1.0 else factor * x.value + block_out
        return Stream(value, None), None

    def split(self, y: Stream, block_out: torch.Tensor, factor: float, side) -> Stream:
        diff = y.value - block_out
        return Stream(diff if factor == 1.0 else diff / factor, None)

    def to_saved(self, stream: Stream) -> torch.Tensor:
        return stream.value

    def from_saved(self, saved: torch.Tensor) -> Stream:
        return Stream(saved, None)

    def checksum(self, stream: Stream) -> torch.Tensor | None:
        return None  # float reconstruction is approximate by design: nothing to verify bit-exactly


class ExactCoupling:
    needs_side_buffers = True

    def __init__(self, value_dtype: torch.dtype, frac_bits: int):
        self.value_dtype = value_dtype
        self.frac_bits = frac_bits
        self.scale = float(2 ** frac_bits)

    @staticmethod
    def divisor(factor: float) -> int:
        return int(round(1.0 / factor))

    def quantise(self, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values.double() * self.scale).to(torch.int64)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        return (state.double() / self.scale).to(self.value_dtype)

    def _stream(self, state: torch.Tensor, carrier: torch.Tensor | None) -> Stream:
        value = self.decode(state)
        if carrier is not None and carrier.requires_grad:
            # Straight-through: the value is exactly decode(state), the gradient flows to the carrier.
            value = value + (carrier - carrier.detach())
        return Stream(value, state)

    def encode(self, hidden: torch.Tensor) -> Stream:
        hidden = hidden.to(self.value_dtype)
        return self._stream(self.quantise(hidden), hidden)

    def combine(self, x: Stream, block_out: torch.Tensor, factor: float):
        m = self.divisor(factor)
        quantised = self.quantise(block_out)
        if m == 1:
            state, side = x.state + quantised, None
        else:
            state = torch.div(x.state, m, rounding_mode="floor") + quantised
            side = torch.remainder(x.state, m).to(torch.uint8 if m <= 256 else torch.int32)
        carrier = factor * x.value + block_out if torch.is_grad_enabled() else None
        return self._stream(state, carrier), side

    def split(self, y: Stream, block_out: torch.Tensor, factor: float, side) -> Stream:
        m = self.divisor(factor)
        diff = y.state - self.quantise(block_out)
        state = diff if m == 1 else diff * m + side.to(torch.int64)
        return Stream(self.decode(state), state)

    def to_saved(self, stream: Stream) -> torch.Tensor:
        return stream.state

    def from_saved(self, saved: torch.Tensor) -> Stream:
        return Stream(self.decode(saved), saved)

    def checksum(self, stream: Stream) -> torch.Tensor:
        """Two int64 sums (plain and position-weighted, wrapping on overflow): any changed element shows."""
        flat = stream.state.reshape(-1)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 8191 + 1
        return torch.stack([flat.sum(), (flat * weights).sum()])
