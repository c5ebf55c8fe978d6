"""Activation memory and step time of MEFT against full fine-tuning, LoRA and LoRA + checkpointing.

Run from the repository root (the results of these commands are in docs/benchmarks.md):

    # A few minutes on a 2-core CPU: RoBERTa-base width, 4 layers, 4 x 128 tokens, depths 2/4/8.
    .venv/bin/python -m benchmarks.bench_memory --quick --out_dir output/bench_quick

    # RoBERTa-base shape, every section but shapes, on this CPU (about an hour).
    .venv/bin/python -m benchmarks.bench_memory --shape roberta-base --layers 12 --batch_size 8 \\
        --seq_len 128 --depths 6,12,24,48 --seq_lens 64,128,256,512 --count_steps 1 --out_dir output/bench_cpu

    # CUDA peak memory at OPT-1.3B size, 4 x 512 tokens: the peak_memory section of scripts/gpu_check.sh

Sections (`--sections`, comma separated):
  count   at the main shape, per method: bytes saved for backward and their breakdown by part of the
          model, peak tensor memory of forward + backward and what is alive at that peak (measure.py);
  timing  every method built in this one process, steps interleaved round-robin (order rotated each
          round); step time and throughput as the median per-round ratio to LoRA (CPU time on CPU);
  peak    peak memory per method over the built model: CPU resident set in a fresh process per method
          (forked from a pre-importing fork server), CUDA allocator counters on a GPU;
  depth   saved bytes and peak tensor memory vs number of layers (--depths); the PNG plot;
  seq     the same vs sequence length (--seq_lens);
  shapes  other shapes (--shapes) at --shapes_seq_len, measured at 2 and 4 layers: saved bytes
          extrapolated linearly to the shape's real depth (they are exactly linear in depth from 2
          layers up, as the depth section shows), peaks reported as measured.

Methods (setups.py): full, lora, lora_gc, meft1_vanilla, meft1/2/3 (float streams), meft1_exact, and
with the lowest round(--frozen_fraction x layers) layers frozen: lora, lora_gc, lora_gc_naive,
meft1_vanilla, meft1. Outputs in --out_dir: results.json, results.md, activation_memory.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import os
import multiprocessing
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meft_ds.cli_args import add_flags

from .measure import count_saved, make_optimizer, peak_memory, state_bytes, train_step
from .setups import (DEFAULT_FROZEN_METHODS, DEFAULT_METHODS, METHODS, SHAPES, Method, base_model, build_method,
                     make_batch, make_config, share_frozen_copy, trainable_parameters)

SECTIONS = ("count", "timing", "peak", "depth", "seq", "shapes")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


@dataclass
class BenchConfig:
    """One benchmark run. Every field is a command-line flag of the same name."""

    shape: str = field(default="roberta-base", metadata={"help": f"Model shape: {sorted(SHAPES)}."})
    layers: int | None = field(default=None, metadata={"help": "Depth of the main shape (default: the shape's own)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence (padded batch: see --padding)."})
    padding: bool = field(default=True, metadata={
        "help": "Random lengths in [seq_len/2, seq_len] with a padding mask."})
    attn: str = field(default="sdpa", metadata={"help": "Attention implementation: sdpa | eager."})
    attention_dropout: float | None = field(default=None, metadata={
        "help": "Attention-probability dropout (default: the shape's, 0.1 for RoBERTa/OPT... see setups.make_config)."})
    dtype: str = field(default="float32", metadata={"help": "Weight dtype: float32 | bfloat16 | float16."})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda."})
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads (CPU)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and the batch."})
    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={"help": "Methods without frozen layers."})
    frozen_methods: tuple[str, ...] = field(default=DEFAULT_FROZEN_METHODS, metadata={
        "help": "Methods also run with frozen lower layers."})
    frozen_fraction: float = field(default=0.25, metadata={
        "help": "Frozen layers = round(fraction x layers), at least 1."})
    depths: tuple[int, ...] = field(default=(6, 12, 24, 48), metadata={"help": "Depths of the depth section."})
    seq_lens: tuple[int, ...] = field(default=(64, 128, 256, 512), metadata={
        "help": "Sequence lengths of the seq section."})
    shapes: tuple[str, ...] = field(default=("roberta-large", "opt-1.3b", "llama-1.1b"), metadata={
        "help": "Shapes of the shapes section."})
    shapes_seq_len: int = field(default=512, metadata={"help": "Sequence length of the shapes section."})
    shapes_batch_size: int = field(default=1, metadata={"help": "Batch size of the shapes section."})
    timing_rounds: int = field(default=5, metadata={"help": "Timed rounds (after one warm-up round)."})
    count_steps: int = field(default=2, metadata={"help": "Steps per saved-bytes count (must agree)."})
    peak_steps: int = field(default=3, metadata={"help": "Steps per peak-memory measurement."})
    peak_in_process: bool = field(default=False, metadata={"help": "CPU: measure peak memory in this process "
                                  "(as on CUDA) instead of a fresh process per method; less exact."})
    sections: tuple[str, ...] = field(default=SECTIONS[:5], metadata={"help": f"Subset of {SECTIONS}."})
    keep_going: bool = field(default=False, metadata={"help": "Record a method's error and go on instead of "
                             "stopping (for one-shot GPU runs); errors are listed in the report."})
    out_dir: str = field(default="output/bench", metadata={"help": "Where results.json/.md and the PNG go."})

    def __post_init__(self):
        if self.shape not in SHAPES or any(s not in SHAPES for s in self.shapes):
            raise ValueError(f"unknown shape in {self.shape!r} / {self.shapes}; known: {sorted(SHAPES)}")
        if self.attn not in ("sdpa", "eager"):
            raise ValueError(f"attn={self.attn!r}: use sdpa or eager")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {list(DTYPES)}")
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; use a subset of {SECTIONS}")
        if not 0.0 <= self.frozen_fraction < 1.0:
            raise ValueError(f"frozen_fraction={self.frozen_fraction} must be in [0, 1)")
        unknown = (set(self.methods) | set(self.frozen_methods)) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
        if "lora" not in self.methods and {"timing", "count"} & set(self.sections):
            raise ValueError("ratios are taken to LoRA: keep 'lora' in --methods")

    @property
    def main_layers(self) -> int:
        return self.layers if self.layers is not None else SHAPES[self.shape]["num_hidden_layers"]

    def frozen_count(self, num_layers: int) -> int:
        return max(1, int(self.frozen_fraction * num_layers + 0.5)) if self.frozen_fraction > 0 else 0

    def method_list(self, num_layers: int) -> list[Method]:
        frozen = self.frozen_count(num_layers)
        methods = [Method(name) for name in self.methods]
        if frozen:
            methods += [Method(name, frozen) for name in self.frozen_methods]
        return methods


QUICK = dict(shape="roberta-base", layers=4, batch_size=4, seq_len=128, depths=(2, 4, 8), seq_lens=(64, 128, 256),
             timing_rounds=3, peak_steps=2, sections=("count", "timing", "peak", "depth", "seq"),
             out_dir="output/bench_quick")


# -- sections ------------------------------------------------------------------------------------------------
def _device(cfg: BenchConfig) -> torch.device:
    return torch.device(cfg.device)


def _model_for(base, method: Method):
    """`method` built on a copy of `base`; frozen-weight methods share its weight storage."""
    copied = copy.deepcopy(base) if method.name == "full" else share_frozen_copy(base)
    return build_method(copied, method)


# (shape, layers, seq_len, batch_size, method label, cfg fields that matter) -> count_saved result.
_SAVED_CACHE: dict[tuple, dict] = {}


def measure_saved(cfg: BenchConfig, shape: str, num_layers: int, seq_len: int, batch_size: int,
                  methods: list[Method], details: bool = False) -> dict:
    """label -> saved-bytes result for `methods` at one shape/depth/sequence length.

    Results are cached for the run, so the main shape is not measured again by the depth/seq sections.
    """
    settings = (cfg.attn, cfg.attention_dropout, cfg.dtype, cfg.device, cfg.padding, cfg.seed, cfg.count_steps)
    keys = {m.label: (shape, num_layers, seq_len, batch_size, m.label, settings) for m in methods}
    missing = [m for m in methods if keys[m.label] not in _SAVED_CACHE]
    if missing:
        config = make_config(shape, num_layers, cfg.attn, cfg.attention_dropout)
        base = base_model(config, cfg.seed, DTYPES[cfg.dtype], _device(cfg))
        batch = make_batch(config, batch_size, seq_len, cfg.seed, cfg.padding, _device(cfg))
        for method in missing:
            with _guard(cfg, method, f"saved bytes at {num_layers} layers x {seq_len} tokens") as failure:
                model = _model_for(base, method)
                result = count_saved(model, batch, cfg.count_steps)
                result["trainable_params"] = sum(p.numel() for p in trainable_parameters(model))
                _SAVED_CACHE[keys[method.label]] = result
                del model
            if failure:
                _SAVED_CACHE[keys[method.label]] = failure
            gc.collect()
    results = {}
    for method in methods:
        result = _SAVED_CACHE[keys[method.label]]
        results[method.label] = result if details or "error" in result else {
            k: result[k] for k in ("saved_bytes", "peak_saved_bytes", "peak_tensor_bytes")}
    return results


@contextlib.contextmanager
def _guard(cfg: BenchConfig, method: Method, what: str):
    """With --keep_going, turn an exception into {"error": ...} (yielded dict, filled in) and go on."""
    failure: dict = {}
    try:
        yield failure
    except Exception as error:  # noqa: BLE001 - any failure of one method must not lose the others' results
        if not cfg.keep_going:
            raise
        failure["error"] = f"{what}: {type(error).__name__}: {error}"
        _log(f"{method.label} FAILED ({failure['error']})")
        if cfg.device == "cuda":
            torch.cuda.empty_cache()


def section_timing(cfg: BenchConfig) -> dict:
    """Interleaved steps of every method in one process; median per-round ratios to LoRA."""
    config = make_config(cfg.shape, cfg.main_layers, cfg.attn, cfg.attention_dropout)
    base = base_model(config, cfg.seed, DTYPES[cfg.dtype], _device(cfg))
    batch = make_batch(config, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.padding, _device(cfg))
    failed = {}
    models = {}
    for method in cfg.method_list(cfg.main_layers):
        with _guard(cfg, method, "build") as failure:
            models[method.label] = _model_for(base, method).train()
        if failure:
            failed[method.label] = failure
    optimizers = {label: make_optimizer(model) for label, model in models.items()}
    labels = list(models)
    times = {label: [] for label in labels}
    for round_index in range(1 + cfg.timing_rounds):  # round 0 warms up (allocations, AdamW state)
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            if label in failed:
                continue
            with _guard(cfg, Method(label), "timed step") as failure:
                phases = train_step(models[label], optimizers[label], batch)
                if round_index > 0:
                    times[label].append(phases)
            if failure:
                failed[label] = failure
                del models[label], optimizers[label]
    if "lora" in failed:
        return failed  # no reference to take ratios to
    labels = [label for label in labels if label not in failed]
    tokens = cfg.batch_size * cfg.seq_len
    # On CPU the ratios use process CPU time (robust to other jobs on a shared machine); on CUDA, wall time.
    clock = "_cpu_s" if cfg.device == "cpu" else "_s"
    out = {}
    for label in labels:
        med = {key: statistics.median(t[key] for t in times[label]) for key in times[label][0]}
        ratios = [t["step" + clock] / ref["step" + clock] for t, ref in zip(times[label], times["lora"])]
        wall_ratios = [t["step_s"] / ref["step_s"] for t, ref in zip(times[label], times["lora"])]
        out[label] = dict(
            **med, clock="process CPU time" if clock == "_cpu_s" else "wall clock",
            time_ratio_vs_lora=statistics.median(ratios), time_ratio_min=min(ratios), time_ratio_max=max(ratios),
            wall_time_ratio_vs_lora=statistics.median(wall_ratios),
            tokens_per_s=tokens / med["step" + clock], throughput_ratio_vs_lora=1.0 / statistics.median(ratios),
            steps=len(ratios),
        )
    return {**out, **failed}


def section_peak(cfg: BenchConfig) -> dict:
    """Peak memory per method: a fresh process per method on CPU; on CUDA in this process, where the
    allocator's counters are exact whatever ran before (the methods share one copy of the frozen weights)."""
    methods = cfg.method_list(cfg.main_layers)
    if cfg.device == "cpu" and not cfg.peak_in_process:
        return _peak_in_fresh_processes(cfg, methods)
    config = make_config(cfg.shape, cfg.main_layers, cfg.attn, cfg.attention_dropout)
    base = base_model(config, cfg.seed, DTYPES[cfg.dtype], _device(cfg))
    batch = make_batch(config, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.padding, _device(cfg))
    out = {}
    for method in methods:
        with _guard(cfg, method, "peak memory") as failure:
            model = _model_for(base, method)
            out[method.label] = dict(peak_memory(model, batch, cfg.peak_steps), grad_and_adam_bytes=state_bytes(model),
                                     source_detail="in this process")
            del model
        if failure:
            out[method.label] = failure
        gc.collect()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    return out


