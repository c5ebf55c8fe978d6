"""Learning quality on real GLUE data: MEFT1/2/3 against full fine-tuning and LoRA (issue 6).

Runs the project's own launcher (`launch/train.py`, a subprocess per run) for every method x task x seed
with the same budget (steps, global batch, max_seq_length, warm-up), reads each run's results.json (dev
metric, trainable parameters, wall time), measures the saved bytes per step (bytes saved for backward) with
`meft_ds.memory.SavedTensorCounter` on one training micro-batch of the same model build
(`meft_ds.training.modeling.make_recipe` / `build_model`, fp32, train mode), and writes a markdown
table + JSON.

    .venv/bin/python benchmarks/glue_quality.py                      # the full table (docs/quality.*)
    .venv/bin/python benchmarks/glue_quality.py --seeds 42 43 44     # more seeds (finished runs are reused)
    .venv/bin/python benchmarks/glue_quality.py --quick --work_dir /tmp/gq   # smoke run, a few steps
    .venv/bin/python benchmarks/glue_quality.py --search --seeds 42 43 44   # learning rates chosen first (below)
    GLUE_DIR=... .venv/bin/python benchmarks/glue_quality.py --plateau       # issue 17's plateau table (hours)

--eval_steps N evaluates on the dev set every N steps; each run's curve (dev metric vs step) is read from its
log, aggregated over seeds per step (mean, std, min, max) and written as a table and a PNG plot
(<out_md stem>_<task>_curves.png next to the page). --run_time_limit S ends a run (the launcher and every rank)
that is still going after S seconds: it is reported as cut off, with the statistics of the last step every
seed of its method evaluated, never as a finished run, and no "within one point" verdict is drawn from it.

Runs whose results.json already exists in --work_dir (or that were cut off) are reused (so the sweep can be
extended or resumed) if they were trained with exactly the flags this call would use (else a clear error);
pass --rerun to train them again. Runs are strictly sequential. Run directories are named
<task>-<method>-lr<lr>[-<tag>]-s<seed>.

--search chooses each method's learning rate before the table's runs: every rate of SEARCH_GRID is
trained with the SST-2 budget and the first seed, and scored on a selection split of 872 sentences
held out from SST-2 train (never on the dev set the table reports); the best is used for every task. When
the table trains on the whole SST-2 train file (--plateau), the selection split is held out of it and the
search runs train on the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from meft_ds.training.args import DEFAULT_LEARNING_RATE

REPO = Path(__file__).resolve().parents[1]
# The full GLUE files (standard GLUE TSV layout, one folder per task: RTE/, SST-2/) live outside the repo:
# point GLUE_DIR at them. Samples of SST-2 and RTE (data/sst2, data/rte: full dev sets, a few train lines) ship with
# the repository.
GLUE = Path(os.environ.get("GLUE_DIR", "glue"))

# method name in the table -> launcher flags
METHODS = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "meft1": ["--method", "meft", "--variant", "meft1"],
    "meft2": ["--method", "meft", "--variant", "meft2"],
    "meft3": ["--method", "meft", "--variant", "meft3"],
}
NOTES_MARKER = "<!-- notes: kept when the table is regenerated -->"
# Per-method learning rates without --search: the launcher's defaults (one definition), and the grid --search
# tries: four points ~3x apart from a third of the default up (a first three-point grid put every method's best
# at its top, so it was extended by one point).
LEARNING_RATES = {m: DEFAULT_LEARNING_RATE[flags[1]] for m, flags in METHODS.items()}  # flags[1]: --method's value
SEARCH_GRID = {"full": [3e-5, 1e-4, 3e-4, 1e-3], "lora": [3e-4, 1e-3, 3e-3, 1e-2],
               **{m: [1e-3, 3e-3, 1e-2, 3e-2] for m in ("meft1", "meft2", "meft3")}}
SELECTION_SIZE = 872  # as many as SST-2 dev


def _shown(path: str) -> str:
    """A data path as the docs print it: relative to the repo, or under $GLUE_DIR; never this machine's path."""
    path = Path(path).resolve()
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return f"$GLUE_DIR/{path.name}" if path.parent == GLUE.resolve() else path.name


@dataclass
class TaskBudget:
    task_name: str
    data_dir: str
    max_seq_length: int
    max_steps: int
    metric: str = "accuracy"


TASKS = {
    # data/sst2: the first 2000 sentences of SST-2 train + the full dev set (872)
    "sst2": TaskBudget("sst2", str(REPO / "data" / "sst2"), 64, 120),
    # the full RTE train (2490) and dev (277)
    "rte": TaskBudget("rte", str(GLUE / "RTE"), 128, 400),
}


