"""Per-rank summary of a run's telemetry: a table in the terminal and a PNG chart of memory per rank.

    python -m meft_ds.training.telemetry_report output/sst2-meft/runs [--output memory.png]

Reads the `rank_<r>/` TensorBoard runs that the trainer writes (meft_ds.training.telemetry) with TensorBoard's
own event reader. Table columns: steps logged, peak memory (the largest peak-since-previous-log value:
CUDA peak allocated, or peak resident on CPU), optimizer-state bytes, mean step time and throughput
(samples/s and tokens/s over all logged windows). The chart has one line per rank: memory now (solid)
and its peak between log steps (dashed), in MiB or GiB. Exits with an error when the directory holds
no rank_* run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..memory import format_bytes
from .telemetry import RUN_PREFIX

# (current, peak) memory tags: CUDA allocator first, CPU resident set otherwise.
MEMORY_TAG_PAIRS = (("memory/allocated_bytes", "memory/peak_allocated_bytes"),
                    ("memory/resident_bytes", "memory/peak_resident_bytes"))
MEMORY_LABELS = {"memory/allocated_bytes": "CUDA allocated", "memory/resident_bytes": "resident (RSS)"}


@dataclass
class RankSeries:
    rank: int
    scalars: dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in step order

    def steps(self, tag: str) -> list[int]:
        return [step for step, _ in self.scalars.get(tag, [])]

    def values(self, tag: str) -> list[float]:
        return [value for _, value in self.scalars.get(tag, [])]


def rank_runs(logging_dir: str | Path) -> list[Path]:
    """The rank_<r> run directories under logging_dir, by rank. Raises FileNotFoundError when none."""
    root = Path(logging_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the run's --logging_dir "
                                "(default <output_dir>/runs).")
    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(RUN_PREFIX)
            and p.name[len(RUN_PREFIX):].isdigit()]
    if not runs:
        raise FileNotFoundError(f"{root} holds no {RUN_PREFIX}<r>/ runs; per-rank telemetry is written there by "
                                "launch/train.py (pass the run's --logging_dir, default <output_dir>/runs).")
    return sorted(runs, key=lambda p: int(p.name[len(RUN_PREFIX):]))


def load_runs(logging_dir: str | Path) -> list[RankSeries]:
    """Every rank's scalars, read with TensorBoard's EventAccumulator (all events kept, none sampled)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    series = []
    for path in rank_runs(logging_dir):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        scalars = {tag: sorted((e.step, e.value) for e in accumulator.Scalars(tag))
                   for tag in accumulator.Tags()[SCALARS]}
        series.append(RankSeries(int(path.name[len(RUN_PREFIX):]), scalars))
    return series


def memory_tags(series: RankSeries) -> tuple[str, str]:
    for current, peak in MEMORY_TAG_PAIRS:
        if current in series.scalars:
            return current, peak
    raise ValueError(f"rank {series.rank} has no memory scalars ({[t for pair in MEMORY_TAG_PAIRS for t in pair]}).")


def summarize(series: RankSeries) -> dict:
    """Peak memory, mean step time and throughput of one rank.

    Each logged step time / rate is an average over the steps since the previous log, so windows are
    weighted by their number of steps (time) to give the run's mean step time (throughput).
    """
    _, peak_tag = memory_tags(series)
    step_times = series.scalars.get("perf/step_time_s", [])
    windows, previous = [], 0
    for step, seconds in step_times:
        windows.append((step - previous, seconds))
        previous = step
    total_steps = sum(n for n, _ in windows)
    total_seconds = sum(n * s for n, s in windows)
    result = {"rank": series.rank, "steps_logged": len(step_times), "peak_memory_bytes": max(series.values(peak_tag)),
              "optimizer_state_bytes": (series.values("memory/optimizer_state_bytes") or [None])[-1],
              "mean_step_time_s": total_seconds / total_steps if total_steps else None}
    for name in ("samples", "tokens"):
        rates = series.values(f"perf/{name}_per_second")
        done = sum(rate * n * s for rate, (n, s) in zip(rates, windows))
        result[f"{name}_per_second"] = done / total_seconds if total_seconds else None
    return result


def format_table(rows: list[dict]) -> str:
    header = ("rank", "steps logged", "peak memory", "optimizer state", "mean step time", "samples/s", "tokens/s")
    lines = [header]
    for row in rows:
        def number(key, fmt):
            return "-" if row[key] is None else format(row[key], fmt)
        lines.append((str(row["rank"]), str(row["steps_logged"]), format_bytes(row["peak_memory_bytes"]),
                      format_bytes(row["optimizer_state_bytes"]),
                      "-" if row["mean_step_time_s"] is None else f"{row['mean_step_time_s']:.3f} s",
                      number("samples_per_second", ".1f"), number("tokens_per_second", ".0f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join([rendered[0], "  ".join("-" * w for w in widths), *rendered[1:]])


def plot_memory(runs: list[RankSeries], path: str | Path, title: str) -> Path:
    """One line per rank (memory now, solid; peak since the previous log, dashed), in MiB or GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    current_tag, peak_tag = memory_tags(runs[0])
    largest = max(max(r.values(peak_tag) or r.values(current_tag)) for r in runs)
    unit, scale = ("GiB", 2**30) if largest >= 2 * 2**30 else ("MiB", 2**20)
    colors = plt.get_cmap("tab10")
    figure, axes = plt.subplots(figsize=(9, 5), dpi=120)
    for index, series in enumerate(runs):
        color = colors(index % 10)
        axes.plot(series.steps(current_tag), [v / scale for v in series.values(current_tag)], color=color,
                  linewidth=2, marker="o" if len(series.steps(current_tag)) <= 40 else None, markersize=3,
                  label=f"rank {series.rank}")
        if peak_tag in series.scalars:
            axes.plot(series.steps(peak_tag), [v / scale for v in series.values(peak_tag)], color=color,
                      linewidth=1.5, linestyle=(0, (4, 3)), alpha=0.9, zorder=3,
                      label=f"rank {series.rank}, peak since previous log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    tick_format = "{:,.0f}" if unit == "MiB" else "{:.2f}"
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: tick_format.format(value)))
    axes.set_xlabel("optimizer step", fontsize=12)
    axes.set_ylabel(f"{MEMORY_LABELS[current_tag]} memory ({unit})", fontsize=12)
    axes.set_title(title, fontsize=13)
    axes.grid(True, alpha=0.3)
    axes.tick_params(labelsize=11)
    axes.legend(fontsize=10, loc="best")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meft_ds.training.telemetry_report",
                                     description="Per-rank table and memory chart of a run's TensorBoard telemetry.")
    parser.add_argument("logging_dir", help="the run's --logging_dir (default <output_dir>/runs)")
    parser.add_argument("--output", help="PNG path of the chart. Default: <logging_dir>/memory_per_rank.png")
    options = parser.parse_args(argv)
    try:
        runs = load_runs(options.logging_dir)
        rows = [summarize(series) for series in runs]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    output = options.output or str(Path(options.logging_dir) / "memory_per_rank.png")
    title = f"Memory per rank ({len(runs)} ranks): {options.logging_dir}"
    print(f"chart: {plot_memory(runs, output, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