def peak_worker(cfg: BenchConfig, method: Method) -> dict:
    """Peak memory of one method, built from scratch (on CPU: the body of one fresh process)."""
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    config = make_config(cfg.shape, cfg.main_layers, cfg.attn, cfg.attention_dropout)
    model = build_method(base_model(config, cfg.seed, DTYPES[cfg.dtype], _device(cfg)), method)
    batch = make_batch(config, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.padding, _device(cfg))
    return dict(peak_memory(model, batch, cfg.peak_steps), grad_and_adam_bytes=state_bytes(model))


def _peak_in_fresh_processes(cfg: BenchConfig, methods: list[Method]) -> dict:
    """One new process per method, forked from a fork server that has imported torch/transformers/peft.

    Forking from a small pre-importing server saves the import time of a new interpreter per method;
    the child still starts without any model, batch or allocator history of this process.
    """
    # Read by glibc when the fork server starts: tensors >= 128 KiB get their own mapping and go back
    # to the OS when freed, so the resident set follows the live tensors, not the heap's high-water mark.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "benchmarks.setups", "benchmarks.measure"])
    out = {}
    with context.Pool(1, maxtasksperchild=1) as pool:
        for method in methods:
            with _guard(cfg, method, "peak memory") as failure:
                result = pool.apply(peak_worker, (cfg, method))
                out[method.label] = dict(result, source_detail="fresh process per method")
            if failure:
                out[method.label] = failure
    return out


