"""Turn bench_memory results into results.json, a markdown report and the activation-memory plot."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from meft_ds.memory import CATEGORIES, format_bytes

MIB = 2**20
STYLE = {  # colour and marker per method, frozen variants dashed
    "full": ("black", "o"), "lora": ("tab:blue", "s"), "lora_gc": ("tab:orange", "^"),
    "lora_gc_naive": ("tab:brown", "v"), "meft1_vanilla": ("tab:purple", "D"), "meft2_vanilla": ("tab:pink", "D"),
    "meft3_vanilla": ("tab:gray", "D"), "meft1": ("tab:green", "o"), "meft2": ("tab:olive", "P"),
    "meft3": ("tab:cyan", "X"), "meft1_exact": ("tab:red", "*"), "meft2_exact": ("salmon", "*"),
    "meft3_exact": ("darkred", "*"), "meft1_exact_one_stage": ("orangered", "*"),
}


_mib = functools.partial(format_bytes, unit="MiB")  # table columns are headed "(MiB)"


def _less(value: float, reference: float) -> str:
    """'84% less' / '12% more' relative to reference."""
    if not reference:
        return "n/a"
    change = 1 - value / reference
    return f"{100 * change:.0f}% less" if change >= 0 else f"{-100 * change:.0f}% more"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _setup_line(meta: dict) -> str:
    c = meta["config"]
    return (f"shape {c['shape']} x {meta['main_layers']} layers, batch {c['batch_size']} x {c['seq_len']} tokens"
            f"{' (padded)' if c['padding'] else ''}, attention {c['attn']}"
            f"{'' if c.get('attention_dropout') is None else ' with dropout ' + str(c['attention_dropout'])}"
            f", {c['dtype']}, {c['device']} "
            f"({meta['device_name']}, {meta['threads']} thread(s)), frozen layers for +frozen: "
            f"{meta['frozen_layers_at_main']}; torch {meta['torch']}, transformers {meta['transformers']}, "
            f"peft {meta['peft']}; meft_ds {meta.get('git', '?')}; {meta['date']}")


def _failures(results: dict) -> list[str]:
    """'section / method: error' for every method that failed (only with --keep_going); drops them."""
    lines = []
    for key in ("count", "timing", "peak"):
        for label, r in list((results.get(key) or {}).items()):
            if "error" in r:
                lines.append(f"- {key} / {label}: {r['error']}")
                del results[key][label]
    return lines


def markdown(results: dict) -> str:
    results = json.loads(json.dumps(results, default=str))  # a copy: failed entries are dropped below
    meta = results["meta"]
    out = [f"Command: `{meta['command']}`", "", f"Setup: {_setup_line(meta)}", ""]
    failures = _failures(results)
    if failures:
        out += ["### FAILED methods (left out of the tables below)", "", *failures, ""]
    count = results.get("count")
    if count:
        ref = {name: count.get(name, {}) for name in ("full", "lora", "lora_gc")}
        rows = []
        for label, r in count.items():
            row = [label, f"{r['trainable_params']:,}", _mib(r["saved_bytes"])]
            row += [_less(r["saved_bytes"], ref[name]["saved_bytes"]) if ref[name] and label != name else "—"
                    for name in ("full", "lora", "lora_gc")]
            row += [_mib(r["peak_saved_bytes"]) + (" †" if label.startswith("lora_gc") else ""),
                    _mib(r["peak_tensor_bytes"])]
            row += [_less(r["peak_tensor_bytes"], ref[name]["peak_tensor_bytes"]) if ref[name] and label != name
                    else "—" for name in ("full", "lora_gc")]
            rows.append(row)
        out += ["### Activation memory per step", "",
                "saved = bytes autograd holds for backward when the loss is ready (parameters excluded); "
                "peak saved = the most saved bytes alive at once, MEFT's recomputation included (†: not "
                "checkpoint's, which is hidden from saved-tensor hooks); peak tensor = the most tensor "
                "memory allocated during forward + backward and alive at once (recomputation, gradient "
                "buffers and weight gradients included; weights and optimizer state excluded).", "",
                _table(["method", "trainable params", "saved (MiB)", "vs full", "vs LoRA", "vs LoRA+GC",
                        "peak saved (MiB)", "peak tensor (MiB)", "vs full", "vs LoRA+GC"], rows), ""]
        rows = [[label] + [_mib(r["breakdown"].get(c, 0)) for c in CATEGORIES] for label, r in count.items()]
        out += ["### Where the saved bytes are (MiB)", "", _table(["method", *CATEGORIES], rows), ""]
        rows = []
        for label in ("full", "lora", "lora_gc", "meft1", "meft3", "meft1_exact"):
            composition = (count.get(label) or {}).get("peak_composition")
            if composition:
                rows.append([label, _mib(count[label]["peak_tensor_bytes"]),
                             "; ".join(f"{kind}: {_mib(b)}" for kind, b in list(composition.items())[:6])])
        if rows:
            out += ["### What is alive at the peak (largest groups by tensor shape and dtype, MiB)", "",
                    _table(["method", "peak tensor (MiB)", "shape dtype: MiB"], rows), ""]
        for label in ("meft1", "meft1_exact"):
            if label in count:
                rows = [[_mib(t["bytes"]), t["category"], "x".join(map(str, t["shape"])), t["dtype"]]
                        for t in count[label]["largest"]]
                out += [f"Largest saved storages of {label}:", "", _table(["MiB", "part", "shape", "dtype"], rows), ""]
    peak = results.get("peak")
    if peak:
        rows = []
        for label, r in peak.items():
            adam = r["grad_and_adam_bytes"] * 2 / 3  # the two AdamW moments; gradients replace activations
            rows.append([label, _mib(r["peak_delta_bytes"]), _mib(adam), _mib(r["peak_delta_bytes"] - adam)])
        first = next(iter(peak.values()))
        source = first["source"] + (f", {first['source_detail']}" if "source_detail" in first else "")
        out += [f"### Peak memory over the built model ({source})", "",
                _table(["method", "peak increase (MiB)", "AdamW moments (MiB)", "peak − AdamW moments (MiB)"],
                       rows), ""]
    timing = results.get("timing")
    if timing:
        rows = []
        clock = next(iter(timing.values()))["clock"]
        suffix = "_cpu_s" if clock == "process CPU time" else "_s"
        for label, r in timing.items():
            rows.append([label, f"{r['step_s']:.3f}", f"{r['step' + suffix]:.3f}",
                         f"{r['time_ratio_vs_lora']:.2f} ({r['time_ratio_min']:.2f}–{r['time_ratio_max']:.2f})",
                         f"{r['wall_time_ratio_vs_lora']:.2f}", f"{r['forward' + suffix]:.3f}",
                         f"{r['backward' + suffix]:.3f}", f"{r['optimizer' + suffix]:.3f}",
                         f"{r['tokens_per_s']:,.0f}", f"{r['throughput_ratio_vs_lora']:.2f}"])
        steps = next(iter(timing.values()))["steps"]
        out += [f"### Step time ({steps} interleaved rounds after a warm-up round; medians; ratios are the median "
                f"of per-round ratios to LoRA, by {clock} (min–max); phases and tokens/s by {clock})", "",
                _table(["method", "step wall (s)", f"step ({clock}, s)", "time × LoRA", "wall × LoRA",
                        "forward (s)", "backward (s)", "optimizer (s)", "tokens/s", "throughput × LoRA"], rows), ""]
    for key, axis, title in (("depth", "depths", "layers"), ("seq", "seq_lens", "sequence length")):
        section = results.get(key)
        if not section:
            continue
        xs = section[axis]
        for metric, what in (("saved_bytes", "Saved for backward"), ("peak_tensor_bytes", "Peak tensor memory")):
            rows = []
            for name, s in section["series"].items():
                if None in s.get(metric, [None]):
                    continue
                frozen = "/".join(map(str, s["num_frozen_layers"])) if "+frozen" in name else ""
                rows.append([name + (f" (K={frozen})" if frozen else "")] + [_mib(b) for b in s[metric]])
            if rows:
                out += [f"### {what} (MiB) vs {title}", "", _table(["method", *map(str, xs)], rows), ""]
    shapes = results.get("shapes")
    if shapes:
        rows = []
        for shape, s in shapes.items():
            full = s["methods"].get("full")
            for label, r in s["methods"].items():
                peaks = r["peak_tensor_bytes_at"]
                rows.append([f"{shape} ({s['layers']} layers)", label, _mib(r["per_layer_bytes"]),
                             _mib(r["constant_bytes"]), _mib(r["saved_bytes"]),
                             _less(r["saved_bytes"], full["saved_bytes"]) if full and label != "full" else "—",
                             _mib(peaks["2"]), _mib(peaks["4"])])  # JSON keys: markdown() works on a JSON copy
        first = next(iter(shapes.values()))
        out += [f"### Other shapes, batch {first['batch_size']} x {first['seq_len']} tokens (saved bytes measured at 2 "
                "and 4 layers and extrapolated linearly to the real depth; peaks as measured)", "",
                _table(["shape", "method", "saved per layer (MiB)", "saved intercept (MiB)",
                        "saved at real depth (MiB)", "vs full", "peak at 2 layers (MiB)", "peak at 4 layers (MiB)"],
                       rows), ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> bool:
    """Saved bytes and peak tensor memory vs depth (and vs sequence length if measured)."""
    panels = [(k, a, t) for k, a, t in (("depth", "depths", "number of layers"), ("seq", "seq_lens", "sequence length"))
              if results.get(k)]
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("saved_bytes", "saved for backward (MiB, log)"), ("peak_tensor_bytes", "peak tensor memory (MiB, log)")]
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(6 * len(panels) + 2.4, 9), squeeze=False)
    meta = results["meta"]
    c = meta["config"]
    for col, (key, axis, xlabel) in enumerate(panels):
        section = results[key]
        xs = section[axis]
        for row, (metric, ylabel) in enumerate(metrics):
            ax = axes[row][col]
            for name, s in section["series"].items():
                if None in s.get(metric, [None]):
                    continue
                base = name.replace("+frozen", "")
                color, marker = STYLE.get(base, ("tab:red", "o"))
                ax.plot(xs, [b / MIB for b in s[metric]], color=color, marker=marker,
                        linestyle="--" if "+frozen" in name else "-", label=name, linewidth=1.6, markersize=5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            fixed = (f"{c['batch_size']} x {c['seq_len']} tokens" if key == "depth"
                     else f"{meta['main_layers']} layers, batch {c['batch_size']}")
            ax.set_title(f"{c['shape']}, {fixed}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9, title="method (dashed: +frozen)", title_fontsize=9)
    frac = c["frozen_fraction"]
    fig.suptitle(f"Activation memory per training step: saved for backward (top), peak during forward+backward "
                 f"(bottom)\n+frozen = lowest {frac:.0%} of layers frozen; {c['device']}, {c['dtype']}, attention "
                 f"{c['attn']}; meft1/2/3 coincide on top", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(results: dict, out_dir: Path) -> None:
    """results.json first (the markdown and the plot can be re-rendered from it with main())."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text(markdown(results) + "\n")
    plot(results, out_dir / "activation_memory.png")


def main() -> None:
    """Re-render results.md and the PNG from a results.json: python -m benchmarks.report DIR/results.json."""
    import sys

    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    (path.parent / "results.md").write_text(markdown(results) + "\n")
    plot(results, path.parent / "activation_memory.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
