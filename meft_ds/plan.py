"""Memory planner: per-rank memory of MEFT, LoRA, LoRA + checkpointing and full fine-tuning, from a model config.

    python -m meft_ds.plan --model facebook/opt-1.3b --world_size 8 --gpu_memory 80GiB --max_seq_length 2048 \\
        --micro_batch 4 --precision bf16

Reads only the model's config (a hub name, a model directory or a config.json; no weights) and prints, for
each method under ZeRO 0-3 with and without offload, what one rank holds: frozen weights (their shard under
ZeRO-3), trainable weights, gradients, optimizer state, the activation peak of one micro-batch, and the
weights ZeRO-3 keeps gathered; then a setting that fits (ZeRO stage, offload, num_frozen_layers,
num_reversible_layers, micro-batch). What it does not model -- the CUDA context, communication buffers,
allocator fragmentation -- is held back as one separate figure (--reserve), not spread over the components.

Where the numbers come from:
- Parameters: the model is built on the meta device (no memory, no weights) and the method is applied with
  the code training uses (adapter_io.apply_method: make_reversible with MEFTConfig's defaults, PEFT LoRA
  with the launcher's targets), so frozen and trainable counts are the real ones. Full fine-tuning rows
  also show DeepSpeed's own estimate (estimate_zero2/zero3_model_states_mem_needs), which assumes that
  every weight trains and is therefore only meaningful there.
- Model states per rank follow what DeepSpeed allocates and what meft_ds.training.telemetry reads back: weights in
  the training precision (ZeRO-3: each rank a 1/N slice of every weight, and weights of at most
  stage3_param_persistence_threshold elements also kept whole), the reduced gradient partition in the
  training precision (1/N from ZeRO-1 on), fp32 master weights and two Adam moments (12 bytes per
  trainable weight, 1/N from ZeRO-1 on). Offload moves the optimizer state and the fp32 gradients (and
  under ZeRO-3 the weight slices) to host memory.
- Activations: per method, what this repository's backward keeps (meft_ds/reversible.py, coupling.py) plus
  the largest working set of one step, counted in hidden-state-sized (B*T*hidden) and FFN-sized (B*T*ffn)
  tensors (activation_bytes says which); docs/benchmarks.md, section 7, says how they were measured.
  Attention is assumed to run in a fused kernel (no T x T maps kept; PyTorch SDPA's flash or
  memory-efficient kernel) -- with an eager attention and dropout add 3 maps of B*heads*T*T per layer kept.

Accuracy (tests/test_plan.py): every component within 10% of telemetry's per-rank numbers of real 2-rank
DeepSpeed runs and of the benchmark's peak tensor tracker; docs/benchmarks.md (section 7) lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch

from .adapter_io import ModelRecipe, apply_method
from .config import MEFTConfig
from .coupling import ExactCoupling, chunk_size
from .memory import format_bytes
from .reversible import batch_slices
from .models import REGISTRY, default_num_frozen_layers

METHODS = ("meft", "lora", "lora_gc", "full")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISION_BYTES = {name: dtype.itemsize for name, dtype in PRECISION_DTYPES.items()}
# (ZeRO stage, offload) rows; offload = the optimizer (ZeRO 1-3) and, under ZeRO-3, the weights too.
SETTINGS = [(0, False)] + [(stage, offload) for stage in (1, 2, 3) for offload in (False, True)]
DECODER_ONLY = ("opt", "llama", "mistral")
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold
ADAM_BYTES = 12  # fp32 master copy + two fp32 moments per trainable weight
INT64 = FLOAT64 = 8

# The MEFT settings the activation counts below were measured with (MEFTConfig's defaults when they were).
MEASURED_MEFT_DEFAULTS = dict(variant="meft1", stream_arithmetic="exact", stream_dtype="auto", state_dtype="int64",
                              split_layer_recompute=True, num_reversible_layers=None)


def _unmeasured(meft_config: dict) -> dict:
    """The MEFT settings (a MEFTConfig as a dict) that differ from what the activation counts were measured for."""
    return {k: meft_config[k] for k, v in MEASURED_MEFT_DEFAULTS.items() if meft_config[k] != v}


@dataclasses.dataclass
class Shape:
    """The widths that activations depend on, read from the config."""

    model_type: str
    num_layers: int
    hidden: int
    ffn: int  # FFN width; gated FFNs (LLaMA, Mistral): twice the intermediate size (gate and up outputs)
    heads: int
    vocab: int


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '1.5TiB', '81920MiB' or a plain byte count -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 80GiB, 80GB or 81920MiB.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(number * powers[unit])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes.")
    return value


def load_config(model: str):
    """The transformers config of a hub name, a model directory or a config.json file."""
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file():
        values = json.loads(path.read_text())
        if "model_type" not in values:
            raise ValueError(f"{model} has no model_type field; it is not a transformers config.json.")
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoConfig.from_pretrained(model)


def shape_of(config) -> Shape:
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) \
        or getattr(config, "encoder_ffn_dim", None)
    if config.model_type in ("llama", "mistral"):
        ffn = 2 * ffn  # gated FFN: gate and up projections both full width (not measured; see the docstring)
    return Shape(config.model_type, config.num_hidden_layers, config.hidden_size, ffn,
                 config.num_attention_heads, config.vocab_size)


def meta_model(config, task: str, method: str, num_frozen_layers: int | None, adapter_dim: int):
    """The model training would build, on the meta device: (parameters as (numel, trainable), largest module).

    adapter_dim is also the LoRA rank, as in the launcher; full fine-tuning applies nothing (all trainable)."""
    import transformers

    recipe = ModelRecipe(
        method="lora" if method.startswith("lora") else method, base_model_name_or_path="(plan)", task_kind=task,
        num_labels=2, lora_rank=adapter_dim if method.startswith("lora") else None,
        meft_config=MEFTConfig(num_frozen_layers=num_frozen_layers).to_dict() if method == "meft" else None)
    # PEFT calls a transformers method that warns of its own deprecation: noise for a planner's user.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = getattr(transformers, recipe.auto_class).from_config(config)
        model = apply_method(model, recipe)
    params = [(p.numel(), p.requires_grad) for p in model.parameters()]  # tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return params, largest


def model_states(params, stage: int, offload: bool, world: int, weight_bytes: int) -> dict:
    """Bytes per rank of the weights, gradients and optimizer state (device and host)."""
    trainable = sum(n for n, t in params if t)

    def held(numel):  # one rank's copy of a weight: whole, or under ZeRO-3 its slice (padded to N slices)
        return numel if stage < 3 else math.ceil(numel / world)

    frozen_w = weight_bytes * sum(held(n) for n, t in params if not t)
    trainable_w = weight_bytes * sum(held(n) for n, t in params if t)
    if stage == 0:  # every rank all of it (bf16/fp16: an fp32 copy of the gradients exists during the step only,
        grads = weight_bytes * trainable  # when the activations are gone)
        optimizer = ADAM_BYTES * trainable
    else:  # the reduced gradient partition and the optimizer shard (meft_ds.training.telemetry reads both)
        grads = weight_bytes * math.ceil(trainable / world)
        optimizer = ADAM_BYTES * math.ceil(trainable / world)
    # ZeRO-3 gathers small weights once and keeps them whole on every rank (besides their slice).
    persistent = weight_bytes * sum(n for n, _ in params if n <= ZERO3_PERSISTENCE_THRESHOLD) if stage == 3 else 0
    host = 0
    if offload:
        host += optimizer + 4 * math.ceil(trainable / world)  # fp32 gradient partition for the host step
        optimizer, grads = 0, 0
        if stage == 3:
            host += frozen_w + trainable_w
            frozen_w, trainable_w = 0, 0
    return dict(frozen=frozen_w, trainable=trainable_w, grads=grads, optimizer=optimizer, persistent=persistent,
                host=host)


def remainder_bytes(elements: int, config: MEFTConfig) -> int:
    """Bytes one reversible layer keeps for its divided streams: coupling.py's own storage for them, allocated on
    the meta device (no memory), so the packing rule is not restated here."""
    total = 0
    for factor in (config.lam, config.beta):
        m = ExactCoupling.divisor(factor)
        if m > 1:
            total += ExactCoupling.remainder_storage(elements, m, "meta").nbytes
    return total


def activation_bytes(shape: Shape, method: str, micro_batch: int, max_seq_length: int, precision: str,
                     trained_layers: int, task: str, batch_chunks: int | None = None,
                     attention_chunks: int | None = None, ffn_chunks: int | None = None) -> int:
    """Peak activation bytes of one micro-batch's forward + backward (weight gradients not included): the saved
    part (bytes saved for backward, kept from forward into backward) plus the largest working set of backward.

    Counted in tensors alive at once, h = B*T*hidden and f = B*T*ffn elements (B = micro_batch,
    T = max_seq_length: every batch padded to it), s the stream dtype's bytes,
    c the compute dtype's; the counts were read from the peak composition that meft_ds.memory.PeakTensorTracker
    reports (RoBERTa and OPT shapes, fp32 and bf16, 4 and 8 layers; tests/test_plan.py).
    - MEFT (MEASURED_MEFT_DEFAULTS) keeps the two top int64 streams, each reversible layer's packed
      remainders and the mask; its peak is the largest of three phases of one layer's backward:
      attention recompute + backward: 6 stream-dtype tensors (F's input, dy1 + dG/dy1, beta*dy2, F's
      output, the two gradients autograd hands the Function) + 12 compute-dtype ones (q, k, v, output,
      their gradients, norm and residual tensors) + the float copy of the mask; FFN recompute + backward:
      the same 6 + 3 hidden-sized and 3 FFN-sized compute-dtype ones of the largest token slice
      (MEFTConfig.ffn_chunks; 1, 2, 4 and 8 checked), and with the tokens sliced, 1 stream-dtype and 2 compute-dtype hidden-sized
      ones of the batch slice (the FFN's output and input gradient assembled, the attention's output).
      The attention and FFN tensors are those of the largest batch slice (MEFTConfig.batch_chunks), plus 2
      more whole-batch stream-dtype tensors when the batch is sliced. With the FFN in 2 slices the attention
      phase is the peak (12 compute-dtype tensors: fitted to the tracker's peak, within 5% on the test shapes).
      With the attention on slices of the batch slice's sequences (MEFTConfig.attention_chunks) those 12 and the
      mask are the largest attention slice's, and 1 stream-dtype and 1 compute-dtype whole-slice tensor more
      hold the attention's input gradient and output gradient (fitted: within 3% on the test shapes).
      Stream arithmetic (backward's split; the forward's combine makes its outputs in its inputs' storage
      and keeps less): 2 * INT64 + 2 * s bytes per hidden element (decoders: 2 compute-dtype tensors more) and
      one int64 and one stream-dtype temporary of at most chunk_size(h, 2 * batch_chunks) elements (coupling.py).
      A fit to the tracker's peak (within 3% on the test shapes), not a list of tensors: there the peak holds the
      remainder unpacking's int64 temporary and seven stream-dtype hidden-sized tensors beside the two states.
      With the batch sliced, this phase is the peak at small widths.
    - LoRA + checkpointing keeps each trained layer's input and recomputes one layer (12 hidden-sized and
      2 FFN-sized tensors).
    - LoRA and full keep every layer's graph (per layer 9 (LoRA) or 10 (full) hidden-sized tensors, one
      FFN-sized, 2 bool dropout masks) and peak at the start of backward (4 hidden-sized + 1 FFN-sized more).
    - A causal-LM loss upcasts the logits: three fp32 B*T*vocab tensors are alive at its backward (fp32 and
      bf16 alike), which ends before the layers' backward starts, so they add to the saved part only.
    """
    tokens = micro_batch * max_seq_length
    h, f, c = tokens * shape.hidden, tokens * shape.ffn, PRECISION_BYTES[precision]
    mask = micro_batch * max_seq_length**2  # the 4-D attention mask: kept as bool, used as a float copy
    if method == "meft":
        meft = MEFTConfig()
        differing = _unmeasured(meft.to_dict())
        if differing:  # the counts below would silently describe another backward
            raise RuntimeError(f"MEFTConfig's defaults changed ({differing}); the planner's MEFT activation counts "
                               f"were measured for {MEASURED_MEFT_DEFAULTS}: measure again (tests/test_plan.py).")
        s = meft.torch_stream_dtype_for(PRECISION_DTYPES[precision]).itemsize
        saved = 2 * INT64 * h + trained_layers * remainder_bytes(h, meft) + mask
        # F and G run on slices of the batch (MEFTConfig.batch_chunks): the recomputed block's tensors are the
        # largest slice's; its output and input gradient are assembled in whole-batch tensors (2 more).
        chunks = meft.batch_chunks if batch_chunks is None else batch_chunks
        slices = len(batch_slices(micro_batch, chunks))
        part = math.ceil(micro_batch / slices) / micro_batch
        whole = 6 if slices == 1 else 8
        # The FFN runs on token slices of the batch slice (MEFTConfig.ffn_chunks): its tensors are the largest
        # token slice's; the attention's output and the FFN's output and input gradient stay whole-slice.
        sliced_tokens = math.ceil(micro_batch / slices) * max_seq_length
        pieces = len(batch_slices(sliced_tokens, meft.ffn_chunks if ffn_chunks is None else ffn_chunks))
        ffn_part = part * math.ceil(sliced_tokens / pieces) / sliced_tokens
        ffn_whole = part * (s + 2 * c) * h if pieces > 1 else 0
        # The attention runs on slices of the batch slice's sequences (MEFTConfig.attention_chunks).
        sequences = math.ceil(micro_batch / slices)
        attention_slices = len(batch_slices(
            sequences, meft.attention_chunks if attention_chunks is None else attention_chunks))
        attention_part = part * math.ceil(sequences / attention_slices) / sequences
        attention_whole = part * (s + c) * h if attention_slices > 1 else 0
        working = max(whole * s * h + attention_whole + attention_part * (12 * c * h + c * mask),
                      whole * s * h + ffn_whole + ffn_part * (3 * c * h + 3 * c * f),
                      2 * INT64 * h + 2 * s * h + (2 * c * h if shape.model_type in DECODER_ONLY else 0)
                      + (INT64 + s) * min(h, chunk_size(h, 2 * chunks)))
    elif method == "lora_gc":
        saved = trained_layers * c * h + mask
        working = 12 * c * h + 2 * c * f + c * mask
    else:
        per_layer = (9 if method == "lora" else 10) * c * h + c * f + 2 * h
        saved = trained_layers * per_layer + mask
        working = 4 * c * h + c * f + c * mask
    if task == "causal_lm":
        working = max(working, 12 * tokens * shape.vocab)
    return int(saved + working)


def deepspeed_estimate(total_params: int, largest_module_params: int, stage: int, offload: bool, world: int):
    """DeepSpeed's own per-GPU model-state estimate (every weight trained: meaningful for full fine-tuning only)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 0:
        return None  # DeepSpeed has no estimator without ZeRO
    if stage < 3:
        return estimate_zero2_model_states_mem_needs(total_params, world, 1, cpu_offload=offload)[1]
    return estimate_zero3_model_states_mem_needs(total_params, largest_module_params, world, 1, cpu_offload=offload,
                                                 cpu_offload_params=offload)[1]


