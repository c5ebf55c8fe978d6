"""The benchmark (benchmarks/bench_memory.py) on a tiny RoBERTa, in-process: properties that can fail.

- MEFT reversible saved bytes are flat in depth, the vanilla (cached) MEFT's grow with it;
- reversible MEFT saves less than LoRA and less than LoRA + checkpointing;
- LoRA's frozen lower layers save nothing (K of N frozen == LoRA on N-K layers, exactly);
- the JSON, markdown and PNG outputs hold every method.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks.bench_memory import BenchConfig, measure_saved, run_benchmark  # noqa: E402
from benchmarks.setups import Method  # noqa: E402

TINY = dict(shape="tiny-roberta", layers=4, batch_size=2, seq_len=32, depths=(2, 4, 8), seq_lens=(16, 32),
            timing_rounds=1, count_steps=2, threads=1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(**TINY, sections=("count", "timing", "depth"), out_dir=str(out_dir))
    torch.manual_seed(0)
    return run_benchmark(cfg, ["--test"]), out_dir, cfg


def _series(results, name):
    return results["depth"]["series"][name]["saved_bytes"]


def test_reversible_flat_in_depth_and_vanilla_grows(bench):
    results, _, cfg = bench
    for name in ("meft1", "meft2", "meft3", "meft1+frozen"):
        saved = _series(results, name)
        assert max(saved) == min(saved), f"{name} saved bytes change with depth {cfg.depths}: {saved}"
    vanilla = _series(results, "meft1_vanilla")
    assert vanilla[2] > 3 * vanilla[0], f"vanilla MEFT should grow ~linearly from 2 to 8 layers: {vanilla}"
    steps = [b - a for a, b in zip(vanilla, vanilla[1:])]
    depth_steps = [b - a for a, b in zip(cfg.depths, cfg.depths[1:])]
    assert steps[0] / depth_steps[0] == steps[1] / depth_steps[1], "vanilla growth should be exactly linear"


def test_reversible_saves_less_than_lora_and_checkpointing(bench):
    results, _, _ = bench
    count = results["count"]
    for name in ("meft1", "meft2", "meft3"):
        assert count[name]["saved_bytes"] < count["lora"]["saved_bytes"] / 10
        assert count[name]["saved_bytes"] < count["lora_gc"]["saved_bytes"]
        assert count[name]["saved_bytes"] < count["meft1_vanilla"]["saved_bytes"] / 10
    assert count["lora_gc"]["saved_bytes"] < count["lora"]["saved_bytes"] < count["full"]["saved_bytes"]
    # What reversible MEFT keeps is the reversible stack's (top streams, mask) plus the head's.
    assert count["meft1"]["breakdown"].get("transformer layers", 0) == 0
    # Its peak includes one sub-block's recomputation in backward: more than it holds after forward.
    assert count["meft1"]["peak_saved_bytes"] > count["meft1"]["saved_bytes"]


def test_frozen_lora_layers_save_nothing():
    """LoRA with K of N layers frozen saves exactly what LoRA on N-K layers saves; same for the GC baseline."""
    cfg = BenchConfig(**TINY, sections=("count",))
    names = ("lora", "lora_gc", "meft1_vanilla")
    frozen = measure_saved(cfg, "tiny-roberta", 4, 32, 2, [Method(name, 1) for name in names])
    fewer = measure_saved(cfg, "tiny-roberta", 3, 32, 2, [Method(name) for name in names])
    assert frozen["lora+frozen1"]["saved_bytes"] == fewer["lora"]["saved_bytes"]
    assert frozen["lora_gc+frozen1"]["saved_bytes"] == fewer["lora_gc"]["saved_bytes"]
    assert frozen["meft1_vanilla+frozen1"]["saved_bytes"] == fewer["meft1_vanilla"]["saved_bytes"]
    # Hugging Face's defaults (embedding output requires grad, frozen layers checkpointed) cost more.
    naive = measure_saved(cfg, "tiny-roberta", 4, 32, 2, [Method("lora_gc_naive", 1)])
    assert naive["lora_gc_naive+frozen1"]["saved_bytes"] > frozen["lora_gc+frozen1"]["saved_bytes"]


def test_peak_tensor_memory_flat_for_reversible_and_growing_for_checkpointing(bench):
    results, _, cfg = bench
    meft = results["depth"]["series"]["meft1"]["peak_tensor_bytes"]
    checkpointed = results["depth"]["series"]["lora_gc"]["peak_tensor_bytes"]
    # Reversible: only the adapters' weight gradients grow with depth (the peak is in the lowest layer's
    # backward, when all of them exist): 2 adapters per MEFT1 layer of (64*8 + 8 + 8*64 + 64) fp32 weights.
    adapter_grad_bytes_per_layer = 2 * (64 * 8 + 8 + 8 * 64 + 64) * 4
    growth = meft[-1] - meft[0]
    assert growth <= (cfg.depths[-1] - cfg.depths[0]) * adapter_grad_bytes_per_layer, \
        f"meft1 peak tensor memory grows with depth {cfg.depths} by more than its adapter gradients: {meft}"
    assert checkpointed[-1] > checkpointed[0] + (cfg.depths[-1] - cfg.depths[0]) * 2 * 32 * 64 * 4 * 0.9
    count = results["count"]
    for label, r in count.items():  # the peak includes what is held after forward
        assert r["peak_tensor_bytes"] >= r["saved_bytes"], label
    assert count["meft1"]["peak_tensor_bytes"] < count["meft1_vanilla"]["peak_tensor_bytes"]


def test_keep_going_records_failures(tmp_path):
    """With --keep_going a method that cannot run is reported, the others still are."""
    cfg = BenchConfig(**{**TINY, "layers": 2}, frozen_fraction=0.9, sections=("count", "timing"),
                      keep_going=True, out_dir=str(tmp_path))
    results = run_benchmark(cfg, ["--test"])
    assert "error" in results["count"]["lora+frozen2"] and "saved_bytes" in results["count"]["lora"]
    assert "error" in results["timing"]["meft1+frozen2"] and "time_ratio_vs_lora" in results["timing"]["meft1"]
    assert "FAILED" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="no trainable layer"):
        run_benchmark(BenchConfig(**{**TINY, "layers": 2}, frozen_fraction=0.9, sections=("count",)), write=False)


def test_outputs_hold_every_method(bench):
    results, out_dir, cfg = bench
    expected = {m.label for m in cfg.method_list(cfg.main_layers)}
    assert {"full", "lora", "lora_gc", "meft1_vanilla", "meft1", "meft2", "meft3"} <= expected
    data = json.loads((out_dir / "results.json").read_text())
    assert set(data["methods"]) == expected
    for section in ("count", "timing"):
        assert set(data[section]) == expected, section
    assert set(data["depth"]["series"]) == {label.split("+")[0] + ("+frozen" if "+" in label else "")
                                           for label in expected}
    assert all(r["time_ratio_vs_lora"] > 0 for r in data["timing"].values())
    assert data["timing"]["lora"]["time_ratio_vs_lora"] == 1.0
    markdown = (out_dir / "results.md").read_text()
    assert all(f"| {label} |" in markdown for label in expected)
    png = (out_dir / "activation_memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_split_layer_recompute_lowers_the_peak():
    """Recomputing MEFT1's F (a whole layer) as attention, then FFN, keeps the attention maps out of the FFN
    backward: the peak tensor memory of a step is lower than with the layer recomputed in one piece."""
    from benchmarks.measure import count_saved
    from benchmarks.setups import base_model, make_batch, make_config
    from meft_ds import MEFTConfig, make_reversible

    config = make_config("tiny-roberta", 2)
    peaks = {}
    for split in (True, False):
        model = make_reversible(base_model(config, seed=0), MEFTConfig(variant="meft1", adapter_dim=8,
                                                                      split_layer_recompute=split))
        batch = make_batch(config, batch_size=2, seq_len=32, seed=0, padding=True)
        peaks[split] = count_saved(model, batch, steps=1)["peak_tensor_bytes"]
    assert peaks[True] < peaks[False], peaks


def test_batch_chunks_lower_the_peak():
    """F and G on slices of the batch: the recomputed block's graph is that much smaller, and so is the peak
    tensor memory of a step (default 4 slices against 1)."""
    from benchmarks.measure import count_saved
    from benchmarks.setups import base_model, make_batch, make_config
    from meft_ds import MEFTConfig, make_reversible

    config = make_config("tiny-roberta", 2)
    peaks = {}
    for chunks in (1, 4):
        model = make_reversible(base_model(config, seed=0), MEFTConfig(variant="meft1", adapter_dim=8,
                                                                      batch_chunks=chunks))
        batch = make_batch(config, batch_size=4, seq_len=32, seed=0, padding=True)
        peaks[chunks] = count_saved(model, batch, steps=1)["peak_tensor_bytes"]
    assert peaks[4] < 0.9 * peaks[1], peaks


def test_profile_step_prints_a_profile_per_method(tmp_path):
    """benchmarks/profile_step.py (where a step's time goes; its H200 output is in benchmarks/results) on the CPU."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.profile_step", "--device", "cpu", "--shape", "tiny-opt",
                           "--layers", "2", "--batch_size", "2", "--seq_len", "16", "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    for method in ("lora_gc", "meft1_exact"):
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"== {method}: wall "))
        assert float(line.split("wall ")[1].split(" ms")[0]) > 0
    assert "Self CPU time total" in done.stdout
    ops = {m: int(next(x for x in done.stdout.splitlines() if x.startswith(f"== {m}: compute ops ")).split()[4])
           for m in ("lora_gc", "meft1_exact")}
    assert 0 < ops["lora_gc"] < ops["meft1_exact"], ops  # the exact stream arithmetic adds ops of its own
    assert "meft_ds/coupling.py:" in done.stdout  # ... and they are attributed to its source lines
    methods = json.loads((tmp_path / "p.json").read_text())["methods"]
    by_file = {m: r["ops_and_host_ms_by_file"] for m, r in methods.items()}
    for method, files in by_file.items():  # every counted op is in one file's row, with a time
        assert sum(n for n, _ in files.values()) == ops[method], (method, files)
        assert all(ms >= 0 for _, ms in files.values()) and sum(ms for _, ms in files.values()) > 0
    assert "meft_ds/coupling.py" in by_file["meft1_exact"] and "meft_ds/coupling.py" not in by_file["lora_gc"]
