"""MEFTConfig: every setting of a MEFT conversion, validated when the object is built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

# lam and beta per variant, from the reference setup (docs/method.md, "the three variants").
VARIANT_FACTORS = {
    "meft1": (0.1, 1.0),
    "meft2": (1.0, 0.1),
    "meft3": (0.1, 0.1),
}
BACKWARD_MODES = ("reversible", "vanilla")
STREAM_ARITHMETICS = ("exact", "float")
ADAPTER_INITS = ("normal", "zero_up")
# "auto": the value dtype follows the model (MEFTConfig.torch_stream_dtype_for).
STREAM_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
STATE_DTYPES = {"int64": torch.int64, "int32": torch.int32}
# Exact arithmetic range: |value| < 2^(61 - frac_bits) (coupling.limits, int64 states); 2^(61-45) = 65536 > 65504,
# float16's largest value. Below 8 fractional bits the streams would round F and G outputs too coarsely.
MIN_FRAC_BITS, MAX_FRAC_BITS = 8, 45
# int32 states: |value| < 2^(29 - frac_bits); at most 21 fractional bits leaves |value| < 256.
MAX_FRAC_BITS_INT32 = 21


def strict_from_dict(cls, values: dict, what: str):
    """cls(**values), refusing unknown keys in one line (a record written by another version, or a typo)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"Unknown {what} field(s) {sorted(unknown)}; known fields: {sorted(known)}.")
    return cls(**values)