DEVICE_COMPONENTS = ("frozen", "trainable", "grads", "optimizer", "activations", "gathered")


def plan_rows(config, *, world_size, max_seq_length, micro_batch, precision, task, num_frozen_layers=None,
              methods=METHODS, batch_chunks=None, attention_chunks=None, ffn_chunks=None):
    """One dict per (method, ZeRO stage, offload) with every component in bytes (num_frozen_layers and the
    *_chunks: MEFT's; None = the family default and MEFTConfig's). Adapters and LoRA have MEFTConfig's default
    adapter_dim (the launcher's)."""
    shape, w, adapter_dim = shape_of(config), PRECISION_BYTES[precision], MEFTConfig().adapter_dim
    frozen_default = num_frozen_layers
    if frozen_default is None and "meft" in methods:
        frozen_default = default_num_frozen_layers(config)
    rows = []
    for method in methods:
        frozen = frozen_default if method == "meft" else 0
        params, largest = meta_model(config, task, method, frozen if method == "meft" else None, adapter_dim)
        total, trainable = sum(n for n, _ in params), sum(n for n, t in params if t)
        activations = activation_bytes(shape, method, micro_batch, max_seq_length, precision, shape.num_layers - frozen,
                                       task, batch_chunks, attention_chunks, ffn_chunks)
        for stage, offload in SETTINGS:
            states = model_states(params, stage, offload, world_size, w)
            # ZeRO-3 gathers a module's weights for its forward/backward (and prefetches the next): 2 modules.
            gathered = states.pop("persistent") + (2 * w * largest if stage == 3 else 0)
            row = dict(method=method, stage=stage, offload=offload, micro_batch=micro_batch, num_frozen_layers=frozen,
                       **(_slices(batch_chunks, attention_chunks, ffn_chunks) if method == "meft" else {}),
                       parameters=total, trainable_parameters=trainable, **states, activations=activations,
                       gathered=gathered)
            row["device"] = sum(row[k] for k in DEVICE_COMPONENTS)
            row["deepspeed_estimate"] = (deepspeed_estimate(total, largest, stage, offload, world_size)
                                         if method == "full" else None)
            rows.append(row)
    return rows


