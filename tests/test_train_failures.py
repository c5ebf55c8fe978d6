"""Runs that must stop, or go on, loudly: non-finite steps (--nonfinite), resumes that are not the same run,
and inputs that cannot work offline. Each is a real short run of launch/train.py on a tiny BERT."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from train_helpers import REPO, SST2_SAMPLE, free_port, launcher_command, run, save_tiny_bert, write_preset, write_tiny_sst2


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
        # The label, not a layer, overflowed: every MEFT layer's output was finite, and the message says so.
        assert "first non-finite stream: rank 0: none of MEFT layers 0-1 (their outputs were finite)" in errors[0]
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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """A finished 4-step MEFT1 run (ZeRO-2 fp32, no warm-up) with checkpoints at steps 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("resume")
    write_tiny_sst2(tmp_path / "data", train_lines=32, dev_lines=8)
    result = run(sst2_flags(tmp_path, tiny_model, "first") + ["--max_steps", 4, "--save_steps", 2])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def sst2_flags(tmp_path, model, output: str) -> list:
    return [*launcher_command("python", free_port()), "--model_name_or_path", model, "--task_name", "sst2",
            "--data_dir", tmp_path / "data", "--max_seq_length", 32, "--per_device_train_batch_size", 8,
            "--learning_rate", 1e-3, "--logging_steps", 1, "--variant", "meft1", "--output_dir", tmp_path / output]


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [
    (["--variant", "meft2"], "model_recipe.meft_config.variant='meft1', this run has 'meft2'"),
    (["--deepspeed", "zero3"], "zero_stage=2, this run has 3"),
    (["--max_steps", 1], "is at step 2, past this run's 1 steps"),
    (["--world_size", 2], "was saved by 2 ranks, this run has 1: re-sharding needs every rank's DeepSpeed shard in "
                          "one folder, and rank 0's disk lacks deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt; "
                          "gather each host's checkpoint-<step>/"),
    (["--per_device_train_batch_size", 4], "was trained with global batch 8, this run has 4; resume with the same global batch"),
])
def test_a_resume_that_is_not_the_same_run_is_refused(finished_run, tiny_model, change, field, tmp_path):
    checkpoint = finished_run / "first" / "checkpoint-2"
    if change[0] == "--deepspeed":
        change = ["--deepspeed", write_preset(finished_run / "zero3.json", stage=3)]
    elif change[0] == "--world_size":  # as if saved by 2 ranks on two disks: rank 1's shard is not on this one
        checkpoint = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint-2"))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps(state | {"world_size": 2}))
        change = []
    flags = sst2_flags(finished_run, tiny_model, "other") + ["--max_steps", 4, "--resume_from_checkpoint", checkpoint]
    result = run(flags + change, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and field in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (finished_run / "other").exists()


@pytest.mark.slow
def test_a_resume_with_more_steps_continues_on_the_recomputed_schedule(finished_run, tiny_model):
    """The finished run's step 4 ran at 0.25 of the peak and left lr 0 for a next step (linear decay to 0 at
    step 4); resumed for 8 steps, step 5 runs at the new schedule's (8 - 4) / 8 = 0.5 of the peak instead,
    and the log says so."""
    result = run(sst2_flags(finished_run, tiny_model, "longer") + [
        "--max_steps", 8, "--resume_from_checkpoint", finished_run / "first" / "checkpoint-4"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the learning-rate schedule is recomputed for 8 steps (0 warm-up): step 5 runs at lr 0.0005" in result.stderr
    state = json.loads((finished_run / "longer" / "trainer_state.json").read_text())
    rates = {e["step"]: e["train/learning_rate"] for e in state["log_history"] if "train/learning_rate" in e}
    assert rates[4] == pytest.approx(0.25e-3) and rates[5] == pytest.approx(0.5e-3) and rates[8] == pytest.approx(0.125e-3)
    assert state["total_steps"] == 8 and state["model_recipe"]["meft_config"]["variant"] == "meft1"


def test_check_same_run_names_every_differing_field_in_one_line():
    from meft_ds.training.trainer import check_same_run

    saved = {"model_recipe": {"method": "meft", "base_model_name_or_path": "a",
                              "meft_config": {"variant": "meft1", "adapter_dim": 8, "backward": "reversible"}},
             "zero_stage": 2, "precision": "fp32", "optimizer": {"type": "AdamW"}}
    same = json.loads(json.dumps(saved))
    same["model_recipe"]["base_model_name_or_path"] = "moved"  # the base model may move
    same["model_recipe"]["meft_config"]["backward"] = "vanilla"  # the same function, other memory trade-off
    check_same_run(saved, same, "ckpt")
    other = json.loads(json.dumps(saved))
    other["model_recipe"]["meft_config"]["adapter_dim"] = 4
    other["precision"] = "bf16"
    with pytest.raises(ValueError, match=r"model_recipe.meft_config.adapter_dim=8, this run has 4; precision='fp32', "
                                         r"this run has 'bf16'\. Resume") as error:
        check_same_run(saved, other, "ckpt")
    assert "\n" not in str(error.value)
    check_same_run({"global_step": 3}, other, "old checkpoint")  # written before the check existed: warned only


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_forward_overflow_is_a_skipped_deepspeed_step(tmp_path, precision):
    """scripts/overflow_step_check.py on CPU: an Inf inside one reversible layer's F (exact arithmetic) makes the
    step's loss NaN and its gradient norm non-finite; DeepSpeed ZeRO-2 skips the update, the next step applies.
    (fp16 with the loss scale drop: the same script in scripts/gpu_check.sh.)"""
    out = tmp_path / "record.json"
    result = run([sys.executable, REPO / "scripts" / "overflow_step_check.py", "--precision", precision, "--out", out],
                 timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert [s["applied"] for s in steps] == [True, False, True] and steps[1]["weights_unchanged"]
    assert not math.isfinite(steps[1]["loss"]) and not math.isfinite(steps[1]["grad_norm"])
