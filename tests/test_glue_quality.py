"""benchmarks/glue_quality.py end to end on a tiny random BERT: real launcher runs (2 steps, one process),
results.json read back, saved bytes counted, table + JSON written; plus the aggregation maths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import glue_quality as gq  # noqa: E402
from tests.train_helpers import free_port, save_tiny_bert, write_tiny_sst2  # noqa: E402


def test_aggregate_mean_std_and_within_one_point():
    recs = [
        {"method": "full", "task": "sst2", "seed": 1, "metric": "accuracy", "value": 0.80, "trainable_parameters": 10},
        {"method": "full", "task": "sst2", "seed": 2, "metric": "accuracy", "value": 0.84, "trainable_parameters": 10},
        {"method": "meft1", "task": "sst2", "seed": 1, "metric": "accuracy", "value": 0.815,
         "trainable_parameters": 3, "saved_bytes": 7},
    ]
    table = gq.aggregate(recs)
    assert table["sst2"]["full"]["mean"] == pytest.approx(0.82)
    assert table["sst2"]["full"]["std"] == pytest.approx(0.0282842712, rel=1e-6)
    assert table["sst2"]["meft1"]["std"] == 0.0 and table["sst2"]["meft1"]["saved_bytes"] == 7
    assert gq.within_one_point(table, "meft1", "full", "sst2") is True
    assert gq.within_one_point(table, "meft1", "lora", "sst2") is None
    recs[2]["value"] = 0.80
    assert gq.within_one_point(gq.aggregate(recs), "meft1", "full", "sst2") is False


def test_lr_overrides_per_task_and_errors():
    assert gq.parse_lr_overrides(["full=5e-5", "rte:meft2=1e-3"]) == ({"full": [5e-5]}, {("rte", "meft2"): [1e-3]})
    assert gq.parse_lr_overrides(["meft1=1e-3,3e-3"], "--grid") == ({"meft1": [1e-3, 3e-3]}, {})
    for bad in ("fulll=1e-3", "mnli:full=1e-3", "full=fast", "full", "full=1e-3,2e-3"):
        with pytest.raises(SystemExit, match=r"--lr .*\[task:\]method=rate"):
            gq.parse_lr_overrides([bad])
    with pytest.raises(SystemExit, match=r"--grid .*rate\[,rate"):
        gq.parse_lr_overrides(["lora=1e-3,x"], "--grid")


def test_find_metric_nested():
    assert gq._find_metric({"eval": {"validation": {"accuracy": 0.5, "loss": 1}}}, "accuracy") == 0.5


def test_tiny_end_to_end(tmp_path):
    model = save_tiny_bert(tmp_path / "model", dropout=0.1)
    data = write_tiny_sst2(tmp_path / "sst2", train_lines=64, dev_lines=16)
    md, js = tmp_path / "q.md", tmp_path / "q.json"
    argv = ["--methods", "full", "lora", "meft1", "--tasks", "sst2", "--seeds", "1", "--max_steps", "2",
            "--ranks", "1", "--no_bf16", "--per_device_train_batch_size", "4", "--model_name_or_path", str(model),
            "--data_dir", f"sst2={data}", "--work_dir", str(tmp_path / "runs"), "--out_md", str(md),
            "--out_json", str(js), "--port", str(free_port()), "--lr", "sst2:full=2e-4"]
    assert gq.main(argv) == 0
    out = json.loads(js.read_text())
    cells = out["table"]["sst2"]
    assert set(cells) == {"full", "lora", "meft1"}
    assert cells["full"]["learning_rates"] == [2e-4] and cells["lora"]["learning_rates"] == [gq.LEARNING_RATES["lora"]]
    for cell in cells.values():
        assert 0.0 <= cell["mean"] <= 1.0 and cell["n"] == 1 and cell["saved_bytes"] > 0
    # full trains every weight; MEFT and LoRA far fewer
    assert cells["meft1"]["trainable_parameters"] < cells["full"]["trainable_parameters"]
    assert cells["lora"]["trainable_parameters"] < cells["full"]["trainable_parameters"]
    text = md.read_text()
    assert f"| meft1 | sst2 (accuracy) | {gq.LEARNING_RATES['meft1']:g} |" in text and "vs full" in text
    # second call reuses the finished runs (no training) and gives the same table
    assert gq.main(argv + ["--no_train"]) == 0
    assert json.loads(js.read_text())["table"]["sst2"]["meft1"]["mean"] == cells["meft1"]["mean"]
    # a finished run is not reused for a different budget: clear error naming the fix, nothing overwritten
    results = gq.run_dir(tmp_path / "runs", "meft1", "sst2", 1, gq.LEARNING_RATES["meft1"]) / "results.json"
    before = results.read_text()
    with pytest.raises(SystemExit, match="other flags.*--rerun"):
        gq.main([*argv[:argv.index("--max_steps")], "--max_steps", "3", *argv[argv.index("--max_steps") + 2:],
                 "--no_train"])
    assert results.read_text() == before


def test_search_picks_the_best_rate_on_the_selection_split(tmp_path):
    model = save_tiny_bert(tmp_path / "model", dropout=0.0)
    data = write_tiny_sst2(tmp_path / "sst2", train_lines=32, dev_lines=8)
    source = write_tiny_sst2(tmp_path / "source", train_lines=96, dev_lines=1) / "train.tsv"
    md, js = tmp_path / "q.md", tmp_path / "q.json"
    argv = ["--methods", "meft1", "--tasks", "sst2", "--seeds", "1", "--max_steps", "3", "--ranks", "1",
            "--no_bf16", "--per_device_train_batch_size", "8", "--model_name_or_path", str(model),
            "--data_dir", f"sst2={data}", "--work_dir", str(tmp_path / "runs"), "--out_md", str(md),
            "--out_json", str(js), "--port", str(free_port()), "--no_saved_bytes", "--search",
            "--grid", "meft1=1e-06,0.05", "--select_from", str(source)]
    with pytest.raises(SystemExit, match="only .* sentences outside"):  # 96 - 32 < 872 by default
        gq.main(argv)
    assert gq.main(argv + ["--select_size", "40"]) == 0
    out = json.loads(js.read_text())
    scores = out["search"]["meft1"]["scores"]
    assert set(scores) == {"1e-06", "0.05"}
    best = max(scores, key=scores.get)
    assert out["search"]["meft1"]["best"] == float(best) == out["budget"]["learning_rates"]["meft1"]
    # the table's run used the chosen rate; the search's runs trained on the held-out split, not on dev
    assert gq.run_dir(tmp_path / "runs", "meft1", "sst2", 1, float(best)).exists()
    dev = (tmp_path / "runs" / "sst2-select" / "dev.tsv").read_text().splitlines()
    train = set((data / "train.tsv").read_text().splitlines()[1:])
    assert len(dev) == 41 and not train & set(dev[1:])
    assert not set((data / "dev.tsv").read_text().splitlines()[1:]) & set(dev[1:])
    assert "Learning-rate search" in md.read_text() and "on 40 sentences" in md.read_text()
    # a rate fixed with --lr is not searched (nothing trains: --no_train)
    assert gq.main(argv + ["--select_size", "40", "--lr", "meft1=0.05", "--no_train"]) == 0
    out = json.loads(js.read_text())
    assert out["search"] == {} and out["budget"]["learning_rates"]["meft1"] == 0.05


def test_training_flags_ignore_interpreter_port_and_run_dir():
    a = ["/x/deepspeed", "--num_gpus", "2", "--master_port", "1", "/r/launch/train.py", "--seed", "1",
         "--output_dir", "/a"]
    b = ["/y/deepspeed", "--num_gpus", "2", "--master_port", "7", "/q/launch/train.py", "--seed", "1"]
    one = ["/y/python", "/r/launch/train.py", "--master_port", "2", "--seed", "1"]
    assert gq.training_flags(a) == gq.training_flags(b) == ["--num_gpus", "2", "--seed", "1"]
    assert gq.training_flags(one) == ["--seed", "1"]  # one rank vs two: a different run
    assert gq.training_flags(b) != gq.training_flags(b[:-1] + ["2"])  # another seed


def _fake_run(work: Path, data: Path, method: str, seed: int, curve: list[tuple[int, float]], cut_off: bool,
              eval_steps: int = 100) -> None:
    """A run directory as glue_quality leaves it, without training: its meta (the command the call below builds),
    its log (trainer JSON entries, one behind a progress bar as in a real log file) and, if it finished,
    results.json."""
    task = gq.TaskBudget("sst2", str(data), 64, 400)
    budget = gq.Budget(per_device_train_batch_size=4, ranks=1, bf16=False, eval_steps=eval_steps)
    lr = gq.LEARNING_RATES[method]
    out = gq.run_dir(work, method, "sst2", seed, lr, "plateau")
    out.mkdir(parents=True)
    cmd = gq.launch_command(method, task, seed, out, budget, lr, 1)
    (out / "glue_quality_run.json").write_text(json.dumps({"cmd": cmd, "wall_s": 50.0, "cut_off": cut_off}))
    lines = [" ".join(cmd), "2026-11-30 17:00:00,000 meft_ds.train: world size 1 | full | trainable parameters 7 of 9"]
    for i, (step, acc) in enumerate(curve):  # a train entry every 50 steps, 1 s apart: 0.02 s per step
        for s in range(step - 50, step + 1, 50):
            if s > 0:
                lines.append(f"2026-11-30 17:00:{s // 50:02d},000 meft_ds.train: "
                             f'{{"step": {s}, "epoch": 0.1, "train/loss": 0.5, "train/learning_rate": 0.001}}')
        bar = "train:  50%|#####     | 2/4 [00:01<00:01]" if i == 0 else ""
        lines.append(f"{bar}2026-11-30 17:00:{step // 50:02d},500 meft_ds.train: "
                     f'{{"step": {step}, "eval/validation/loss": 0.4, "eval/validation/accuracy": {acc}}}')
    if cut_off:
        lines.append("[glue_quality] cut off: --run_time_limit 60 s passed")
    else:
        (out / "results.json").write_text(json.dumps({"global_step": curve[-1][0], "trainable_parameters": 7,
                                                      "eval": {"validation": {"accuracy": curve[-1][1]}}}))
    (work / f"{out.name}.log").write_text("\n".join(lines) + "\n")


def test_curves_aggregated_plotted_and_cut_off_runs_marked(tmp_path):
    """Finished and cut-off runs (fake, no training): the curves' mean and spread per step, the table marking
    the cut-off run, no "within one point" verdict for it, and a real PNG written and read back."""
    import matplotlib.image

    data, work = write_tiny_sst2(tmp_path / "sst2", 8, 4), tmp_path / "runs"
    _fake_run(work, data, "full", 1, [(100, 0.80), (200, 0.84), (300, 0.86), (400, 0.88)], cut_off=False)
    _fake_run(work, data, "full", 2, [(100, 0.82), (200, 0.86), (300, 0.88), (400, 0.90)], cut_off=False)
    _fake_run(work, data, "meft1", 1, [(100, 0.70), (200, 0.75)], cut_off=True)  # cut off at step 200
    _fake_run(work, data, "meft1", 2, [(100, 0.72), (200, 0.79), (300, 0.85), (400, 0.89)], cut_off=False)
    md, js = tmp_path / "docs" / "q.md", tmp_path / "docs" / "q.json"
    argv = ["--methods", "full", "meft1", "--tasks", "sst2", "--seeds", "1", "2", "--max_steps", "400", "--ranks",
            "1", "--no_bf16", "--per_device_train_batch_size", "4", "--eval_steps", "100", "--tag", "plateau",
            "--data_dir", f"sst2={data}", "--work_dir", str(work), "--out_md", str(md), "--out_json", str(js),
            "--no_train", "--no_saved_bytes"]
    assert gq.main(argv) == 0
    table = json.loads(js.read_text())["table"]["sst2"]
    full, meft1 = table["full"], table["meft1"]
    assert [p["step"] for p in full["curve"]] == [100, 200, 300, 400]
    assert full["curve"][1]["mean"] == pytest.approx(0.85) and full["curve"][1]["std"] == pytest.approx(0.0141421356)
    assert full["mean"] == pytest.approx(0.89) and full["cut_off"] == {}
    assert full["seconds_per_step"][0] == pytest.approx(0.02)
    # one seed cut off at step 200: the cell's statistics are at step 200 for both seeds, not 0.75 mixed with 0.89
    assert meft1["cut_off"] == {"1": 200} and meft1["at_step"] == 200 and meft1["values"] == [0.75, 0.79]
    assert meft1["mean"] == pytest.approx(0.77) and meft1["n"] == 2
    assert [p["n"] for p in meft1["curve"]] == [2, 2, 1, 1] and meft1["curve"][1]["mean"] == pytest.approx(0.77)
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| meft1 | sst2"))
    assert "77.00 +- 2.83 **at step 200 (cut off: not a plateau)**" in row and "| 1: 200 | 7 |" in row
    cut_run = next(r for r in json.loads(js.read_text())["runs"] if r["cut_off"])
    assert cut_run["trainable_parameters"] == 7 and cut_run["steps_done"] == 200  # read from its log
    assert "| sst2 | meft1 | None | None |" in text  # no verdict against a cut-off run
    assert "| 200 | 85.00 +- 1.41 | 77.00 +- 2.83 |" in text and "| 300 | 87.00 +- 1.41 | 85.00 +- 0.00 (1) |" in text
    png = md.parent / "q_sst2_curves.png"
    assert f"![dev accuracy vs step, sst2]({png.name})" in text
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (420, 700)
    colours = {tuple(px) for px in (image[..., :3] * 255).astype(int).reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 20  # lines, bands and text drawn, not a blank canvas


def test_run_time_limit_ends_the_whole_process_group(tmp_path):
    """A run past --run_time_limit is cut off: it and the process it started are gone, and no failure is raised."""
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
              "time.sleep(120)")
    wall, cut_off = gq.run_one([sys.executable, "-c", script], tmp_path / "run", tmp_path / "run.log", 1, time_limit=3)
    assert cut_off and 3 <= wall < 60
    assert "cut off: --run_time_limit 3 s passed" in (tmp_path / "run.log").read_text()
    child = int(pid_file.read_text())
    import os
    import time
    for _ in range(50):  # SIGTERM reached the child: it is gone (or a zombie of its ended parent, reaped by init)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the run's child process {child} outlived the time limit")
    # a run that ends within its limit is not cut off; one that fails is an error, as before
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "results.json").write_text("{}")
    assert gq.run_one([sys.executable, "-c", "pass"], tmp_path / "ok", tmp_path / "ok.log", 1, 30)[1] is False
    with pytest.raises(RuntimeError, match="run failed"):
        gq.run_one([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad", tmp_path / "bad.log", 1, 30)


def test_selection_split_held_out_of_the_whole_training_file(tmp_path):
    """--plateau trains on the full SST-2 train: the selection split is held out of it, not drawn beside it."""
    data = write_tiny_sst2(tmp_path / "sst2", train_lines=60, dev_lines=2)
    out = gq.selection_split(data, data / "train.tsv", tmp_path / "select", size=20)
    train = (out / "train.tsv").read_text().splitlines()
    select = (out / "dev.tsv").read_text().splitlines()
    sentences = lambda lines: {line.split("\t")[0] for line in lines[1:]}  # noqa: E731
    assert train[0] == select[0] and len(select) == 21
    assert not sentences(train) & sentences(select)
    assert sentences(train) | sentences(select) == sentences((data / "train.tsv").read_text().splitlines())