@dataclass
class Budget:
    per_device_train_batch_size: int = 16
    ranks: int = 2  # 2 ranks x 1 thread (the measured main job on the 2-core machine); 1: one process
    warmup_ratio: float = 0.1
    bf16: bool = True
    eval_steps: int | None = None  # dev evaluation every N steps (the curve); None: at the end only
    extra: list[str] = field(default_factory=list)


def run_dir(work_dir: Path, method: str, task: str, seed: int, learning_rate: float, tag: str = "") -> Path:
    return work_dir / f"{task}-{method}-lr{learning_rate:g}{('-' + tag) if tag else ''}-s{seed}"


def selection_split(train_dir: Path, source: Path, out: Path, size: int, seed: int = 0) -> Path:
    """A GLUE-layout data dir for the learning-rate search whose dev.tsv is `size` sentences drawn (seeded) from
    the full SST-2 train file `source` and never trained on, so the search never sees the dev set the table
    reports. When `train_dir`'s train.tsv is a sample of `source` (data/sst2), train.tsv is that sample and
    the selection comes from the rest; when it is `source` itself (the full training set), the selection is
    held out of it and train.tsv is the rest (every line whose sentence is not in the selection)."""
    train = (train_dir / "train.tsv").read_text().splitlines(keepends=True)
    lines = source.read_text().splitlines(keepends=True)
    whole = (train_dir / "train.tsv").resolve() == source.resolve()
    used = set() if whole else {line.split("\t")[0].strip() for line in train[1:]}
    pool = list(dict.fromkeys(line for line in lines[1:] if line.split("\t")[0].strip() not in used))
    if len(pool) < size:
        raise SystemExit(f"{_shown(str(source))} has only {len(pool)} sentences outside the training set; the "
                         f"selection split needs {size}: pass --select_from with the full SST-2 train.tsv")
    selection = random.Random(seed).sample(pool, size)
    if whole:
        held_out = {line.split("\t")[0].strip() for line in selection}
        train = train[:1] + [line for line in train[1:] if line.split("\t")[0].strip() not in held_out]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.tsv").write_text("".join(train))
    (out / "dev.tsv").write_text(lines[0] + "".join(selection))
    return out


def launch_command(method: str, task: TaskBudget, seed: int, out: Path, budget: Budget,
                   learning_rate: float, port: int) -> list[str]:
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
    common = [
        "--deepspeed", "cpu", *METHODS[method],
        "--task_name", task.task_name, "--data_dir", task.data_dir,
        "--max_seq_length", str(task.max_seq_length), "--max_steps", str(task.max_steps),
        "--per_device_train_batch_size", str(budget.per_device_train_batch_size),
        "--learning_rate", str(learning_rate), "--warmup_ratio", str(budget.warmup_ratio),
        "--seed", str(seed), "--output_dir", str(out), "--overwrite_output_dir",
        "--logging_steps", "20", *(["--bf16"] if budget.bf16 else []),
        *(["--eval_steps", str(budget.eval_steps)] if budget.eval_steps else []), *budget.extra,
    ]
    if budget.ranks == 1:
        return [py, str(REPO / "launch" / "train.py"), "--master_port", str(port), *common]
    ds = str(Path(py).parent / "deepspeed")  # the launcher of the same environment
    return [ds, "--num_gpus", str(budget.ranks), "--master_port", str(port), str(REPO / "launch" / "train.py"),
            *common]


def training_flags(cmd: list[str]) -> list[str]:
    """What decides a run's result in its command: every flag (launcher's and trainer's, so the rank count
    too) but not the interpreter, the path of train.py, the port or where the run directory lies."""
    flags = [c for c in cmd[1:] if not c.endswith("train.py")]
    for name in ("--master_port", "--output_dir"):
        if name in flags:
            j = flags.index(name)
            flags = flags[:j] + flags[j + 2:]
    return flags


def parse_lr_overrides(items: list[str], flag: str = "--lr") -> tuple[dict, dict]:
    """["full=5e-5", "rte:meft2=1e-3"] -> ({"full": [5e-5]}, {("rte", "meft2"): [1e-3]}), with a clear error.
    Values are comma-separated lists of rates (--grid takes several, --lr one)."""
    every, per_task = {}, {}
    for item in items:
        key, _, value = item.partition("=")
        task, _, method = key.rpartition(":")
        try:
            rates = [float(v) for v in value.split(",")]
        except ValueError:
            rates = []
        if method not in METHODS or (task and task not in TASKS) or not rates or (flag == "--lr" and len(rates) > 1):
            raise SystemExit(f"{flag} {item!r}: expected [task:]method=rate{'[,rate...]' if flag != '--lr' else ''} "
                             f"with method in {list(METHODS)} and task in {list(TASKS)}, e.g. full=5e-5 or "
                             "rte:full=3e-5")
        if task:
            per_task[(task, method)] = rates
        else:
            every[method] = rates
    return every, per_task