@dataclass
class MEFTConfig:
    """How a pretrained model is made reversible. The launcher's MEFT flags are these fields (help text,
    default and choices from the metadata), so a new field is a new flag.

    Raises ValueError on any invalid value, naming the field and what would be valid.
    Checks that need the model (e.g. more frozen layers than it has) happen in `make_reversible`.
    """

    variant: str = field(default="meft1", metadata={"help": "meft1 | meft2 | meft3 (docs/method.md table).",
                                                    "choices": tuple(VARIANT_FACTORS)})
    adapter_dim: int = field(default=8, metadata={"help": "Bottleneck width r of every adapter."})
    lam: float | None = field(
        default=None, metadata={"help": "Factor on stream x1 (y1 = lam*x1 + F(x2)); None = variant default."}
    )
    beta: float | None = field(
        default=None, metadata={"help": "Factor on stream x2 (y2 = beta*x2 + G(y1)); None = variant default."}
    )
    num_frozen_layers: int | None = field(
        default=None,
        metadata={"help": "Lowest layers of each stack kept as original frozen layers, run without gradient. "
                  "None = the model family's default (meft_ds.models): 0 for BERT, RoBERTa and BART; a third of "
                  "the layers, rounded down, for OPT, LLaMA and Mistral; 0 converts every layer."},
    )
    num_reversible_layers: int | None = field(
        default=None,
        metadata={
            "help": "How many MEFT layers (from the bottom, above the frozen ones) use the reversible backward; "
            "None = all. The rest use ordinary cached autograd."
        },
    )
    adapter_init: str = field(
        default="normal",
        metadata={"help": "normal: both adapter matrices N(0, adapter_init_std^2) (reference); "
                  "zero_up: up-projection zero, so the converted model starts exactly at its streams' value.",
                  "choices": ADAPTER_INITS},
    )
    adapter_init_std: float = field(default=0.02, metadata={"help": "Std of the normal adapter init."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout inside each adapter."})
    stream_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the streams' float values (what F and G read) and of the gradients through the "
                          "coupling: auto | float32 | float64 | bfloat16 (exact arithmetic only: less memory, gradients "
                          "rounded to bf16). auto: bfloat16 when the model computes in bf16 (bf16 weights, e.g. "
                          "DeepSpeed's bf16 mode) and the arithmetic is exact, float64 for float64 weights, else float32.",
                  "choices": tuple(STREAM_DTYPES)},
    )
    stream_arithmetic: str = field(
        default="exact",
        metadata={"help": "exact: int64 fixed-point streams with kept remainders, bit-exact reconstruction at "
                  "any depth (lam and beta must be 1/m, m an integer); float: the paper's arithmetic.",
                  "choices": STREAM_ARITHMETICS},
    )
    frac_bits: int = field(
        default=32, metadata={"help": "Fractional bits of the exact fixed-point streams: resolution 2^-frac_bits, "
                              "range |value| < 2^(61-frac_bits); a value outside it makes the stream NaN. "
                              f"At most {MAX_FRAC_BITS}, so that every float16 value fits."}
    )
    state_dtype: str = field(
        default="int64",
        metadata={"help": "Integer dtype of the exact streams' states: int64 | int32. int32 halves the two top "
                          "streams and the integer temporaries, but holds |value| < 2^(29-frac_bits) only: it needs "
                          f"frac_bits <= {MAX_FRAC_BITS_INT32} (e.g. 16: |value| < 8192, resolution 1.5e-5); a value "
                          "outside the range makes the stream NaN (a skipped or stopped step, never a wrong one).",
                  "choices": tuple(STATE_DTYPES)},
    )
    split_layer_recompute: bool = field(
        default=True,
        metadata={"help": "Reversible backward of a block that is a whole pretrained layer (MEFT1's F, MEFT2's G): "
                  "recompute and back-propagate attention and FFN separately, so the attention maps are not alive "
                  "during the FFN backward. Measured (CPU, 12 layers, RoBERTa-base, 8 x 128 tokens, fp32): peak 21 MiB "
                  "(19%) lower, step about 17% slower (one more attention forward per layer; docs/benchmarks.md)."},
    )
    batch_chunks: int = field(
        default=1,
        metadata={"help": "In training, F and G run on at most this many slices of the batch, one after another, in "
                  "forward and in the reversible backward, so the recomputed block's graph (attention maps, FFN "
                  "intermediates) is that much smaller at the peak; 1 runs the whole batch at once. Every block maps "
                  "each sequence on its own, so the function is the same. Measured with 4 (docs/benchmarks.md "
                  "section 0): peak activation memory 0.51x LoRA+GC instead of 0.81x at 12 layers (RoBERTa-base "
                  "shape, 8 x 128, fp32), 5% slower on a CPU but twice as slow on an H200, hence not the default. "
                  "The exact stream arithmetic works on each stream in 2 chunks per slice."},
    )
    ffn_chunks: int = field(
        default=2,
        metadata={"help": "The feed-forward block inside F or G (with its norm, residual and parallel adapter: "
                  "every token on its own) runs on this many slices of the tokens, one after another, in forward "
                  "(evaluation too, so that ZeRO-3 keeps its recorded prefetch order) and in the reversible "
                  "backward, where each slice is recomputed and back-propagated before the next, so only one "
                  "slice's FFN intermediates are alive at the peak; 1 runs all tokens at once. "
                  "Unlike batch_chunks it also slices a batch of one sequence, and the attention is not repeated. "
                  "Measured with 2 (docs/benchmarks.md section 0; OPT-1.3B widths, bf16, 6 layers, 4 x 512 tokens): "
                  "peak 0.94x LoRA+GC instead of 1.05x, no step-time cost measurable on a CPU; more slices lowered "
                  "it no further (the attention's recompute is then the peak)."},
    )
    attention_chunks: int = field(
        default=1,
        metadata={"help": "The attention block inside a whole-layer F or G (MEFT1's F, MEFT2's G) runs on at most "
                  "this many slices of the batch's sequences, one after another, in forward (evaluation too) and in "
                  "the reversible backward, where each slice is recomputed and back-propagated before the next, so "
                  "only one slice's attention tensors (q, k, v, their gradients, T x T maps where kept) are alive at "
                  "the peak; 1 runs the whole batch at once. Unlike batch_chunks the FFN and the stream arithmetic "
                  "stay whole. Measured with 4 and ffn_chunks 4 (docs/benchmarks.md section 0; RoBERTa-base shape, "
                  "8 x 128, fp32): peak 0.51x LoRA+GC instead of 0.79x at 12 layers, CPU step unchanged, but 1.8x the "
                  "ops (GPU kernel launches) of the default, hence not the default; OPT-1.3B widths, 4 x 512, bf16: "
                  "0.76x instead of 0.92x."},
    )
    backward: str = field(
        default="reversible",
        metadata={"help": "reversible: rebuild inputs in backward; vanilla: ordinary cached autograd (same weights).",
                  "choices": BACKWARD_MODES},
    )

    def __post_init__(self):
        if self.variant not in VARIANT_FACTORS:
            raise ValueError(f"MEFTConfig.variant={self.variant!r} is unknown; use one of {sorted(VARIANT_FACTORS)}.")
        default_lam, default_beta = VARIANT_FACTORS[self.variant]
        self.lam = default_lam if self.lam is None else float(self.lam)
        self.beta = default_beta if self.beta is None else float(self.beta)
        for name in ("lam", "beta"):
            value = getattr(self, name)
            # The inverse divides by the factor; 0 is not invertible and a negative one flips the stream.
            if not (0.0 < value <= 1.0):
                raise ValueError(
                    f"MEFTConfig.{name}={value} must be in (0, 1]: the reversible inverse divides by it "
                    f"(the {self.variant} default is {VARIANT_FACTORS[self.variant]})."
                )
        if not isinstance(self.adapter_dim, int) or self.adapter_dim < 1:
            raise ValueError(f"MEFTConfig.adapter_dim={self.adapter_dim!r} must be a positive integer (e.g. 8).")
        if self.num_frozen_layers is not None and (
            not isinstance(self.num_frozen_layers, int) or self.num_frozen_layers < 0
        ):
            raise ValueError(f"MEFTConfig.num_frozen_layers={self.num_frozen_layers!r} must be None (the family "
                             "default) or an integer >= 0.")
        if self.num_reversible_layers is not None and (
            not isinstance(self.num_reversible_layers, int) or self.num_reversible_layers < 0
        ):
            raise ValueError(
                f"MEFTConfig.num_reversible_layers={self.num_reversible_layers!r} must be None (all) or an integer >= 0."
            )
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"MEFTConfig.adapter_init={self.adapter_init!r} is unknown; use one of {ADAPTER_INITS}.")
        if self.adapter_init_std < 0:
            raise ValueError(f"MEFTConfig.adapter_init_std={self.adapter_init_std} must be >= 0.")
        if not (0.0 <= self.adapter_dropout < 1.0):
            raise ValueError(f"MEFTConfig.adapter_dropout={self.adapter_dropout} must be in [0, 1).")
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"MEFTConfig.stream_dtype={self.stream_dtype!r} is unknown; use one of {list(STREAM_DTYPES)}.")
        if self.stream_arithmetic not in STREAM_ARITHMETICS:
            raise ValueError(
                f"MEFTConfig.stream_arithmetic={self.stream_arithmetic!r} is unknown; use one of {STREAM_ARITHMETICS}."
            )
        if self.stream_dtype == "bfloat16" and self.stream_arithmetic != "exact":
            # Float inversion divides by lam at every layer: bf16's 8 significant bits are gone in two layers.
            raise ValueError("MEFTConfig.stream_dtype='bfloat16' needs stream_arithmetic='exact' (float streams "
                             "lose a digit per layer when rebuilt; use float32 for stream_arithmetic='float').")
        if not isinstance(self.frac_bits, int) or not (MIN_FRAC_BITS <= self.frac_bits <= MAX_FRAC_BITS):
            raise ValueError(
                f"MEFTConfig.frac_bits={self.frac_bits!r} must be an integer in [{MIN_FRAC_BITS}, {MAX_FRAC_BITS}] "
                f"(e.g. 32): the streams hold |value| < 2^(61-frac_bits), and above {MAX_FRAC_BITS} that range "
                "would not hold every float16 value (65504).")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"MEFTConfig.state_dtype={self.state_dtype!r} is unknown; use one of {list(STATE_DTYPES)}.")
        if self.state_dtype == "int32" and self.frac_bits > MAX_FRAC_BITS_INT32:
            raise ValueError(f"MEFTConfig.state_dtype='int32' holds |value| < 2^(29-frac_bits): frac_bits="
                             f"{self.frac_bits} leaves no range; use frac_bits <= {MAX_FRAC_BITS_INT32} (e.g. 16).")
        if self.stream_arithmetic == "exact":
            for name in ("lam", "beta"):
                value = getattr(self, name)
                divisor = round(1.0 / value)
                if abs(1.0 / value - divisor) > 1e-9 * divisor or divisor > 2**20:
                    raise ValueError(
                        f"MEFTConfig.{name}={value} is not 1/m for an integer m <= 2^20, which the exact stream "
                        f"arithmetic needs (e.g. 0.1 = 1/10, 0.125 = 1/8); choose such a value or "
                        f"stream_arithmetic='float'."
                    )
        if not isinstance(self.split_layer_recompute, bool):
            raise ValueError(f"MEFTConfig.split_layer_recompute={self.split_layer_recompute!r} must be True or False.")
        for name in ("batch_chunks", "ffn_chunks", "attention_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MEFTConfig.{name}={value!r} must be an integer >= 1 (1: no slicing).")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"MEFTConfig.backward={self.backward!r} is unknown; use one of {BACKWARD_MODES}.")

    def torch_stream_dtype_for(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The streams' value dtype when F and G compute in `compute_dtype` (the dtype of the model's hidden states).

        "auto" is the model's own dtype, widened to float32 where that would not work: fp16 (its range overflows
        the sums of the streams) and bf16 with the float arithmetic (bf16 is lost in two rebuilt layers). bf16
        values with the exact arithmetic halve the working tensors of the reversible step; F and G read bf16
        anyway, and the gradients through the coupling are rounded to bf16 as in LoRA's backward.
        """
        if self.stream_dtype != "auto":
            return STREAM_DTYPES[self.stream_dtype]
        if compute_dtype == torch.float64 or (compute_dtype == torch.bfloat16 and self.stream_arithmetic == "exact"):
            return compute_dtype
        return torch.float32

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MEFTConfig":
        return strict_from_dict(cls, values, "MEFTConfig")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MEFTConfig":
        return cls.from_dict(json.loads(text))
