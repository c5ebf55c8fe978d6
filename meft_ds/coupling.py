"""Stream arithmetic: how y = factor * x + block_out is computed and inverted.

A stream is a `Stream(value, state)`: `value` is the float tensor F and G read (and that carries
autograd in cached mode); `state` is what the arithmetic really keeps (None for float arithmetic).

- FloatCoupling: y = factor * x + b and x = (y - b) / factor in the stream dtype. Each inverse
  multiplies rounding error by 1/factor, so deep stacks lose their gradients (docs/numerics.md).
- ExactCoupling: streams are int64 (or int32) fixed point with `frac_bits` fractional bits; factor = 1/m with an
  integer m; y = floor(x / m) + q(b) and x = m * (y - q(b)) + (x mod m), exactly, by keeping the
  remainder x mod m (only where m > 1): ceil(log2 m) bits per element, bit-packed into bytes for m <= 128
  (4 bits for lam = 0.1, 3 for lam = 1/8), one uint8 per element for m <= 256, else int32; for a power of
  two m the division is a shift. Block outputs are quantised
  deterministically (round to nearest). Gradients pass straight through the quantisation, so they
  follow the same equations (5)-(7) as the float arithmetic with factor = 1/m. Reconstruction is
  bit-exact as long as the recomputed F and G are bit-identical to the forward's; a checksum of each
  layer's input streams, taken in forward and verified in backward, turns any difference into an error.

Non-finite and out-of-range values (ExactCoupling): an int64 has no NaN, and a value beyond the fixed-point
range would wrap modulo 2^64 while the inverse stayed exact -- a finite wrong stream that no loss scaler
sees. So every quantisation checks its input's range with one min/max reduction (NaN compares false),
every sum that can grow a stream (factor 1) checks the result's range, and a failed check turns the whole
stream value into NaN, which then flows into F, G, the loss and every gradient as it does in the float
arithmetic (and in the vanilla backward): DeepSpeed's overflow check sees it and skips the step. The
invariant kept: |state| < 2^62 for every stream, |quantised block output| < 2^61, so no add can wrap
(int32 states: 2^30 and 2^29).
No check synchronises with the host.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch


class Stream(NamedTuple):
    value: torch.Tensor | None  # None: not decoded yet (exact arithmetic, backward only); see value_of
    state: torch.Tensor | None
    # Exact arithmetic, undecoded value only: the 0-dim poison flag (NaN or 0) value_of adds to the value.
    poison: torch.Tensor | None = None


def _remainder_bits(m: int) -> int:
    return (m - 1).bit_length()


def _constant(key: tuple, device, build, length: int = 0) -> torch.Tensor:
    """`build(device)`, made once per (key, device) and kept, so the arithmetic, which needs these constants on
    every call, launches no kernels to remake them; remade when shorter than `length`."""
    slot = (key, str(device))
    table = _CONSTANTS.get(slot)
    if table is None or table.numel() < length:
        table = _CONSTANTS[slot] = build(device)
    return table


_CONSTANTS: dict = {}


def _field_shifts(bits: int, device) -> torch.Tensor:
    """(0, bits, 2 * bits, ..., 7 * bits) as int64 on `device`: where each of 8 remainders sits in a packed word."""
    return _constant(("field_shifts", bits), device, lambda d: torch.arange(8, device=d, dtype=torch.int64) * bits)


if sys.byteorder != "little":  # the packing reads an int64 word's low bytes through a uint8 view of it
    raise ImportError("meft_ds.coupling packs remainders through little-endian byte views; this machine is big-endian")


def pack_remainders(remainders: torch.Tensor, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x mod m (values in [0, m), m <= 128) as ceil(log2 m)-bit fields: every 8 elements fill `bits` bytes (the
    low `bits` bytes, little-endian, of the word sum_k r_k << (k * bits)). Written into `out` if given.

    Packing a run of elements that starts at a multiple of 8 gives the bytes of the whole tensor's packing
    from (start / 8) * bits on, so a tensor can be packed (and unpacked) by chunks.
    """
    bits = _remainder_bits(m)
    flat = remainders.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # 8 * bits <= 56 bits: no sign overflow. Three kernels: shift, sum, and the copy of the low bytes.
    words = (flat.view(-1, 8).to(torch.int64) << _field_shifts(bits, flat.device)).sum(-1)
    low_bytes = words.view(torch.uint8).view(-1, 8)[:, :bits]
    if out is None:
        return low_bytes.reshape(-1)
    out.view(-1, bits).copy_(low_bytes)
    return out