# The slices the recommendation turns to when the requested ones do not fit (docs/benchmarks.md, section 0: at the
# RoBERTa-base shape 0.51x LoRA+GC's peak at 12 layers against the default's 0.79x; at OPT-1.3B widths, 4 layers,
# 4 x 512, 2,412 ops per step against the default's 1,344, fewer than two half micro-batches' 2,688).
SLICED = dict(attention_chunks=4, ffn_chunks=4)


def _slices(batch_chunks=None, attention_chunks=None, ffn_chunks=None) -> dict:
    """MEFT's slice counts, None = MEFTConfig's default."""
    default = MEFTConfig()
    return dict(batch_chunks=default.batch_chunks if batch_chunks is None else batch_chunks,
                attention_chunks=default.attention_chunks if attention_chunks is None else attention_chunks,
                ffn_chunks=default.ffn_chunks if ffn_chunks is None else ffn_chunks)


def recommend(config, budget: int, **run) -> dict | None:
    """The first MEFT setting that fits `budget` bytes per rank, preferring (in this order) the family's
    num_frozen_layers, the requested micro-batch (halved down to 1; gradient accumulation keeps the batch),
    the requested slices before attention and FFN in (at least) SLICED's (fewer activations for more ops, fewer
    than a halved micro-batch adds), a lower ZeRO stage and no offload (less communication). None when nothing
    fits."""
    shape = shape_of(config)
    first = default_num_frozen_layers(config)
    requested = run.pop("micro_batch")
    slices = _slices(*(run.pop(name, None) for name in ("batch_chunks", "attention_chunks", "ffn_chunks")))
    sliced = {**slices, **{k: max(v, slices[k]) for k, v in SLICED.items()}}
    for frozen in range(first, shape.num_layers):
        micro = requested
        while micro >= 1:
            for chunks in (slices, sliced) if sliced != slices else (slices,):
                rows = plan_rows(config, **run, **chunks, micro_batch=micro, num_frozen_layers=frozen,
                                 methods=("meft",))
                fitting = [r for r in rows if r["device"] <= budget]
                if fitting:
                    return dict(fitting[0], num_reversible_layers=shape.num_layers - frozen)
            micro //= 2
    return None


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def summary(best: dict | None, budget: int) -> str:
    """One line: the recommended setting."""
    if best is None:
        return f"plan: no MEFT setting fits {gib(budget)} GiB per rank; use more ranks or a shorter sequence"
    offload = "offload" if best["offload"] else "no offload"
    chunks = ", ".join(f"{name}={best[name]}" for name in ("batch_chunks", "attention_chunks", "ffn_chunks"))
    return (f"plan: meft, ZeRO-{best['stage']}, {offload}, num_frozen_layers={best['num_frozen_layers']}, "
            f"num_reversible_layers={best['num_reversible_layers']} (all), micro-batch {best['micro_batch']}, "
            f"{chunks}: {gib(best['device'])} of {gib(budget)} GiB per rank")