def section_depth(cfg: BenchConfig) -> dict:
    by_depth = {}
    for depth in cfg.depths:
        by_depth[depth] = measure_saved(cfg, cfg.shape, depth, cfg.seq_len, cfg.batch_size, cfg.method_list(depth))
        _log(f"depth {depth}: {_summary(by_depth[depth])}")
    return _pivot(by_depth, "depths")


def section_seq(cfg: BenchConfig) -> dict:
    by_seq = {}
    methods = cfg.method_list(cfg.main_layers)
    for seq_len in cfg.seq_lens:
        by_seq[seq_len] = measure_saved(cfg, cfg.shape, cfg.main_layers, seq_len, cfg.batch_size, methods)
        _log(f"seq {seq_len}: {_summary(by_seq[seq_len])}")
    return _pivot(by_seq, "seq_lens")


def section_shapes(cfg: BenchConfig) -> dict:
    """Saved bytes at each shape's real depth, from exact measurements at 2 and 4 layers; peaks at 2 and 4."""
    out = {}
    for shape in cfg.shapes:
        depth = SHAPES[shape]["num_hidden_layers"]
        methods = [Method(name) for name in cfg.methods]
        at = {n: measure_saved(cfg, shape, n, cfg.shapes_seq_len, cfg.shapes_batch_size, methods) for n in (2, 4)}
        rows = {}
        for method in methods:
            if "error" in at[2][method.label] or "error" in at[4][method.label]:
                continue
            low, high = at[2][method.label]["saved_bytes"], at[4][method.label]["saved_bytes"]
            per_layer = (high - low) / 2
            # The peak is not extrapolated: which phase of the step sets it (activations early in backward,
            # weight gradients late) can change with depth, so only the measured peaks are reported.
            rows[method.label] = dict(per_layer_bytes=per_layer, constant_bytes=low - 2 * per_layer,
                                      saved_bytes=low + (depth - 2) * per_layer,
                                      peak_tensor_bytes_at={n: at[n][method.label]["peak_tensor_bytes"]
                                                            for n in (2, 4)})
        out[shape] = dict(layers=depth, seq_len=cfg.shapes_seq_len, batch_size=cfg.shapes_batch_size, methods=rows)
        _log(f"shape {shape}: {_summary(rows)}")
    return out


