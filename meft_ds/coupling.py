"""Stream arithmetic: how y = factor * x + block_out is computed and inverted.

A stream is a `Stream(value, state)`: `value` is the float tensor F and G read (and that carries
autograd in cached mode); `state` is what the arithmetic really keeps (None for float arithmetic).

- FloatCoupling: y = factor * x + b and x = (y - b) / factor in the stream dtype. Each inverse
  multiplies rounding error by 1/factor, so deep stacks lose their gradients (docs/numerics.md).
- ExactCoupling: streams are int64 fixed point with `frac_bits` fractional bits; factor = 1/m with an
  integer m; y = floor(x / m) + q(b) and x = m * (y - q(b)) + (x mod m), exactly, by keeping the
  remainder x mod m (only where m > 1): ceil(log2 m) bits per element, bit-packed into bytes for m <= 128
  (4 bits for lam = 0.1, 3 for lam = 1/8), one uint8 per element for m <= 256, else int32; for a power of
  two m the division is a shift. Block outputs are quantised
  deterministically (round to nearest). Gradients pass straight through the quantisation, so they
  follow the same equations (5)-(7) as the float arithmetic with factor = 1/m. Reconstruction is
  bit-exact as long as the recomputed F and G are bit-identical to the forward's; a checksum of each
  layer's input streams, taken in forward and verified in backward, turns any difference into an error.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Stream(NamedTuple):
    value: torch.Tensor | None  # None: not decoded yet (exact arithmetic, backward only); see value_of
    state: torch.Tensor | None


def _remainder_bits(m: int) -> int:
    return (m - 1).bit_length()


def pack_remainders(remainders: torch.Tensor, m: int) -> torch.Tensor:
    """x mod m (values in [0, m), m <= 128) as ceil(log2 m)-bit fields: every 8 elements fill `bits` bytes."""
    bits = _remainder_bits(m)
    flat = remainders.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (flat.view(-1, 8).to(torch.int64) << shifts).sum(-1)  # 8 * bits <= 56 bits: no sign overflow
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).reshape(-1)


def unpack_remainders(packed: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_remainders: an int64 tensor shaped like `like`."""
    bits = _remainder_bits(m)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (packed.view(-1, bits).to(torch.int64) << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1)[: like.numel()].view(like.shape)


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
        """Consumes y: x is computed in place in y's storage (one stream less alive in backward)."""
        diff = y.value.sub_(block_out)
        return Stream(diff if factor == 1.0 else diff.div_(factor), None)

    def value_of(self, stream: Stream) -> torch.Tensor:
        return stream.value

    def state_only(self, stream: Stream) -> Stream:
        return stream  # the value is the state

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
        elif m & (m - 1) == 0:  # a power of two: floor division is an arithmetic shift
            shift = m.bit_length() - 1
            state = (x.state >> shift) + quantised
            side = self._store_remainders(x.state & (m - 1), m)
        else:
            state = torch.div(x.state, m, rounding_mode="floor") + quantised
            side = self._store_remainders(torch.remainder(x.state, m), m)
        carrier = factor * x.value + block_out if torch.is_grad_enabled() else None
        return self._stream(state, carrier), side

    @staticmethod
    def _store_remainders(remainders: torch.Tensor, m: int) -> torch.Tensor:
        if m <= 128:
            return pack_remainders(remainders, m)
        return remainders.to(torch.uint8 if m <= 256 else torch.int32)

    @staticmethod
    def _load_remainders(side: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
        if m <= 128:
            return unpack_remainders(side, m, like)
        return side.to(torch.int64)

    def split(self, y: Stream, block_out: torch.Tensor, factor: float, side) -> Stream:
        """Consumes y: x's state is computed in place in y's state (one int64 stream less alive in backward).

        The value is left undecoded (value_of decodes it when a block needs it).
        """
        m = self.divisor(factor)
        state = y.state.sub_(self.quantise(block_out))
        if m != 1:
            state.mul_(m).add_(self._load_remainders(side, m, state))
        return Stream(None, state)

    def value_of(self, stream: Stream) -> torch.Tensor:
        return self.decode(stream.state) if stream.value is None else stream.value

    def state_only(self, stream: Stream) -> Stream:
        return Stream(None, stream.state)  # the value can be decoded again: let it be freed

    def to_saved(self, stream: Stream) -> torch.Tensor:
        return stream.state

    def from_saved(self, saved: torch.Tensor) -> Stream:
        return Stream(None, saved)

    def checksum(self, stream: Stream) -> torch.Tensor:
        """Two int64 sums (plain and position-weighted, wrapping on overflow): any changed element shows."""
        flat = stream.state.reshape(-1)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 8191 + 1
        return torch.stack([flat.sum(), (flat * weights).sum()])