def check_reusable(out: Path, cmd: list[str]) -> None:
    """A finished run is reused only if it was trained with exactly these flags (same budget, lr, seed, data)."""
    meta = out / "glue_quality_run.json"
    old = json.loads(meta.read_text()).get("cmd") if meta.exists() else None
    if old is None:
        raise SystemExit(f"{out} has a results.json but no {meta.name} saying how it was trained; "
                         "pass --rerun to train it again, or use another --work_dir / --tag")
    if training_flags(old) != training_flags(cmd):
        diff = sorted(set(training_flags(old)) ^ set(training_flags(cmd)))
        raise SystemExit(f"{out} was trained with other flags than this sweep asks for (differing: {diff}); "
                         "pass --rerun to train it again, or use another --work_dir / --tag")


def run_one(cmd: list[str], out: Path, log: Path, threads: int, time_limit: float | None = None) -> tuple[float, bool]:
    """Train one run; returns (wall seconds, cut_off). A run still going after `time_limit` seconds is ended (its
    whole process group: SIGTERM, SIGKILL after 60 s) and reported as cut off: it has no results.json, only
    the evaluations its log holds up to then (see read_curve), and the table marks it so."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # per environment
    env["OMP_NUM_THREADS"] = str(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    start, cut_off = time.time(), False
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        # its own session, so that the time limit can end the launcher and every rank together
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            cut_off = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            fh.write(f"[glue_quality] cut off: --run_time_limit {time_limit:g} s passed\n")
        finally:
            if proc.poll() is None:  # the driver itself was interrupted: leave no rank behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.time() - start
    if not cut_off and (proc.returncode != 0 or not (out / "results.json").exists()):
        raise RuntimeError(f"run failed (rc {proc.returncode}); see {log}")
    return wall, cut_off


def saved_bytes(method: str, task: TaskBudget, batch_size: int, model_name_or_path: str | None = None,
                     extra: dict | None = None) -> int:
    """Bytes autograd saves for backward for one training micro-batch (the first `batch_size` training
    examples, dynamically padded as the trainer does), fp32, train mode, same model build as the run."""
    import torch

    from meft_ds.training.data import collate_fn, load_task_datasets, tokenize_dataset
    from meft_ds.memory import SavedTensorCounter
    from meft_ds.training.args import RunArgs
    from meft_ds.training.modeling import build_model, load_tokenizer, make_recipe

    flags = {"method": METHODS[method][1]}
    if flags["method"] == "meft":
        flags["variant"] = method
    if model_name_or_path:
        flags["model_name_or_path"] = model_name_or_path
    flags.update(extra or {})
    args = RunArgs(task_name=task.task_name, data_dir=task.data_dir, max_seq_length=task.max_seq_length,
                   output_dir="/tmp/unused-glue-quality", **flags)
    tokenizer = load_tokenizer(args.model_name_or_path)
    raw, spec = load_task_datasets(task_name=task.task_name, data_dir=task.data_dir)
    raw["train"] = raw["train"].select(range(batch_size))
    data = tokenize_dataset(raw, tokenizer, spec, task.max_seq_length)
    batch = collate_fn(tokenizer)([data["train"][i] for i in range(batch_size)])
    torch.manual_seed(0)
    model = build_model(make_recipe(args, spec, tokenizer))
    model.train()
    with SavedTensorCounter(model) as counter:
        loss = model(**batch).loss
    loss.backward()  # the reversible backward must run (and checks its reconstruction)
    return counter.bytes


def _spread(values: list[float]) -> dict:
    """mean, sample std (0 for one value), min, max and n of some values."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def aggregate(records: list[dict]) -> dict:
    """records: one dict per run (method, task, seed, metric, value, trainable_parameters, curve, cut_off, ...)
    -> {task: {method: {mean, std, min, max, n, seeds, values, curve, cut_off, ...}}}. std is the sample std
    (0 for n = 1). `curve`: per evaluated step, the spread over the seeds that reached it. A cell with a run
    cut off by the time limit compares like with like: its statistics are those of the last step every seed
    evaluated (`at_step`; none if a run was cut off before its first evaluation), not a mix of final values and
    values from earlier steps."""
    table: dict = {}
    for r in records:
        cell = table.setdefault(r["task"], {}).setdefault(r["method"], {
            "values": [], "seeds": [], "wall_s": [], "trainable_parameters": r["trainable_parameters"],
            "metric": r["metric"], "curves": {}, "cut_off": {}, "seconds_per_step": []})
        cell["seeds"].append(r["seed"])
        if r["value"] is not None:  # a cut-off run's last dev evaluation (see below)
            cell["values"].append(r["value"])
        cell["wall_s"].append(r.get("wall_s"))
        cell["trainable_parameters"] = cell["trainable_parameters"] or r["trainable_parameters"]
        if r.get("curve"):
            cell["curves"][str(r["seed"])] = r["curve"]
        if r.get("cut_off"):  # seed -> the last step it logged
            cell["cut_off"][str(r["seed"])] = r.get("steps_done")
        if r.get("seconds_per_step") is not None:
            cell["seconds_per_step"].append(r["seconds_per_step"])
        cell.setdefault("learning_rates", [])
        if r.get("learning_rate") is not None and r["learning_rate"] not in cell["learning_rates"]:
            cell["learning_rates"].append(r["learning_rate"])
        if r.get("saved_bytes") is not None:
            cell["saved_bytes"] = r["saved_bytes"]
    for task in table.values():
        for cell in task.values():
            by_step: dict = {}
            for curve in cell["curves"].values():
                for step, value in curve:
                    by_step.setdefault(step, []).append(value)
            cell["curve"] = [{"step": step, **_spread(by_step[step])} for step in sorted(by_step)]
            cell["at_step"] = None
            if cell["cut_off"]:
                common = [step for step in sorted(by_step) if len(by_step[step]) == len(cell["seeds"])]
                cell["at_step"] = common[-1] if common else None
                cell["values"] = by_step[common[-1]] if common else []
            v = cell["values"]
            cell.update(_spread(v) if v else {"n": 0, "mean": None, "std": None, "min": None, "max": None})
    return table