def _pivot(by_x: dict, axis: str) -> dict:
    """{x: {label: result}} -> {axis: [x...], "series": {method: {saved_bytes: [...], num_frozen_layers: [...]}}}.

    A frozen variant keeps one series across x even though its label (+frozenK) changes with depth.
    """
    series: dict[str, dict] = {}
    for results in by_x.values():
        for label, value in results.items():
            name, _, frozen = label.partition("+frozen")
            key = name + ("+frozen" if frozen else "")
            entry = series.setdefault(key, dict(saved_bytes=[], peak_saved_bytes=[], peak_tensor_bytes=[],
                                                num_frozen_layers=[]))
            for metric in ("saved_bytes", "peak_saved_bytes", "peak_tensor_bytes"):
                entry[metric].append(value.get(metric))  # None where the method failed (--keep_going)
            entry["num_frozen_layers"].append(int(frozen or 0))
    return {axis: list(by_x), "series": series}


# -- driver --------------------------------------------------------------------------------------------------
def _summary(results: dict) -> str:
    return ", ".join(f"{label} {r.get('saved_bytes', 0) / MIB:.1f}" for label, r in results.items())


def _log(message: str) -> None:
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _config_to_json(cfg: BenchConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _metadata(cfg: BenchConfig, argv: list[str] | None) -> dict:
    device_name = torch.cuda.get_device_name() if cfg.device == "cuda" else platform.processor() or platform.machine()
    import peft
    import transformers
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(git=commit,
        command=" ".join(["python -m benchmarks.bench_memory", *(argv or [])]),
        date=datetime.date.today().isoformat(),
        device=cfg.device, device_name=device_name, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
        python=platform.python_version(), main_layers=cfg.main_layers,
        frozen_layers_at_main=cfg.frozen_count(cfg.main_layers), config=_config_to_json(cfg),
    )


def run_benchmark(cfg: BenchConfig, argv: list[str] | None = None, write: bool = True) -> dict:
    """Run the selected sections; write results.json, results.md and the PNG to cfg.out_dir; return the results.

    Uses cfg.threads torch threads on CPU and restores the caller's setting afterwards.
    """
    threads = torch.get_num_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    try:
        return _run_sections(cfg, argv, write)
    finally:
        torch.set_num_threads(threads)


def _run_sections(cfg: BenchConfig, argv: list[str] | None, write: bool) -> dict:
    _SAVED_CACHE.clear()
    results = dict(meta=_metadata(cfg, argv))
    main_methods = cfg.method_list(cfg.main_layers)
    results["methods"] = [m.label for m in main_methods]
    if "count" in cfg.sections:
        _log(f"count: {cfg.shape} x {cfg.main_layers} layers, {cfg.batch_size} x {cfg.seq_len} tokens")
        results["count"] = measure_saved(cfg, cfg.shape, cfg.main_layers, cfg.seq_len, cfg.batch_size,
                                         main_methods, details=True)
    if "timing" in cfg.sections:
        _log(f"timing: {cfg.timing_rounds} rounds of {len(main_methods)} methods")
        results["timing"] = section_timing(cfg)
    if "peak" in cfg.sections:
        _log("peak memory: one process per method" if cfg.device == "cpu" and not cfg.peak_in_process
             else "peak memory: in this process")
        results["peak"] = section_peak(cfg)
    if "depth" in cfg.sections:
        results["depth"] = section_depth(cfg)
    if "seq" in cfg.sections:
        results["seq"] = section_seq(cfg)
    if "shapes" in cfg.sections:
        results["shapes"] = section_shapes(cfg)
    if write:
        from .report import write_outputs
        write_outputs(results, Path(cfg.out_dir))
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help=f"Preset for a few CPU minutes: {QUICK}; flags override it.")
    add_flags(parser, BenchConfig, defaults=False)  # None = not given: --quick's value or the field default
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    given = {name: value for name, value in vars(args).items() if value is not None and name != "quick"}
    return BenchConfig(**{**(QUICK if args.quick else {}), **given})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as error:  # BenchConfig's checks: one error line, exit 2, as argparse's own
        parser.error(str(error))
    results = run_benchmark(cfg, argv)
    from .report import markdown
    print(markdown(results))


if __name__ == "__main__":
    main()