def run_line(config, *, method: str, stage: int, offload: bool, world_size: int, max_seq_length: int,
             micro_batch: int, precision: str, task: str, meft_config: dict | None = None) -> str:
    """One line: what the plan predicts per rank for a run's own setting (the launcher logs it at start).

    meft_config: the run's MEFTConfig as a dict (method "meft"); its num_frozen_layers is used, and a setting
    the activation counts were not measured for (MEASURED_MEFT_DEFAULTS) is said instead of a wrong figure.
    """
    frozen = None
    if method == "meft":
        differing = _unmeasured(meft_config)
        if differing:
            return (f"plan: not available for this MEFT setting ({differing}); python -m meft_ds.plan models "
                    f"MEFTConfig's defaults only")
        frozen = meft_config["num_frozen_layers"]
    chunks = {name: meft_config.get(name) if method == "meft" else None
              for name in ("batch_chunks", "attention_chunks", "ffn_chunks")}
    row = next(r for r in plan_rows(config, world_size=world_size, max_seq_length=max_seq_length,
                                    micro_batch=micro_batch, precision=precision, task=task,
                                    num_frozen_layers=frozen, methods=(method,), **chunks)
               if (r["stage"], r["offload"]) == (stage, offload))
    return (f"plan: {method}, ZeRO-{stage}{' offload' if offload else ''}, micro-batch {micro_batch} x "
            f"{max_seq_length} tokens: about {format_bytes(row['device'])} per rank (weights "
            f"{format_bytes(row['frozen'] + row['trainable'])}, gradients {format_bytes(row['grads'])}, optimizer "
            f"{format_bytes(row['optimizer'])}, activations {format_bytes(row['activations'])}, ZeRO-3 gathered "
            f"{format_bytes(row['gathered'])}; host {format_bytes(row['host'])}); "
            "process overhead not included")


