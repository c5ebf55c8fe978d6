"""Learning quality on real GLUE data: MEFT1/2/3 against full fine-tuning and LoRA (issue 6).

Runs the project's own launcher (`launch/train.py`, a subprocess per run) for every method x task x seed
with the same budget (steps, global batch, max_seq_length, warm-up), reads each run's results.json (dev
metric, trainable parameters, wall time), measures activation bytes per step with
`meft_ds.memory.SavedTensorCounter` on one training micro-batch of the same model build
(`meft_ds.training.modeling.make_recipe` / `build_model`, fp32, train mode), and writes a markdown
table + JSON.

    .venv/bin/python benchmarks/glue_quality.py                      # the full table (docs/quality.*)
    .venv/bin/python benchmarks/glue_quality.py --seeds 42 43 44     # more seeds (finished runs are reused)
    .venv/bin/python benchmarks/glue_quality.py --quick --work_dir /tmp/gq   # smoke run, a few steps

Runs whose results.json already exists in --work_dir are reused (so the sweep can be extended or
resumed); pass --rerun to train them again. Runs are strictly sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"

# method name in the table -> launcher flags
METHODS = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "meft1": ["--method", "meft", "--variant", "meft1"],
    "meft2": ["--method", "meft", "--variant", "meft2"],
    "meft3": ["--method", "meft", "--variant", "meft3"],
}
# Per-method learning rates (the usual ranges: full 5e-5..1e-4, LoRA 5e-4..1e-3, MEFT 1e-3..3e-3).
NOTES_MARKER = "<!-- notes: kept when the table is regenerated -->"
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "meft1": 3e-3, "meft2": 3e-3, "meft3": 3e-3}


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
    "rte": TaskBudget("rte", str(GLUE / "RTE"), 128, 120),
}


@dataclass
class Budget:
    per_device_train_batch_size: int = 16
    ranks: int = 2  # 2 ranks x 1 thread (the measured main job on the 2-core machine); 1: one process
    warmup_ratio: float = 0.1
    bf16: bool = True
    extra: list[str] = field(default_factory=list)


def run_dir(work_dir: Path, method: str, task: str, seed: int, tag: str = "") -> Path:
    return work_dir / f"{task}-{method}{('-' + tag) if tag else ''}-s{seed}"


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
        "--logging_steps", "20", *(["--bf16"] if budget.bf16 else []), *budget.extra,
    ]
    if budget.ranks == 1:
        return [py, str(REPO / "launch" / "train.py"), "--master_port", str(port), *common]
    ds = str(REPO / ".venv" / "bin" / "deepspeed")
    return [ds, "--num_gpus", str(budget.ranks), "--master_port", str(port), str(REPO / "launch" / "train.py"),
            *common]


def run_one(cmd: list[str], out: Path, log: Path, threads: int) -> float:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "meft_ds" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = str(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode != 0 or not (out / "results.json").exists():
        raise RuntimeError(f"run failed (rc {proc.returncode}); see {log}")
    return wall


def activation_bytes(method: str, task: TaskBudget, batch_size: int, model_name_or_path: str | None = None,
                     extra: dict | None = None) -> int:
    """Bytes autograd saves for backward for one training micro-batch (the first `batch_size` training
    examples, dynamically padded as the trainer does), fp32, train mode, same model build as the run."""
    import torch

    from meft_ds.data import collate_fn, load_task_datasets, tokenize_dataset
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


def aggregate(records: list[dict]) -> dict:
    """records: one dict per run (method, task, seed, metric, value, trainable_parameters, ...) ->
    {task: {method: {mean, std, min, max, n, seeds, values, ...}}}. std is the sample std (0 for n = 1)."""
    table: dict = {}
    for r in records:
        cell = table.setdefault(r["task"], {}).setdefault(r["method"], {
            "values": [], "seeds": [], "wall_s": [], "trainable_parameters": r["trainable_parameters"],
            "metric": r["metric"]})
        cell["values"].append(r["value"])
        cell["seeds"].append(r["seed"])
        cell["wall_s"].append(r.get("wall_s"))
        if r.get("activation_bytes") is not None:
            cell["activation_bytes"] = r["activation_bytes"]
    for task in table.values():
        for cell in task.values():
            v = cell["values"]
            cell.update(n=len(v), mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0,
                        min=min(v), max=max(v))
    return table


def within_one_point(table: dict, method: str, reference: str, task: str) -> bool | None:
    cells = table.get(task, {})
    if method not in cells or reference not in cells:
        return None
    return cells[method]["mean"] >= cells[reference]["mean"] - 0.01


def markdown(table: dict, budget_lines: list[str]) -> str:
    methods = [m for m in METHODS if any(m in t for t in table.values())]
    lines = ["| method | task | dev metric (mean +- std, x100) | runs (seeds) | min / max | trainable params "
             "| activation bytes / step | wall s / run (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for task, cells in table.items():
        for m in methods:
            if m not in cells:
                continue
            c = cells[m]
            act = c.get("activation_bytes")
            walls = [w for w in c["wall_s"] if w is not None]
            wall = f"{statistics.fmean(walls):.0f}" if walls else "n/a"
            lines.append(
                f"| {m} | {task} ({c['metric']}) | {100 * c['mean']:.2f} +- {100 * c['std']:.2f} | {c['n']} "
                f"({', '.join(map(str, c['seeds']))}) | {100 * c['min']:.2f} / {100 * c['max']:.2f} | "
                f"{c['trainable_parameters']:,} | {f'{act:,}' if act is not None else 'n/a'} | {wall} |")
    lines.append("")
    lines.append("Within one point (mean, 1.0 accuracy point) of the reference:")
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


def read_record(out: Path, method: str, task: TaskBudget, seed: int) -> dict:
    res = json.loads((out / "results.json").read_text())
    evals = res.get("eval") or {k: v for k, v in res.items() if k.startswith("eval")}
    value = _find_metric(res, task.metric)
    return {"method": method, "task": task.task_name, "seed": seed, "metric": task.metric, "value": value,
            "trainable_parameters": res.get("trainable_parameters"), "results": res, "eval": evals}


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
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--max_steps", type=int, default=None, help="override every task's step budget")
    p.add_argument("--ranks", type=int, default=2, choices=(1, 2))
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--no_bf16", action="store_true")
    p.add_argument("--lr", nargs="*", default=[], help="overrides, e.g. full=5e-5 meft1=1e-3")
    p.add_argument("--model_name_or_path", default=None)
    p.add_argument("--data_dir", nargs="*", default=[], help="overrides, e.g. sst2=/tmp/my_sst2")
    p.add_argument("--work_dir", default="/tmp/glue_quality")
    p.add_argument("--out_md", default=str(REPO / "docs" / "quality.md"))
    p.add_argument("--out_json", default=str(REPO / "docs" / "quality.json"))
    p.add_argument("--extra", default="", help="more launcher flags for every run, e.g. "
                   "'--stream_arithmetic float' (use with --tag so the runs get their own directories)")
    p.add_argument("--tag", default="", help="suffix of the run directories, e.g. float")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--no_train", action="store_true", help="only aggregate finished runs in --work_dir")
    p.add_argument("--no_activation", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, one seed")
    p.add_argument("--port", type=int, default=29731)
    a = p.parse_args(argv)

    lrs = dict(LEARNING_RATES)
    for item in a.lr:
        k, v = item.split("=")
        lrs[k] = float(v)
    tasks = {k: TaskBudget(**asdict(TASKS[k])) for k in a.tasks}
    for item in a.data_dir:
        k, v = item.split("=", 1)
        tasks[k].data_dir = v
    for t in tasks.values():
        if a.max_steps is not None:
            t.max_steps = a.max_steps
        if a.quick:
            t.max_steps = 4
    extra = ["--model_name_or_path", a.model_name_or_path] if a.model_name_or_path else []
    extra += a.extra.split()
    budget = Budget(per_device_train_batch_size=a.per_device_train_batch_size, ranks=a.ranks,
                    bf16=not a.no_bf16, extra=extra)
    seeds = a.seeds[:1] if a.quick else a.seeds
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = 1 if a.ranks == 2 else 2

    records = []
    for seed in seeds:
        for tname, task in tasks.items():
            for m in a.methods:
                out = run_dir(work, m, tname, seed, a.tag)
                wall = None
                meta = out / "glue_quality_run.json"
                if a.rerun or not (out / "results.json").exists():
                    if a.no_train:
                        continue
                    cmd = launch_command(m, task, seed, out, budget, lrs[m], a.port)
                    print(f"[glue_quality] {m} {tname} seed {seed}: {' '.join(cmd)}", flush=True)
                    wall = run_one(cmd, out, work / f"{out.name}.log", threads)
                    meta.write_text(json.dumps({"cmd": cmd, "wall_s": wall, "learning_rate": lrs[m],
                                                "max_steps": task.max_steps,
                                                "max_seq_length": task.max_seq_length,
                                                "global_batch": budget.per_device_train_batch_size * budget.ranks},
                                               indent=2))
                elif meta.exists():
                    wall = json.loads(meta.read_text()).get("wall_s")
                rec = read_record(out, m, task, seed)
                rec["wall_s"] = wall
                rec["learning_rate"] = json.loads(meta.read_text()).get("learning_rate") if meta.exists() else None
                print(f"[glue_quality] {m} {tname} seed {seed}: {task.metric}={rec['value']} "
                      f"trainable={rec['trainable_parameters']} wall={wall}", flush=True)
                records.append(rec)

    if not a.no_activation:
        cache = work / "activation_bytes.json"
        act = json.loads(cache.read_text()) if cache.exists() else {}
        for tname, task in tasks.items():
            for m in a.methods:
                key = f"{tname}/{m}/{a.per_device_train_batch_size}/{task.max_seq_length}/{a.model_name_or_path}"
                if key not in act:
                    act[key] = activation_bytes(m, task, a.per_device_train_batch_size, a.model_name_or_path)
                    cache.write_text(json.dumps(act, indent=2))
                for r in records:
                    if r["task"] == tname and r["method"] == m:
                        r["activation_bytes"] = act[key]

    table = aggregate(records)
    budget_lines = [
        f"Budget per run (every method the same): global batch {budget.per_device_train_batch_size * budget.ranks} "
        f"({budget.ranks} rank(s) x {budget.per_device_train_batch_size}), warm-up ratio {budget.warmup_ratio} "
        f"then linear decay, {'bf16' if budget.bf16 else 'fp32'}, DeepSpeed preset `cpu` (ZeRO-2, torch AdamW, "
        f"weight decay 0, grad clip 1.0).",
        *[f"- {t}: {task.max_steps} steps, max_seq_length {task.max_seq_length}, data {task.data_dir}"
          for t, task in tasks.items()],
        f"- learning rates: {', '.join(f'{m} {lrs[m]:g}' for m in a.methods)}; seeds {seeds}",
        "- activation bytes / step: SavedTensorCounter on one micro-batch (the first "
        f"{budget.per_device_train_batch_size} training examples, dynamic padding), fp32, train mode.",
    ]
    md = "# Learning quality on GLUE: MEFT vs full fine-tuning and LoRA\n\n" \
         "Generated by `benchmarks/glue_quality.py` (the part above the notes marker).\n\n" + markdown(table, budget_lines)
    out_md = Path(a.out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    if out_md.exists() and NOTES_MARKER in out_md.read_text():  # keep hand-written analysis below the marker
        md += "\n" + NOTES_MARKER + out_md.read_text().split(NOTES_MARKER, 1)[1]
    out_md.write_text(md)
    Path(a.out_json).write_text(json.dumps({
        "budget": {"tasks": {k: asdict(v) for k, v in tasks.items()}, **asdict(budget), "learning_rates": lrs,
                   "seeds": seeds},
        "table": table,
        "runs": [{k: v for k, v in r.items() if k != "results"} | {"results": r["results"]} for r in records],
    }, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