def within_one_point(table: dict, method: str, reference: str, task: str) -> bool | None:
    """None when either side is missing or has a cut-off run: a run stopped early is no plateau."""
    cells = table.get(task, {})
    if method not in cells or reference not in cells or cells[method]["cut_off"] or cells[reference]["cut_off"]:
        return None
    if cells[method]["mean"] is None or cells[reference]["mean"] is None:
        return None
    return cells[method]["mean"] >= cells[reference]["mean"] - 0.01


def _x100(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown(table: dict, budget_lines: list[str]) -> str:
    methods = [m for m in METHODS if any(m in t for t in table.values())]
    lines = ["| method | task | learning rate | dev metric (mean +- std, x100) | runs (seeds) | min / max "
             "| cut off (seed: last step) | trainable params | saved bytes / step | wall s / run (mean) "
             "| s / step (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, cells in table.items():
        for m in methods:
            if m not in cells:
                continue
            c = cells[m]
            saved = c.get("saved_bytes")
            walls = [w for w in c["wall_s"] if w is not None]
            wall = f"{statistics.fmean(walls):.0f}" if walls else "n/a"
            per_step = f"{statistics.fmean(c['seconds_per_step']):.2f}" if c["seconds_per_step"] else "n/a"
            cut = ", ".join(f"{seed}: {step}" for seed, step in c["cut_off"].items()) or "no"
            mean = f"{_x100(c['mean'])} +- {_x100(c['std'])}" + (
                f" **at step {c['at_step']} (cut off: not a plateau)**" if c["cut_off"] else "")
            params = f"{c['trainable_parameters']:,}" if c["trainable_parameters"] is not None else "n/a"
            lines.append(
                f"| {m} | {task} ({c['metric']}) | {', '.join(f'{lr:g}' for lr in c['learning_rates']) or 'n/a'} "
                f"| {mean} | {c['n']} ({', '.join(map(str, c['seeds']))}) | {_x100(c['min'])} / {_x100(c['max'])} "
                f"| {cut} | {params} | {f'{saved:,}' if saved is not None else 'n/a'} | {wall} | {per_step} |")
    lines.append("")
    lines.append("Within one point (mean, 1.0 accuracy point) of the reference (None: missing or a run cut off):")
    lines.append("")
    lines.append("| task | method | vs full | vs lora |")
    lines.append("|---|---|---|---|")
    for task in table:
        for m in ("meft1", "meft2", "meft3"):
            if m in table[task]:
                f = within_one_point(table, m, "full", task)
                lo = within_one_point(table, m, "lora", task)
                lines.append(f"| {task} | {m} | {f} | {lo} |")
    return "\n".join(budget_lines + [""] + lines) + "\n"


def curve_markdown(table: dict, task: str, plot_name: str | None) -> str:
    """The dev-metric curves of one task: the plot, then the same numbers as a table (mean +- std over seeds,
    x100; (n) when fewer seeds than the method's runs reached that step)."""
    cells = {m: c for m, c in table[task].items() if c["curve"]}
    if not cells:
        return ""
    metric = next(iter(cells.values()))["metric"]
    steps = sorted({point["step"] for c in cells.values() for point in c["curve"]})
    lines = [f"Dev {metric} vs step, {task} (mean over seeds, band: min to max):", ""]
    if plot_name:
        lines += [f"![dev {metric} vs step, {task}]({plot_name})", ""]
    lines += ["| step | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
    for step in steps:
        row = []
        for c in cells.values():
            point = next((p for p in c["curve"] if p["step"] == step), None)
            runs = len(c["seeds"])
            row.append("" if point is None else f"{100 * point['mean']:.2f} +- {100 * point['std']:.2f}"
                       + (f" ({point['n']})" if point["n"] < runs else ""))
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(table: dict, task: str, path: Path) -> Path | None:
    """A PNG of dev metric vs step for every method of `task` with a curve: the mean over seeds as a line, the
    min-max band over seeds shaded; a method with a cut-off run is labelled so. None if no curve."""
    cells = {m: c for m, c in table[task].items() if c["curve"]}
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for method, c in cells.items():
        steps = [p["step"] for p in c["curve"]]
        label = f"{method} ({len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''}"
        label += ", cut off)" if c["cut_off"] else ")"
        line, = ax.plot(steps, [100 * p["mean"] for p in c["curve"]], marker="o", markersize=3, label=label)
        ax.fill_between(steps, [100 * p["min"] for p in c["curve"]], [100 * p["max"] for p in c["curve"]],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    metric = next(iter(cells.values()))["metric"]
    ax.set(xlabel="optimizer step (global batch)", ylabel=f"dev {metric} x100", title=f"{task}: dev {metric} vs step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def search_markdown(search: dict, seed: int, selection_size: int, steps: int) -> str:
    """The learning-rate search as a table: method x learning rate -> selection accuracy, the chosen one bold."""
    lines = [f"Learning-rate search (`--search`, seed {seed}, SST-2, {steps} steps, accuracy x100 on {selection_size} "
             "sentences held out from SST-2 train, not the dev set):", "",
             "| method | learning rate: selection accuracy |", "|---|---|"]
    for m, res in search.items():
        cells = [(f"**{lr}: {_x100(v)}**" if float(lr) == res["best"] else f"{lr}: {_x100(v)}")
                 + (" (cut off)" if lr in res.get("cut_off", []) else "") for lr, v in res["scores"].items()]
        lines.append(f"| {m} | {' , '.join(cells)} |")
    return "\n".join(lines) + "\n"


# A trainer log line carrying a JSON entry: "2026-11-30 17:29:56,143 meft_ds.train: {"step": 20, ...}" (a progress
# bar may precede it on the same line when the log is a file)
LOG_ENTRY = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) [\w.]+: (\{.*\})\s*$")


def read_log_entries(log: Path) -> list[tuple[float, dict]]:
    """(time, entry) for every JSON log entry of a run (train loss per log step, dev metrics per evaluation).
    Read from the run's log rather than trainer_state.json because a run cut off by --run_time_limit never
    writes the latter: its log is all it leaves."""
    entries = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        match = LOG_ENTRY.search(line)
        if not match:
            continue
        try:
            entry = json.loads(match.group(2))
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), entry))
    return entries


def read_curve(entries: list[tuple[float, dict]], metric: str) -> list[list]:
    """[[step, value], ...]: the dev metric at every evaluation in the log (eval/<split>/<metric>), by step."""
    curve = {}
    for _, entry in entries:
        values = [v for k, v in entry.items() if k.startswith("eval/") and k.endswith(f"/{metric}")
                  and isinstance(v, (int, float))]
        if values:
            curve[entry["step"]] = float(values[0])
    return [[step, curve[step]] for step in sorted(curve)]


def seconds_per_step(entries: list[tuple[float, dict]]) -> float | None:
    """Wall seconds per optimizer step between the first and the last training log entry, the dev evaluations
    in between included (what a long run costs per step; start-up and the final evaluation are not)."""
    train = [(t, e["step"]) for t, e in entries if "train/loss" in e]
    if len(train) < 2 or train[-1][1] == train[0][1]:
        return None
    return (train[-1][0] - train[0][0]) / (train[-1][1] - train[0][1])


def read_record(out: Path, method: str, task: TaskBudget, seed: int, log: Path | None = None,
                cut_off: bool = False) -> dict:
    """One run's record. A cut-off run has no results.json: its value is its last dev evaluation (None if it
    had none), and it carries cut_off so that the table never shows it as a finished run."""
    entries = read_log_entries(log) if log is not None else []
    curve = read_curve(entries, task.metric)
    if cut_off:
        res, value = {}, (curve[-1][1] if curve else None)
        counted = re.search(r"trainable parameters (\d+) of", log.read_text(errors="replace")) if log else None
        if counted:  # the trainer's start-up line; results.json would carry it
            res["trainable_parameters"] = int(counted.group(1))
    else:
        res = json.loads((out / "results.json").read_text())
        value = _find_metric(res, task.metric)
    evals = res.get("eval") or {k: v for k, v in res.items() if k.startswith("eval")}
    steps = max((e["step"] for _, e in entries), default=None)
    return {"method": method, "task": task.task_name, "seed": seed, "metric": task.metric, "value": value,
            "trainable_parameters": res.get("trainable_parameters"), "results": res, "eval": evals,
            "curve": curve, "cut_off": cut_off, "steps_done": res.get("global_step", steps),
            "seconds_per_step": seconds_per_step(entries)}


def _find_metric(res, metric: str):
    """The dev metric from results.json, wherever the trainer nests it (e.g. eval.validation.accuracy)."""
    if isinstance(res, dict):
        for key, val in res.items():
            if key in (metric, f"eval_{metric}") and isinstance(val, (int, float)):
                return float(val)
        for key, val in res.items():
            found = _find_metric(val, metric)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS), help="default: all (--plateau: sst2)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 42 (--plateau: 42 43)")
    p.add_argument("--max_steps", type=int, default=None,
                   help="override every task's step budget (--plateau: one epoch of the training set)")
    p.add_argument("--eval_steps", type=int, default=None,
                   help="evaluate on the dev set every N steps: the curves (plot + table); --plateau: 200")
    p.add_argument("--run_time_limit", type=float, default=None, metavar="SECONDS",
                   help="end a run still going after this many seconds; it is reported as cut off (its last dev "
                        "evaluation, marked), never as a finished run, and reused as such unless --rerun")
    p.add_argument("--plateau", action="store_true",
                   help="issue 17's plateau table in one go: sst2 on the full SST-2 train ($GLUE_DIR/SST-2), one "
                        "epoch at global batch 32, dev eval every 200 steps, seeds 42 43, every method, --search "
                        "first (600-step runs on a selection split held out of that training set), tag plateau, "
                        "written to docs/quality_plateau.*; flags given explicitly win")
    p.add_argument("--ranks", type=int, default=2, choices=(1, 2))
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--no_bf16", action="store_true")
    p.add_argument("--lr", nargs="*", default=[],
                   help="overrides, e.g. full=5e-5 meft1=1e-3; with a task prefix for that task only (over --search's "
                        "choice too), e.g. rte:full=3e-5")
    p.add_argument("--model_name_or_path", default=None)
    p.add_argument("--data_dir", nargs="*", default=[], help="overrides, e.g. sst2=/tmp/my_sst2")
    p.add_argument("--work_dir", default="/tmp/glue_quality")
    p.add_argument("--out_md", default=None, help="default docs/quality.md (--plateau: docs/quality_plateau.md); "
                   "the curve plots go next to it as <name>_<task>_curves.png")
    p.add_argument("--out_json", default=None, help="default docs/quality.json (--plateau: docs/quality_plateau.json)")
    p.add_argument("--extra", default="", help="more launcher flags for every run, e.g. "
                   "'--stream_arithmetic float' (use with --tag so the runs get their own directories)")
    p.add_argument("--tag", default=None, help="suffix of the run directories, e.g. float (--plateau: plateau)")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--no_train", action="store_true", help="only aggregate finished runs in --work_dir")
    p.add_argument("--no_saved_bytes", action="store_true", help="do not count the saved bytes per step")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, one seed")
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--search", action="store_true",
                   help="choose each method's learning rate first: train its grid (SEARCH_GRID) on the SST-2 budget "
                        "with the first seed, score on a selection split held out from SST-2 train, keep the best")
    p.add_argument("--grid", nargs="*", default=[], help="grid overrides for --search, e.g. meft1=1e-3,3e-3")
    p.add_argument("--search_steps", type=int, default=None,
                   help="steps of each --search run (default: the SST-2 budget; --plateau: 600)")
    p.add_argument("--select_from", default=str(GLUE / "SST-2" / "train.tsv"),
                   help="the full SST-2 train.tsv the selection split is drawn from")
    p.add_argument("--select_size", type=int, default=SELECTION_SIZE, help="sentences in the selection split")
    a = p.parse_args(argv)
    if a.run_time_limit is not None and a.run_time_limit <= 0:
        p.error(f"--run_time_limit {a.run_time_limit:g} must be > 0 seconds")
    for name in ("eval_steps", "search_steps", "max_steps"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            p.error(f"--{name} {getattr(a, name)} must be > 0")
    name = "quality_plateau" if a.plateau else "quality"
    a.out_md = a.out_md or str(REPO / "docs" / f"{name}.md")
    a.out_json = a.out_json or str(REPO / "docs" / f"{name}.json")
    if a.plateau:  # issue 17's plateau table: defaults only, every flag given explicitly wins
        a.search = True
        a.tasks = a.tasks or ["sst2"]
        a.seeds = a.seeds or [42, 43]
        a.eval_steps = a.eval_steps or 200
        a.search_steps = a.search_steps or 600
        a.tag = "plateau" if a.tag is None else a.tag
        if not any(item.startswith("sst2=") for item in a.data_dir):
            a.data_dir = [*a.data_dir, f"sst2={GLUE / 'SST-2'}"]
    a.tasks, a.seeds, a.tag = a.tasks or list(TASKS), a.seeds or [42], a.tag or ""

    lr_overrides, task_lrs = ({k: v[0] for k, v in d.items()} for d in parse_lr_overrides(a.lr))
    lrs = {**LEARNING_RATES, **lr_overrides}
    budgets = {k: TaskBudget(**asdict(v)) for k, v in TASKS.items()}
    for item in a.data_dir:
        k, v = item.split("=", 1)
        budgets[k].data_dir = v
    global_batch = a.per_device_train_batch_size * a.ranks
    for t in budgets.values():
        if a.max_steps is not None:
            t.max_steps = a.max_steps
        elif a.plateau and t.task_name in a.tasks:  # one epoch, as the trainer counts it (last partial batch dropped)
            train_file = Path(t.data_dir) / "train.tsv"
            if not train_file.exists():
                raise SystemExit(f"--plateau trains on {train_file}, which does not exist: set GLUE_DIR "
                                 "to the folder holding SST-2/ (or pass --data_dir sst2=...)")
            t.max_steps = (len(train_file.read_text().splitlines()) - 1) // global_batch
        if a.quick:
            t.max_steps = 4
    tasks = {k: budgets[k] for k in a.tasks}
    extra = ["--model_name_or_path", a.model_name_or_path] if a.model_name_or_path else []
    extra += a.extra.split()
    budget = Budget(per_device_train_batch_size=a.per_device_train_batch_size, ranks=a.ranks,
                    bf16=not a.no_bf16, eval_steps=a.eval_steps, extra=extra)
    seeds = a.seeds[:1] if a.quick else a.seeds
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = 1 if a.ranks == 2 else 2

    def train_or_reuse(method: str, task: TaskBudget, seed: int, lr: float, tag: str = "") -> dict | None:
        out = run_dir(work, method, task.task_name, seed, lr, tag)
        cmd = launch_command(method, task, seed, out, budget, lr, a.port)
        meta, log = out / "glue_quality_run.json", work / f"{out.name}.log"
        info = json.loads(meta.read_text()) if meta.exists() else {}
        if ((out / "results.json").exists() or info.get("cut_off")) and not a.rerun:
            check_reusable(out, cmd)
            wall, cut_off = info.get("wall_s"), bool(info.get("cut_off"))
        elif a.no_train:
            return None
        else:
            print(f"[glue_quality] {method} {task.task_name} seed {seed} lr {lr:g}: {' '.join(cmd)}", flush=True)
            for stale in (meta, out / "results.json"):  # a rerun that is cut off must not leave the old result
                stale.unlink(missing_ok=True)
            wall, cut_off = run_one(cmd, out, log, threads, a.run_time_limit)
            meta.write_text(json.dumps({"cmd": cmd, "wall_s": wall, "learning_rate": lr, "cut_off": cut_off,
                                        "run_time_limit_s": a.run_time_limit,
                                        "max_steps": task.max_steps, "max_seq_length": task.max_seq_length,
                                        "global_batch": budget.per_device_train_batch_size * budget.ranks},
                                       indent=2))
        rec = read_record(out, method, task, seed, log, cut_off)
        rec.update(wall_s=wall, learning_rate=lr)
        state = (f"CUT OFF after {wall:.0f} s at step {rec['steps_done']} of {task.max_steps} (--run_time_limit): "
                 f"last dev eval" if cut_off else "")
        print(f"[glue_quality] {method} {task.task_name}{' ' + tag if tag else ''} seed {seed} lr {lr:g}: {state} "
              f"{task.metric}={rec['value']} trainable={rec['trainable_parameters']} wall={wall}", flush=True)
        return rec

    search: dict = {}
    if a.search:  # one seed, the SST-2 budget, scored on the selection split held out from SST-2 train
        grid = {**SEARCH_GRID, **parse_lr_overrides(a.grid, "--grid")[0]}
        select = TaskBudget(**asdict(budgets["sst2"]))  # the SST-2 budget, whatever --tasks says
        select.max_steps = a.search_steps or select.max_steps
        select.data_dir = str(selection_split(Path(select.data_dir), Path(a.select_from), work / "sst2-select",
                                              a.select_size))
        for m in (m for m in a.methods if m not in lr_overrides):  # a rate set with --lr is not searched
            scores, cut = {}, []
            for lr in grid[m]:
                rec = train_or_reuse(m, select, seeds[0], lr, tag="-".join(filter(None, ("select", a.tag))))
                if rec is not None:
                    scores[lr] = rec["value"]
                    if rec["cut_off"]:
                        cut.append(f"{lr:g}")
            ranked = {lr: v for lr, v in scores.items() if v is not None}  # cut off before any eval: no score
            if ranked:
                best = max(ranked, key=lambda lr: ranked[lr])  # ties: the first in grid order
                search[m] = {"scores": {f"{lr:g}": v for lr, v in scores.items()}, "best": best, "cut_off": cut}
                lrs[m] = best

    records = []
    for seed in seeds:
        for tname, task in tasks.items():
            for m in a.methods:
                rec = train_or_reuse(m, task, seed, task_lrs.get((tname, m), lrs[m]), a.tag)
                if rec is not None:
                    records.append(rec)

    if not a.no_saved_bytes:
        cache = work / "saved_bytes.json"
        act = json.loads(cache.read_text()) if cache.exists() else {}
        for tname, task in tasks.items():
            for m in a.methods:
                key = f"{tname}/{m}/{a.per_device_train_batch_size}/{task.max_seq_length}/{a.model_name_or_path}"
                if key not in act:
                    act[key] = saved_bytes(m, task, a.per_device_train_batch_size, a.model_name_or_path)
                    cache.write_text(json.dumps(act, indent=2))
                for r in records:
                    if r["task"] == tname and r["method"] == m:
                        r["saved_bytes"] = act[key]

    table = aggregate(records)
    budget_lines = [
        f"Budget per run (every method the same): global batch {budget.per_device_train_batch_size * budget.ranks} "
        f"({budget.ranks} rank(s) x {budget.per_device_train_batch_size}), warm-up ratio {budget.warmup_ratio} "
        f"then linear decay, {'bf16' if budget.bf16 else 'fp32'}, DeepSpeed preset `cpu` (ZeRO-2, torch AdamW, "
        f"weight decay 0, grad clip 1.0).",
        *[f"- {t}: {task.max_steps} steps, max_seq_length {task.max_seq_length}, data {_shown(task.data_dir)}"
          for t, task in tasks.items()],
        f"- dev evaluation: {f'every {a.eval_steps} steps and at the end' if a.eval_steps else 'at the end'}"
        + (f"; per-run time limit {a.run_time_limit:g} s (a run past it is cut off and marked)"
           if a.run_time_limit else ""),
        f"- learning rates: {', '.join(f'{m} {lrs[m]:g}' for m in a.methods)}; seeds {seeds}"
        + (" (chosen by --search, below)" if search else " (fixed, no search)")
        + "".join(f"; {t} {m}: {lr:g} (set per task)" for (t, m), lr in task_lrs.items() if t in tasks),
        "- saved bytes / step: SavedTensorCounter on one micro-batch (the first "
        f"{budget.per_device_train_batch_size} training examples, dynamic padding), fp32, train mode.",
    ]
    md = "# Learning quality on GLUE: MEFT vs full fine-tuning and LoRA\n\n" \
         "Generated by `benchmarks/glue_quality.py` (the part above the notes marker).\n\n" + markdown(table, budget_lines)
    out_md = Path(a.out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    for tname in table:
        plot = plot_curves(table, tname, out_md.parent / f"{out_md.stem}_{tname}_curves.png")
        curves = curve_markdown(table, tname, plot.name if plot else None)
        md += ("\n" + curves) if curves else ""
    if search:
        md += "\n" + search_markdown(search, seeds[0], a.select_size, select.max_steps)
    if out_md.exists() and NOTES_MARKER in out_md.read_text():  # keep hand-written analysis below the marker
        md += "\n" + NOTES_MARKER + out_md.read_text().split(NOTES_MARKER, 1)[1]
    out_md.write_text(md)
    Path(a.out_json).write_text(json.dumps({
        "budget": {"tasks": {k: {**asdict(v), "data_dir": _shown(v.data_dir)} for k, v in tasks.items()}, **asdict(budget), "learning_rates": lrs,
                   "seeds": seeds, "selection_size": a.select_size if search else None},
        "search": search,
        "table": table,
        "runs": [{k: v for k, v in r.items() if k != "results"} | {"results": r["results"]} for r in records],
    }, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