def format_table(rows, budget: int) -> str:
    head = ("method", "zero", "offload", "frozen", "trainable", "grads", "optim", "activ", "gathered", "device",
            "host", "fits", "ds_est")
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for r in rows:
        cells = (r["method"], str(r["stage"]), "yes" if r["offload"] else "no",
                 *(gib(r[k]) for k in DEVICE_COMPONENTS), gib(r["device"]), gib(r["host"]),
                 "yes" if r["device"] <= budget else "NO", gib(r["deepspeed_estimate"]))
        lines.append("  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meft_ds.plan",
        description="Per-rank GPU memory of MEFT, LoRA, LoRA + checkpointing and full fine-tuning under ZeRO 0-3, "
                    "from the model config only (no weights), and a MEFT setting that fits.")
    # Each flag also takes the trainer's name for the same setting, so a run's flags can be pasted.
    parser.add_argument("--model", "--model_name_or_path", required=True,
                        help="Hub name, model directory or config.json.")
    parser.add_argument("--world_size", type=int, default=1, help="Number of ranks (GPUs).")
    parser.add_argument("--gpu_memory", default="80GiB", help="Memory of one GPU, e.g. 80GiB, 40GB, 24576MiB.")
    parser.add_argument("--reserve", default=None, help="Held back from --gpu_memory for what the plan does not "
                        "model (CUDA context, communication buffers, fragmentation); default 10%% of it.")
    parser.add_argument("--max_seq_length", "--seq_len", type=int, default=2048, help="The run's --max_seq_length: "
                        "tokens per sequence, every batch taken as padded to it (the worst case).")
    parser.add_argument("--micro_batch", "--per_device_train_batch_size", type=int, default=4,
                        help="Sequences per rank and micro-step.")
    parser.add_argument("--precision", default="bf16", choices=tuple(PRECISION_BYTES))
    parser.add_argument("--batch_chunks", type=int, default=MEFTConfig().batch_chunks,
                        help="MEFT's batch slices in training (MEFTConfig.batch_chunks): fewer activations, more time.")
    parser.add_argument("--attention_chunks", type=int, default=MEFTConfig().attention_chunks,
                        help="MEFT's attention slices (MEFTConfig.attention_chunks): fewer activations, more ops.")
    parser.add_argument("--ffn_chunks", type=int, default=MEFTConfig().ffn_chunks,
                        help="MEFT's FFN token slices (MEFTConfig.ffn_chunks): fewer activations, more ops.")
    parser.add_argument("--task", default=None, choices=("causal_lm", "classification"),
                        help="Head and loss; default causal_lm for decoder-only models, else classification.")
    parser.add_argument("--json", action="store_true", help="Print the rows and the recommendation as JSON.")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        gpu_memory = parse_bytes(args.gpu_memory)
        reserve = gpu_memory // 10 if args.reserve is None else parse_bytes(args.reserve)
        for name in ("world_size", "max_seq_length", "micro_batch", "batch_chunks", "attention_chunks", "ffn_chunks"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} {getattr(args, name)} must be at least 1.")
        if reserve >= gpu_memory:
            raise ValueError(f"--reserve {args.reserve} leaves nothing of --gpu_memory {args.gpu_memory}.")
        config = load_config(args.model)
        if config.model_type not in REGISTRY:
            raise ValueError(f"meft_ds cannot convert model_type={config.model_type!r}; supported: {sorted(REGISTRY)}.")
    except (ValueError, OSError) as error:
        parser.exit(2, "error: " + " ".join(str(error).split()) + "\n")  # one line, also for multi-line library errors
    task = args.task or ("causal_lm" if config.model_type in DECODER_ONLY else "classification")
    run = dict(world_size=args.world_size, max_seq_length=args.max_seq_length, precision=args.precision, task=task,
               batch_chunks=args.batch_chunks, attention_chunks=args.attention_chunks, ffn_chunks=args.ffn_chunks)
    budget = gpu_memory - reserve
    rows = plan_rows(config, **run, micro_batch=args.micro_batch)
    best = recommend(config, budget, **run, micro_batch=args.micro_batch)
    if args.json:
        print(json.dumps(dict(rows=rows, recommended=best, budget=budget, reserve=reserve), indent=1))
        return 0
    shape = shape_of(config)
    print(f"model: {shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden}, FFN {shape.ffn}, "
          f"{shape.heads} heads, vocab {shape.vocab}; {rows[-1]['parameters']:,} parameters")
    print(f"run: {args.world_size} rank(s), {args.precision}, micro-batch {args.micro_batch} x {args.max_seq_length} "
          f"tokens, task {task}; MEFT: MEFTConfig defaults but batch_chunks {args.batch_chunks}, attention_chunks "
          f"{args.attention_chunks}, ffn_chunks {args.ffn_chunks}, num_frozen_layers {rows[0]['num_frozen_layers']}, "
          f"{rows[0]['trainable_parameters']:,} trainable; LoRA r={MEFTConfig().adapter_dim}: "
          f"{next(r for r in rows if r['method'] == 'lora')['trainable_parameters']:,} trainable")
    print(f"GiB per rank. budget {gib(budget)} = --gpu_memory {gib(gpu_memory)} - {gib(reserve)} held back for process "
          "overhead (CUDA context, communication buffers, fragmentation: not modelled, --reserve)")
    print(format_table(rows, budget))
    print("frozen/trainable: weights this rank holds (ZeRO-3: its slices); gathered: ZeRO-3's whole small weights "
          "and two gathered modules; host: offloaded; ds_est: DeepSpeed's model-state estimate (full only)")
    print(summary(best, budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
