"""Per-rank telemetry (meft_ds/training/telemetry.py) and the report command (meft_ds/training/telemetry_report.py).

Unit tests: the measuring functions, gather_to_rank0 without a process group, RankWriter read back with
TensorBoard's event reader, the report's table, chart and errors. Slow tests: 2-rank DeepSpeed runs
(gloo) under the deepspeed launcher and under mpirun write rank_0/ and rank_1/ runs with the same tags,
one event per logged step, and plausible values (ZeRO-2 halves the optimizer state: 12 bytes per
trainable weight in total, 6 per rank); the exact-arithmetic run's reconstruction error is 0, the float
one's small but not 0.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from meft_ds.training import telemetry, telemetry_report
from train_helpers import REPO, free_port, launch_env, launcher_command, run, save_tiny_bert, write_tiny_sst2

STEPS, RECONSTRUCTION_STEPS = 4, 2
PER_STEP_TAGS = {
    "memory/resident_bytes", "memory/peak_resident_bytes", "memory/param_bytes", "memory/grad_bytes",
    "memory/optimizer_state_bytes", "memory/saved_bytes", "train/loss", "train/learning_rate",
    "perf/step_time_s", "perf/samples_per_second", "perf/tokens_per_second", "perf/log_time_s",
}


def _read(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


# --- unit tests ---------------------------------------------------------------------------------------

def test_device_memory_on_cpu_peak_is_at_least_current():
    stats = telemetry.device_memory(torch.device("cpu"))
    assert set(stats) == set(telemetry.CPU_MEMORY_TAGS)
    assert stats["memory/peak_resident_bytes"] >= stats["memory/resident_bytes"] > 10 * 2**20


PEAK_RESET_SCRIPT = """
import json, torch
from meft_ds.training import telemetry
cpu = torch.device("cpu")
telemetry.device_memory(cpu)
block = torch.ones(256 * 2**20, dtype=torch.uint8)  # touch 256 MiB, then free it
del block
with_block = telemetry.device_memory(cpu)
after = telemetry.device_memory(cpu)
print(json.dumps([with_block["memory/peak_resident_bytes"], after["memory/peak_resident_bytes"]]))
"""


def test_peak_resident_is_reset_at_each_read():
    # A fresh process: in the long-lived test process freed heap pages may already be resident, so a
    # new block need not raise the RSS at all (seen in a full-suite run).
    out = subprocess.run([sys.executable, "-c", PEAK_RESET_SCRIPT], capture_output=True, text=True, check=True)
    with_block, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert with_block - after > 128 * 2**20


def test_bytes_held_by_a_plain_adam_step():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 1))
    weights = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    assert telemetry.grad_bytes(model, optimizer) == 4 * weights
    optimizer.step()
    assert telemetry.param_bytes(model) == 4 * weights
    # the parameters (the "master" copy here) and two moments, plus Adam's scalar step counters
    assert 12 * weights <= telemetry.optimizer_state_bytes(optimizer) <= 12 * weights + 8 * 4


def test_gather_to_rank0_without_a_process_group():
    stats = {"b": 2.0, "a": 1.5}
    assert telemetry.gather_to_rank0(stats, torch.device("cpu")) == [stats]


def _write_fake_run(logging_dir, world_size=2, steps=(5, 10, 12)):
    writer = telemetry.RankWriter(str(logging_dir), world_size, rank=0)
    for step in steps:
        writer.write([{"memory/resident_bytes": 2**30 + r * 2**28 + step * 2**20,
                       "memory/peak_resident_bytes": 2**30 + r * 2**28 + step * 2**21,
                       "memory/optimizer_state_bytes": 1200.0 / world_size, "perf/step_time_s": 0.5 * (r + 1),
                       "perf/samples_per_second": 16 / (0.5 * (r + 1)), "perf/tokens_per_second": 500.0}
                      for r in range(world_size)], step)
    writer.close()


def test_rank_writer_writes_one_run_per_rank_with_the_same_tags(tmp_path):
    _write_fake_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0", "rank_1"]
    runs = [_read(tmp_path / f"rank_{r}") for r in (0, 1)]
    assert runs[0].keys() == runs[1].keys()
    assert sorted(runs[1]["memory/resident_bytes"]) == [5, 10, 12]
    assert runs[1]["memory/resident_bytes"][10] == 2**30 + 2**28 + 10 * 2**20


def test_rank_writer_on_other_ranks_writes_nothing(tmp_path):
    writer = telemetry.RankWriter(str(tmp_path), world_size=2, rank=1)
    writer.write(None, 1)
    writer.close()
    assert not list(tmp_path.iterdir())


def test_report_table_weights_windows_by_steps(tmp_path, capsys):
    _write_fake_run(tmp_path)
    assert telemetry_report.main([str(tmp_path), "--output", str(tmp_path / "chart.png")]) == 0
    out = capsys.readouterr().out
    rows = [telemetry_report.summarize(s) for s in telemetry_report.load_runs(tmp_path)]
    assert [r["rank"] for r in rows] == [0, 1]
    assert rows[1]["mean_step_time_s"] == pytest.approx(1.0)
    assert rows[0]["samples_per_second"] == pytest.approx(32.0)
    assert rows[1]["peak_memory_bytes"] == 2**30 + 2**28 + 12 * 2**21
    assert "1.27 GiB" in out and (tmp_path / "chart.png").stat().st_size > 10_000


def test_report_errors_without_rank_runs(tmp_path, capsys):
    assert telemetry_report.main([str(tmp_path)]) == 2
    assert "holds no rank_<r>/ runs" in capsys.readouterr().err
    assert telemetry_report.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_reconstruction_error_flag_needs_a_reversible_meft_run():
    from meft_ds.training import RunArgs

    with pytest.raises(ValueError, match="--method meft --backward reversible"):
        RunArgs(method="lora", reconstruction_error_steps=2, model_name_or_path="x")
    with pytest.raises(ValueError, match=">= 0"):
        RunArgs(reconstruction_error_steps=-1, model_name_or_path="x")


# --- 2-rank runs ----------------------------------------------------------------------------------------

def _flags(tmp_path, output: str, *extra) -> list:
    return ["--model_name_or_path", tmp_path / "model", "--task_name", "sst2", "--data_dir", tmp_path / "data",
            "--deepspeed", "cpu", "--max_seq_length", 32, "--per_device_train_batch_size", 4,
            "--gradient_accumulation_steps", 2, "--max_steps", STEPS, "--logging_steps", 1,
            "--reconstruction_error_steps", RECONSTRUCTION_STEPS, "--log_saved_bytes",
            "--output_dir", tmp_path / output, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("telemetry")
    save_tiny_bert(tmp_path / "model", dropout=0.1)
    write_tiny_sst2(tmp_path / "data", train_lines=64, dev_lines=8)
    jobs = {"deepspeed": launcher_command("deepspeed", free_port()) + _flags(tmp_path, "deepspeed"),
            "mpirun": launcher_command("mpirun", free_port()) + _flags(tmp_path, "mpirun", "--stream_arithmetic",
                                                                      "float")}
    for name, command in jobs.items():
        result = run(command)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_every_rank_writes_its_run(runs, launcher):
    logging_dir = runs / launcher / "runs"
    results = json.loads((runs / launcher / "results.json").read_text())
    per_rank = [_read(logging_dir / f"rank_{r}") for r in (0, 1)]
    assert sorted(p.name for p in logging_dir.iterdir() if p.is_dir()) == ["rank_0", "rank_1"]
    expected_tags = PER_STEP_TAGS | {"reversible/reconstruction_error"}
    single_rank_total = 12 * results["trainable_parameters"]  # fp32 master + 2 Adam moments per weight
    for rank, scalars in enumerate(per_rank):
        assert set(scalars) == expected_tags, rank
        for tag in PER_STEP_TAGS:
            assert sorted(scalars[tag]) == list(range(1, STEPS + 1)), (rank, tag)
        assert sorted(scalars["reversible/reconstruction_error"]) == [2, 4]
        for step in range(1, STEPS + 1):
            value = {tag: steps[step] for tag, steps in scalars.items() if step in steps}
            assert value["memory/peak_resident_bytes"] >= value["memory/resident_bytes"] > 100 * 2**20
            assert 0.45 * single_rank_total < value["memory/optimizer_state_bytes"] < 0.55 * single_rank_total
            # ZeRO-2: this rank's fp32 gradient partition, a third of its optimizer state
            assert value["memory/grad_bytes"] == pytest.approx(value["memory/optimizer_state_bytes"] / 3, rel=0.01)
            assert value["memory/param_bytes"] > 4 * results["trainable_parameters"]  # frozen weights too
            assert value["memory/saved_bytes"] > 0
            assert value["perf/samples_per_second"] > 0 and value["perf/tokens_per_second"] > 0
            assert value["perf/step_time_s"] > 0
        assert scalars["perf/log_time_s"][1] == 0.0 and all(scalars["perf/log_time_s"][s] > 0 for s in (2, 3, 4))
        # 4 sentences x 2 micro-batches per step and rank: tokens/s over samples/s is the mean length
        mean_length = scalars["perf/tokens_per_second"][1] / scalars["perf/samples_per_second"][1]
        assert 3 <= mean_length <= 32
    assert results["optimizer_state_bytes_per_rank"] == [int(per_rank[r]["memory/optimizer_state_bytes"][STEPS])
                                                         for r in (0, 1)]
    # Each rank logs its own loss; their mean is the run-level loss in trainer_state.json.
    state = json.loads((runs / launcher / "trainer_state.json").read_text())
    run_loss = {e["step"]: e["train/loss"] for e in state["log_history"] if "train/loss" in e}
    for step in range(1, STEPS + 1):
        mean = (per_rank[0]["train/loss"][step] + per_rank[1]["train/loss"][step]) / 2
        assert mean == pytest.approx(run_loss[step], rel=1e-5)
    errors = [scalars["reversible/reconstruction_error"][step] for scalars in per_rank for step in (2, 4)]
    if launcher == "deepspeed":  # exact stream arithmetic (the default): bit-exact reconstruction
        assert errors == [0.0] * 4
    else:  # float arithmetic: rounding only
        assert all(0 < e < 1e-4 for e in errors), errors


@pytest.mark.slow
def test_report_command_on_a_2_rank_run(runs):
    logging_dir = runs / "deepspeed" / "runs"
    chart = runs / "memory.png"
    result = subprocess.run([sys.executable, "-m", "meft_ds.training.telemetry_report", str(logging_dir), "--output", str(chart)],
                            cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["rank", "steps", "logged"]
    rows = [line.split() for line in lines[2:4]]
    assert [row[0] for row in rows] == ["0", "1"] and all(row[1] == str(STEPS) for row in rows)
    assert all("MiB" in row[3] or "GiB" in row[3] for row in rows)
    assert chart.stat().st_size > 20_000
