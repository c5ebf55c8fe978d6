"""Runs that must stop, or go on, loudly: non-finite steps (--nonfinite), resumes that are not the same run,
and inputs that cannot work offline. Each is a real short run of launch/train.py on a tiny BERT."""

from __future__ import annotations

import csv
import json

import pytest

from train_helpers import SST2_SAMPLE, free_port, launcher_command, run, save_tiny_bert


def write_regression_csv(path, rows: int, bad_row: int | None, bad_label: str = "1e30"):
    """STS-B-like rows (real SST-2 sentences as both texts, label in [0, 5]); `bad_row` gets `bad_label`."""
    sentences = [line.split("\t")[0] for line in (SST2_SAMPLE / "train.tsv").read_text().splitlines()[1:rows + 1]]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence1", "sentence2", "label"])
        for i, sentence in enumerate(sentences):
            writer.writerow([sentence, sentence[::-1], bad_label if i == bad_row else f"{(i % 11) / 2:.1f}"])
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("model") / "bert", dropout=0.0)


def regression_flags(tmp_path, model, output: str, train_file, steps: int = 4) -> list:
    return [*launcher_command("python", free_port()), "--model_name_or_path", model, "--task_name", "stsb",
            "--train_file", train_file, "--validation_file", train_file, "--deepspeed", "cpu",
            "--max_seq_length", 32, "--per_device_train_batch_size", 8, "--max_steps", steps,
            "--learning_rate", 1e-3, "--logging_steps", 1, "--output_dir", tmp_path / output]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_step_stops_or_is_skipped(tmp_path, tiny_model, policy):
    """One label of 1e30 among 32 rows: that step's MSE loss and gradient norm overflow float32 (inf).
    DeepSpeed skips the update; --nonfinite stop ends the run in one line naming step and rank, nothing
    exported; --nonfinite skip logs it and trains on to a finite export."""
    train_file = write_regression_csv(tmp_path / "train.csv", rows=32, bad_row=5)
    result = run(regression_flags(tmp_path, tiny_model, "out", train_file) + ["--nonfinite", policy], timeout=300)
    output = tmp_path / "out"
    if policy == "stop":
        assert result.returncode == 3, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "non-finite loss on rank 0 (inf)" in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert not (output / "adapter_model.safetensors").exists()
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "step skipped (--nonfinite skip; 1 in a row)" in result.stderr
        from safetensors.torch import load_file
        import torch

        weights = load_file(output / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        state = json.loads((output / "trainer_state.json").read_text())
        assert state["global_step"] == 4