def unpack_remainders(packed: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_remainders: an int64 tensor shaped like `like`."""
    bits = _remainder_bits(m)
    groups = packed.numel() // bits
    words = torch.zeros(groups, dtype=torch.int64, device=packed.device)
    words.view(torch.uint8).view(groups, 8)[:, :bits].copy_(packed.view(groups, bits))
    values = (words.unsqueeze(-1) >> _field_shifts(bits, packed.device)) & ((1 << bits) - 1)
    return values.reshape(-1)[: like.numel()].view(like.shape)


def chunk_size(count: int, max_chunks: int) -> int:
    """Elements the exact arithmetic works on at a time in a stream of `count` elements: the smallest multiple of
    CHUNK that needs at most `max_chunks` passes. Each pass is a handful of kernel launches on a GPU, where the
    reversible step is launch-bound; its int64 and float64 temporaries are of a chunk's size."""
    return CHUNK * max(1, -(-count // (CHUNK * max_chunks)))


def _chunks(count: int, max_chunks: int):
    """(start, slice) over `count` elements, chunk_size(count, max_chunks) at a time."""
    size = chunk_size(count, max_chunks)
    for start in range(0, count, size):
        yield start, slice(start, start + size)


class FloatCoupling:
    keeps_remainders = False

    def __init__(self, value_dtype: torch.dtype):
        self.value_dtype = value_dtype

    def encode(self, hidden: torch.Tensor) -> Stream:
        return Stream(hidden.to(self.value_dtype), None)

    def combine(self, x: Stream, block_out: torch.Tensor, factor: float, consume: bool = False):
        """y = factor * x + block_out. Never in place (`consume` is ignored): the first layer's two streams are the
        Function's input, one tensor."""
        value = x.value + block_out if factor == 1.0 else factor * x.value + block_out
        return Stream(value, None), None

    def split(self, y: Stream, block_out: torch.Tensor, factor: float, remainders) -> Stream:
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

    def checksum(self, stream: Stream, key: int) -> torch.Tensor | None:
        return None  # float reconstruction is approximate by design: nothing to verify bit-exactly


def limits(state_dtype: torch.dtype) -> tuple[int, int]:
    """(quantised limit, state limit) for states of `state_dtype`: 2^(bits-3) and 2^(bits-2) for a `bits`-bit
    state (2^61 and 2^62 for int64). Quantised block outputs stay below the first and stream states below the
    second (in magnitude): floor(x / m) + q then never wraps, and for m >= 2 stays below the state limit
    without a check."""
    bits = torch.iinfo(state_dtype).bits
    return 2 ** (bits - 3), 2 ** (bits - 2)


def representable_magnitude(frac_bits: int, state_dtype: torch.dtype = torch.int64) -> float:
    """Largest |value| the exact arithmetic quantises with `frac_bits` fractional bits (exclusive)."""
    return float(limits(state_dtype)[0] / 2 ** frac_bits)


def _nan_unless(ok: torch.Tensor) -> torch.Tensor:
    """0-dim: 0.0 where `ok`, NaN where not (added to a stream value, it poisons all of it)."""
    return torch.where(ok, 0.0, float("nan"))


def _within(tensor: torch.Tensor, limit: float) -> torch.Tensor:
    """0-dim bool, no host sync: every element finite and |element| < limit. One aminmax pass."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return (high < limit) & (low > -limit)  # False for NaN (comparisons with NaN are false) and +-Inf


class ExactCoupling:
    keeps_remainders = True

    def __init__(self, value_dtype: torch.dtype, frac_bits: int, state_dtype: torch.dtype = torch.int64,
                 max_chunks: int = 2):
        self.value_dtype = value_dtype
        self.frac_bits = frac_bits
        # Passes over a stream (chunk_size): the library sets 2 per batch slice (MEFTConfig.batch_chunks), so the
        # temporaries (about two int64 words per element of a chunk) stay below a slice's recomputed graph.
        self.max_chunks = max_chunks
        self.scale = float(2 ** frac_bits)
        self.state_dtype = state_dtype  # int64, or int32 for half the memory and a range 2^32 times smaller
        self.quantised_limit, self.state_limit = limits(state_dtype)

    @staticmethod
    def divisor(factor: float) -> int:
        return int(round(1.0 / factor))

    def quantise(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-point values and a 0-dim poison flag (NaN if any value is non-finite or out of range, else 0)."""
        values = values.detach()
        return self._quantised(values), _nan_unless(self._in_range(values))

    def _in_range(self, values: torch.Tensor) -> torch.Tensor:
        """0-dim bool, one aminmax over `values` (no temporary): every value finite and, scaled by 2^frac_bits,
        within the quantised range. Scaling by a power of two is exact, so comparing the unscaled values with
        limit / 2^frac_bits (a power of two) decides the same. Where that bound is above the format's largest
        finite value (fp16 with few fractional bits) it compares as inf: the check is then finiteness, which is
        the same condition there. One check per tensor, not per chunk: a handful of kernels, not one per chunk."""
        return _within(values, self.quantised_limit / self.scale)

    def _quantised(self, values: torch.Tensor) -> torch.Tensor:
        """Fixed-point `values`, unchecked (see _in_range)."""
        # Scaling by 2^frac_bits is exact in any binary float format, and rounding to an integer is exact in
        # the value's own format, so fp32, bf16 and fp64 give the integers a float64 detour would, with one
        # temporary of the input's size instead of three float64 ones. fp16 is widened first: its range (65504)
        # overflows at any useful frac_bits.
        scaled = (values.float() if values.dtype == torch.float16 else values) * self.scale
        return scaled.round_().to(self.state_dtype)

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """state / 2^frac_bits in the value dtype, rounded once (through float64, exact for |state| < 2^53).

        By chunks (chunk_size), the division computed in float64 and rounded once as it is stored: one bounded
        float64 temporary instead of two of the stream's size. The same operations per element, so the same
        values.
        """
        out = torch.empty(state.shape, dtype=self.value_dtype, device=state.device)
        flat_state, flat_out = state.reshape(-1), out.view(-1)
        for _, part in _chunks(flat_state.numel(), self.max_chunks):
            torch.div(flat_state[part].double(), self.scale, out=flat_out[part])  # rounded once, on the store
        return out

    def _stream(self, state: torch.Tensor, carrier: torch.Tensor | None, poison: torch.Tensor) -> Stream:
        value = self.decode(state)
        value.add_(poison)  # all NaN when a check failed: the stream is wrong, so it must not look finite
        if carrier is not None and carrier.requires_grad:
            # Straight-through: the value is exactly decode(state), the gradient flows to the carrier.
            value = value + (carrier - carrier.detach())
        return Stream(value, state)

    def encode(self, hidden: torch.Tensor) -> Stream:
        hidden = hidden.to(self.value_dtype)
        state, poison = self.quantise(hidden)
        return self._stream(state.contiguous(), hidden, poison)  # contiguous: combine and split work on views

    @staticmethod
    def remainder_storage(elements: int, m: int, device) -> torch.Tensor:
        """The uninitialised tensor that keeps `elements` remainders x mod m (m > 1): bit-packed bytes for
        m <= 128, one uint8 per element for m <= 256, else int32. Its nbytes is what a layer keeps per stream."""
        if m <= 128:
            return torch.empty(-(-elements // 8) * _remainder_bits(m), dtype=torch.uint8, device=device)
        return torch.empty(elements, dtype=torch.uint8 if m <= 256 else torch.int32, device=device)

    @staticmethod
    def _put_remainders(storage: torch.Tensor, start: int, kept: torch.Tensor, m: int) -> None:
        """Write the remainders of elements start, start + 1, ... (`kept`, a chunk) into `storage`."""
        if m <= 128:  # start is a multiple of 8: the chunk's bytes begin a packed group
            bits = _remainder_bits(m)
            pack_remainders(kept, m, out=storage[start // 8 * bits:][: -(-kept.numel() // 8) * bits])
        else:
            storage[start: start + kept.numel()] = kept

    @staticmethod
    def _get_remainders(storage: torch.Tensor, start: int, like: torch.Tensor, m: int) -> torch.Tensor:
        """The remainders _put_remainders wrote for the chunk of elements `like` stands for."""
        if m <= 128:
            bits = _remainder_bits(m)
            return unpack_remainders(storage[start // 8 * bits:][: -(-like.numel() // 8) * bits], m, like)
        return storage[start: start + like.numel()]

    def combine(self, x: Stream, block_out: torch.Tensor, factor: float, consume: bool = False):
        """y = floor(x / m) + q(block_out), and x mod m kept (m = 1/factor > 1).

        The integer work goes by chunks (chunk_size), in place in the new state: besides the states, no
        temporary larger than a chunk. With `consume` (x's state is not read again: the reversible forward,
        which keeps only the remainders) the new state is made in x's storage, one int64 stream less alive.
        """
        m = self.divisor(factor)
        x_state = x.state.contiguous()
        flat_x, values = x_state.view(-1), block_out.detach().reshape(-1)
        remainders = None if m == 1 else self.remainder_storage(flat_x.numel(), m, flat_x.device)
        ok = self._in_range(values)
        if m > 1:  # x mod m kept, before x is divided
            for start, part in _chunks(flat_x.numel(), self.max_chunks):
                kept = flat_x[part] & (m - 1) if m & (m - 1) == 0 else torch.remainder(flat_x[part], m)
                self._put_remainders(remainders, start, kept, m)
        if m == 1:
            state = x_state if consume else x_state.clone()
        elif m & (m - 1) == 0:  # a power of two: floor division is an arithmetic shift
            shift = m.bit_length() - 1
            state = x_state.bitwise_right_shift_(shift) if consume else x_state >> shift
        elif consume:
            state = x_state.div_(m, rounding_mode="floor")
        else:
            state = torch.div(x_state, m, rounding_mode="floor")
        flat = state.view(-1)
        for start, part in _chunks(flat.numel(), self.max_chunks):
            flat[part].add_(self._quantised(values[part]))
        poison = _nan_unless(ok)
        if m == 1:
            poison = poison + _nan_unless(_within(state, self.state_limit))  # a factor-1 sum can grow past the range
        # A poisoned input stream stays poisoned (its value is all NaN, so one element tells): F or G may
        # not read it, and its integer state alone carries no flag.
        poison = poison + 0.0 * x.value.detach()[(0,) * x.value.dim()]
        carrier = factor * x.value + block_out if torch.is_grad_enabled() else None
        return self._stream(state, carrier, poison), remainders

    def split(self, y: Stream, block_out: torch.Tensor, factor: float, remainders) -> Stream:
        """Consumes y: x = m * (y - q(block_out)) + (x mod m) is computed in place in y's state (one int64 stream
        less alive in backward), by chunks (chunk_size; no temporary larger than a chunk).

        The value is left undecoded (value_of decodes it when a block needs it).
        """
        m = self.divisor(factor)
        state = y.state
        flat, values = state.view(-1), block_out.detach().reshape(-1)
        ok = self._in_range(values)
        for start, part in _chunks(flat.numel(), self.max_chunks):
            chunk = flat[part].sub_(self._quantised(values[part]))
            if m > 1:  # m * chunk + remainder, in one pass
                torch.add(self._get_remainders(remainders, start, chunk, m), chunk, alpha=m, out=chunk)
        # Poisoned when the recomputed block output was not finite or out of range (the forward's was not, or
        # backward would not check): the checksum then fails, and the error can say why (value_of).
        return Stream(None, state, _nan_unless(ok))

    def value_of(self, stream: Stream) -> torch.Tensor:
        if stream.value is not None:
            return stream.value
        value = self.decode(stream.state)
        return value if stream.poison is None else value.add_(stream.poison)

    def state_only(self, stream: Stream) -> Stream:
        return Stream(None, stream.state, stream.poison)  # the value can be decoded again: let it be freed

    def to_saved(self, stream: Stream) -> torch.Tensor:
        return stream.state

    def from_saved(self, saved: torch.Tensor) -> Stream:
        return Stream(None, saved)

    def checksum(self, stream: Stream, key: int) -> torch.Tensor:
        """Two int64 words: a keyed hash of the state, sum_i w_i * state_i (mod 2^64) per word.

        The weight of element (row j, column c) of the state laid out in rows of CHECKSUM_ROW is
        w = a_c * b_j, with odd a, b drawn (splitmix64) from `key`, which changes every step and layer. Odd
        weights make any single changed element show with certainty; structured changes (e.g. +1, -2, +1 on
        adjacent elements, or two elements swapped) cancel only if random weights happen to line up
        (about 2^-64 per word). Cost: one multiply and one sum over the state, plus row-sized work.
        """
        flat = stream.state.reshape(-1)
        count = -(-flat.numel() // CHECKSUM_ROW)  # rows; the last may be short
        words = _odd_words(key, CHECKSUM_ROW + 2 * count, flat.device)  # a, then b: one draw
        a, b = words[:CHECKSUM_ROW], words[CHECKSUM_ROW:].view(2, count)
        row_sums = torch.empty(count, dtype=torch.int64, device=flat.device)
        row = 0  # by chunks of whole rows (chunks are multiples of CHECKSUM_ROW): no int64 product of the state
        for _, part in _chunks(flat.numel(), self.max_chunks):
            chunk = flat[part]
            rows, tail = divmod(chunk.numel(), CHECKSUM_ROW)
            torch.sum(chunk[: rows * CHECKSUM_ROW].view(rows, CHECKSUM_ROW) * a, dim=1, out=row_sums[row: row + rows])
            row += rows
            if tail:
                torch.sum(chunk[rows * CHECKSUM_ROW:] * a[:tail], dim=0, keepdim=True, out=row_sums[row: row + 1])
        return (b * row_sums).sum(dim=1)


# The least elements the exact arithmetic works on at a time (decode, combine, split, checksum; chunk_size): a
# float64 or int64 temporary of a chunk is at least 2 MiB. A multiple of 8 (remainder packing) and of CHECKSUM_ROW.
CHUNK = 2 ** 18
# Row length of the checksum's weight table (coupling.ExactCoupling.checksum).
CHECKSUM_ROW = 1024
_GOLDEN, _MIX1, _MIX2 = (c - 2 ** 64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _odd_words(key: int, count: int, device) -> torch.Tensor:
    """`count` pseudo-random odd int64 words from `key`: the first `count` words of a fixed table (a splitmix64-
    style finaliser of 0, 1, 2, ... on the device; int64 wraps), XORed with a splitmix64 word of `key` whose lowest
    bit is cleared, so they stay odd. The table is built once per device (grown to a power of two when a longer
    one is needed): a call is one kernel, not a dozen."""
    def build(device):
        z = torch.arange(1 << max(count - 1, 1023).bit_length(), device=device, dtype=torch.int64) * _GOLDEN
        z = (z ^ (z >> 30)) * _MIX1
        z = (z ^ (z >> 27)) * _MIX2
        return (z ^ (z >> 31)) | 1

    table = _constant(("odd_words",), device, build, length=count)
    z = (key * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2 ** 64  # splitmix64 of the key, on the host
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    mask = (z ^ (z >> 31)) & ~1
    return table[:count] ^ (mask - 2 ** 64 if mask >= 2 ** 63 else mask)
