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

from typing import NamedTuple

import torch


class Stream(NamedTuple):
    value: torch.Tensor | None  # None: not decoded yet (exact arithmetic, backward only); see value_of
    state: torch.Tensor | None
    # Exact arithmetic, undecoded value only: the 0-dim poison flag (NaN or 0) value_of adds to the value.
    poison: torch.Tensor | None = None


def _remainder_bits(m: int) -> int:
    return (m - 1).bit_length()


def pack_remainders(remainders: torch.Tensor, m: int) -> torch.Tensor:
    """x mod m (values in [0, m), m <= 128) as ceil(log2 m)-bit fields: every 8 elements fill `bits` bytes.

    Packing a run of elements that starts at a multiple of 8 gives the bytes of the whole tensor's packing
    from (start / 8) * bits on, so a tensor can be packed (and unpacked) by chunks.
    """
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


def chunk_size(count: int) -> int:
    """Elements the exact arithmetic works on at a time in a stream of `count` elements: the smallest multiple of
    CHUNK that needs at most MAX_CHUNKS passes. Its int64 and float64 temporaries are then 2 MiB for streams of up
    to 2^21 elements and an eighth of the stream's elements beyond (a sixteenth of its int64 state), while an
    operation never takes more than MAX_CHUNKS passes (kernel launches on a GPU)."""
    return CHUNK * max(1, -(-count // (CHUNK * MAX_CHUNKS)))


def _chunks(count: int):
    """(start, slice) over `count` elements, chunk_size(count) at a time."""
    size = chunk_size(count)
    for start in range(0, count, size):
        yield start, slice(start, start + size)


class FloatCoupling:
    keeps_remainders = False

    def __init__(self, value_dtype: torch.dtype):
        self.value_dtype = value_dtype

    def encode(self, hidden: torch.Tensor) -> Stream:
        return Stream(hidden.to(self.value_dtype), None)

    def combine(self, x: Stream, block_out: torch.Tensor, factor: float):
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

    def __init__(self, value_dtype: torch.dtype, frac_bits: int, state_dtype: torch.dtype = torch.int64):
        self.value_dtype = value_dtype
        self.frac_bits = frac_bits
        self.scale = float(2 ** frac_bits)
        self.state_dtype = state_dtype  # int64, or int32 for half the memory and a range 2^32 times smaller
        self.quantised_limit, self.state_limit = limits(state_dtype)

    @staticmethod
    def divisor(factor: float) -> int:
        return int(round(1.0 / factor))

    def quantise(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-point values and a 0-dim poison flag (NaN if any value is non-finite or out of range, else 0)."""
        state, ok = self._quantised(values.detach())
        return state, _nan_unless(ok)

    def _quantised(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-point `values` and a 0-dim bool: every value finite and within the quantised range."""
        # Scaling by 2^frac_bits is exact in any binary float format (an overflow becomes inf, which the range
        # check catches), and rounding to an integer is exact in the value's own format, so fp32, bf16 and
        # fp64 give the integers a float64 detour would, with one temporary of the input's size instead of
        # three float64 ones. fp16 is widened first: its range (65504) overflows at any useful frac_bits.
        scaled = (values.float() if values.dtype == torch.float16 else values) * self.scale
        ok = _within(scaled, self.quantised_limit)  # on the scaled copy: no extra read of `values`
        return scaled.round_().to(self.state_dtype), ok

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """state / 2^frac_bits in the value dtype, rounded once (through float64, exact for |state| < 2^53).

        By chunks (chunk_size) with the division in place: one bounded float64 temporary instead of two of the
        stream's size. The same operations per element, so the same values.
        """
        out = torch.empty(state.shape, dtype=self.value_dtype, device=state.device)
        flat_state, flat_out = state.reshape(-1), out.view(-1)
        for _, part in _chunks(flat_state.numel()):
            flat_out[part] = flat_state[part].double().div_(self.scale)
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
        if m <= 128:
            packed = pack_remainders(kept, m)  # start is a multiple of 8: the chunk's bytes begin a packed group
            storage[start // 8 * _remainder_bits(m):][: packed.numel()] = packed
        else:
            storage[start: start + kept.numel()] = kept

    @staticmethod
    def _get_remainders(storage: torch.Tensor, start: int, like: torch.Tensor, m: int) -> torch.Tensor:
        """The remainders _put_remainders wrote for the chunk of elements `like` stands for."""
        if m <= 128:
            bits = _remainder_bits(m)
            return unpack_remainders(storage[start // 8 * bits:][: -(-like.numel() // 8) * bits], m, like)
        return storage[start: start + like.numel()]

    def combine(self, x: Stream, block_out: torch.Tensor, factor: float):
        """y = floor(x / m) + q(block_out), and x mod m kept (m = 1/factor > 1).

        The integer work goes by chunks (chunk_size), adding into the new state in place: besides the
        states, no temporary of a whole stream (the int64 ones were the peak of bf16 runs at wide shapes).
        """
        m = self.divisor(factor)
        x_state = x.state.contiguous()
        if m == 1:
            state = x_state.clone()
        elif m & (m - 1) == 0:  # a power of two: floor division is an arithmetic shift
            state = x_state >> (m.bit_length() - 1)
        else:
            state = torch.div(x_state, m, rounding_mode="floor")
        flat, flat_x, values = state.view(-1), x_state.view(-1), block_out.detach().reshape(-1)
        remainders = None if m == 1 else self.remainder_storage(flat.numel(), m, flat.device)
        ok = torch.ones((), dtype=torch.bool, device=flat.device)
        for start, part in _chunks(flat.numel()):
            quantised, within = self._quantised(values[part])
            flat[part].add_(quantised)
            ok = ok & within
            del quantised
            if m > 1:
                kept = flat_x[part] & (m - 1) if m & (m - 1) == 0 else torch.remainder(flat_x[part], m)
                self._put_remainders(remainders, start, kept, m)
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
        less alive in backward), by chunks (chunk_size; no temporary of a whole stream).

        The value is left undecoded (value_of decodes it when a block needs it).
        """
        m = self.divisor(factor)
        state = y.state
        flat, values = state.view(-1), block_out.detach().reshape(-1)
        ok = torch.ones((), dtype=torch.bool, device=flat.device)
        for start, part in _chunks(flat.numel()):
            quantised, within = self._quantised(values[part])
            chunk = flat[part].sub_(quantised)
            ok = ok & within
            del quantised
            if m > 1:
                chunk.mul_(m).add_(self._get_remainders(remainders, start, chunk, m))
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
        a = _odd_words(key, CHECKSUM_ROW, flat.device)
        sums = []  # by chunks of whole rows (chunks are multiples of CHECKSUM_ROW): no int64 product of the state
        for _, part in _chunks(flat.numel()):
            chunk = flat[part]
            rows, tail = divmod(chunk.numel(), CHECKSUM_ROW)
            sums.append((chunk[: rows * CHECKSUM_ROW].view(rows, CHECKSUM_ROW) * a).sum(dim=1))
            if tail:
                sums.append((chunk[rows * CHECKSUM_ROW:] * a[:tail]).sum().view(1))
        row_sums = torch.cat(sums)
        b = _odd_words(key + 1, 2 * row_sums.numel(), flat.device).view(2, -1)
        return (b * row_sums).sum(dim=1)


# Elements the exact arithmetic works on at a time (decode, combine, split, checksum): a float64 or int64
# temporary of a chunk is 2 MiB. A multiple of 8 (remainder packing) and of CHECKSUM_ROW.
CHUNK = 2 ** 18
MAX_CHUNKS = 8
# Row length of the checksum's weight table (coupling.ExactCoupling.checksum).
CHECKSUM_ROW = 1024
_GOLDEN, _MIX1, _MIX2 = (c - 2 ** 64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _odd_words(key: int, count: int, device) -> torch.Tensor:
    """`count` pseudo-random odd int64 words from `key` (splitmix64 finaliser on the device; int64 wraps)."""
    z = (torch.arange(count, device=device, dtype=torch.int64) + (key % 2 ** 62)) * _GOLDEN
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    return (z ^ (z >> 31)) | 1
