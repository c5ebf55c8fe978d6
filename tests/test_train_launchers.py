"""launch/train.py under deepspeed, torchrun, mpirun (2 ranks) and plain python (1 rank): the same run,
the same losses; resume from a mid-run checkpoint reproduces the uninterrupted loss curve; the adapter
export loads back onto the original model; ZeRO-2 halves the optimizer state per rank.

The tiny BERT has dropout on, so equal curves also need the data order and every rank's RNG restored.
Eight steps of a global batch of 16 over 96 examples cross an epoch boundary after step 6; the
checkpoint at step 4 is mid-epoch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from meft_ds.training.data import collate_fn, load_task_datasets, tokenize_dataset
from meft_ds.training import load_adapter_model
from meft_ds.training.modeling import load_tokenizer
from meft_ds.training.trainer import eval_loss
from train_helpers import (REPO, free_port, launcher_command, run, save_tiny_bert, save_tiny_opt, train_losses,
                           write_tiny_sst2)

LAUNCHERS = ("deepspeed", "torchrun", "mpirun")
STEPS, SAVE_STEPS = 8, 4


def _flags(tmp_path, output: str, accumulation: int = 2) -> list:
    return ["--model_name_or_path", tmp_path / "model", "--task_name", "sst2", "--data_dir", tmp_path / "data",
            "--deepspeed", "cpu", "--max_seq_length", 32, "--per_device_train_batch_size", 4,
            "--gradient_accumulation_steps", accumulation, "--learning_rate", 1e-2, "--warmup_ratio", 0.25,
            "--max_steps", STEPS, "--save_steps", SAVE_STEPS, "--eval_steps", SAVE_STEPS, "--logging_steps", 1,
            "--output_dir", tmp_path / output]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("launchers")
    save_tiny_bert(tmp_path / "model", dropout=0.1)
    write_tiny_sst2(tmp_path / "data", train_lines=96, dev_lines=24)
    jobs = {name: launcher_command(name, free_port()) + _flags(tmp_path, name) for name in LAUNCHERS}
    # One rank, twice the accumulation: the same global batch of 16.
    jobs["python"] = launcher_command("python", free_port()) + _flags(tmp_path, "python", accumulation=4)
    jobs["resumed"] = launcher_command("torchrun", free_port()) + _flags(tmp_path, "resumed") + [
        "--resume_from_checkpoint", tmp_path / "deepspeed" / f"checkpoint-{SAVE_STEPS}"]
    for name, command in jobs.items():  # sequential: "resumed" reads the deepspeed run's checkpoint
        result = run(command)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return tmp_path


@pytest.mark.slow
def test_launchers_report_the_same_losses(runs):
    curves = {name: train_losses(runs / name) for name in LAUNCHERS}
    assert sorted(curves["deepspeed"]) == list(range(1, STEPS + 1))
    for name in LAUNCHERS[1:]:
        assert curves[name].keys() == curves["deepspeed"].keys()
        for step, loss in curves["deepspeed"].items():
            assert math.isclose(curves[name][step], loss, rel_tol=1e-6), (name, step)
    results = {name: json.loads((runs / name / "results.json").read_text()) for name in LAUNCHERS}
    assert all(r["world_size"] == 2 and r["global_step"] == STEPS for r in results.values())
    # Training did something: the last losses are below the first ones.
    losses = list(curves["deepspeed"].values())
    assert sum(losses[-2:]) < sum(losses[:2])


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(runs):
    uninterrupted, resumed = train_losses(runs / "deepspeed"), train_losses(runs / "resumed")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-4 carried over from the checkpoint
    for step in range(SAVE_STEPS + 1, STEPS + 1):
        assert math.isclose(resumed[step], uninterrupted[step], rel_tol=1e-6), step
    first = json.loads((runs / "deepspeed" / "results.json").read_text())["eval"]["validation"]
    second = json.loads((runs / "resumed" / "results.json").read_text())["eval"]["validation"]
    assert math.isclose(first["loss"], second["loss"], rel_tol=1e-6)


@pytest.mark.slow
def test_checkpoints_exclude_frozen_weights(runs):
    checkpoint = runs / "deepspeed" / f"checkpoint-{SAVE_STEPS}"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    model_size = (runs / "model" / "model.safetensors").stat().st_size
    assert size < model_size / 4, (size, model_size)  # trainable weights + optimizer state only
    assert not list(runs.glob("*/.tmp-checkpoint-*"))


@pytest.mark.slow
def test_optimizer_state_per_rank_is_half_the_single_rank_total(runs):
    single = json.loads((runs / "python" / "results.json").read_text())["optimizer_state_bytes_per_rank"]
    double = json.loads((runs / "deepspeed" / "results.json").read_text())["optimizer_state_bytes_per_rank"]
    print(f"optimizer-state bytes: 1 rank {single}, 2 ranks {double}")
    assert len(single) == 1 and len(double) == 2
    for value in double:
        assert 0.45 * single[0] < value < 0.55 * single[0]


@pytest.mark.slow
def test_exported_adapter_loads_onto_the_original_model(runs):
    output = runs / "deepspeed"
    model = load_adapter_model(str(output))
    tokenizer = load_tokenizer(str(runs / "model"))
    raw, spec = load_task_datasets(task_name="sst2", data_dir=str(runs / "data"))
    dev = tokenize_dataset(raw, tokenizer, spec, max_seq_length=32)["validation"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in collate_fn(tokenizer)(list(dev)).items() if k != "labels"}).logits
    labels = torch.tensor(list(dev["labels"]))
    reported = json.loads((output / "results.json").read_text())["eval"]["validation"]
    assert math.isclose(eval_loss(spec, logits, labels), reported["loss"], rel_tol=1e-5)
    assert math.isclose((logits.argmax(-1) == labels).double().mean().item(), reported["accuracy"])


@pytest.mark.slow
def test_causal_lm_run_with_a_tiny_opt(tmp_path):
    """--lm on prompt/answer JSON lines with a decoder: trains, reports loss and perplexity, freezes the
    default third of the layers, and its export loads back as a causal LM."""
    model_dir = save_tiny_opt(tmp_path / "opt")
    data = REPO / "data" / "lm_example.jsonl"
    output = tmp_path / "out"
    result = run(launcher_command("python", free_port()) + [
        "--model_name_or_path", model_dir, "--lm", "--train_file", data, "--validation_file", data,
        "--deepspeed", "cpu", "--max_seq_length", 48, "--per_device_train_batch_size", 8,
        "--learning_rate", 1e-2, "--max_steps", 6, "--logging_steps", 1, "--output_dir", output])
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((output / "results.json").read_text())["eval"]["validation"]
    assert math.isfinite(metrics["loss"]) and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    losses = list(train_losses(output).values())
    assert losses[-1] < losses[0]
    recipe = json.loads((output / "adapter_config.json").read_text())
    assert recipe["task_kind"] == "causal_lm" and recipe["meft_config"]["num_frozen_layers"] == 1
    model = load_adapter_model(str(output))
    assert type(model).__name__ == "OPTForCausalLM"


@pytest.mark.slow
def test_bad_data_fails_cleanly_on_every_rank(tmp_path):
    """An input error found while loading data (rank 0 first, then the others) stops both ranks with the
    same one-line error, instead of leaving one rank waiting for the other."""
    save_tiny_bert(tmp_path / "model", dropout=0.0)
    data = write_tiny_sst2(tmp_path / "data", train_lines=32, dev_lines=8)
    lines = (data / "train.tsv").read_text().splitlines(keepends=True)
    lines[5] = "a sentence with an impossible label\t7\n"
    (data / "train.tsv").write_text("".join(lines))
    result = run(launcher_command("torchrun", free_port()) + [
        "--model_name_or_path", tmp_path / "model", "--task_name", "sst2", "--data_dir", data,
        "--output_dir", tmp_path / "out"], timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ") and "'7'" in line]
    assert len(errors) == 2, result.stderr[-4000:]
    assert not (tmp_path / "out").exists()
