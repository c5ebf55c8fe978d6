"""Run settings, data order, schedule, checkpoint atomicity and the adapter export, without launching
DeepSpeed; and the launcher's one-line errors for bad input, which leave existing files untouched."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, OPTConfig

from meft_ds import MEFTConfig
from meft_ds.models import default_num_frozen_layers
from meft_ds.training import (RunArgs, build_parser, export_adapter, find_latest_checkpoint, load_adapter_model,
                             parse_args)
from meft_ds.training.args import DEFAULT_DATA_DIR
from meft_ds.training.checkpoint import TRAINER_STATE, resolve_resume_path, save_checkpoint
from meft_ds.training.distributed import DistEnv
from meft_ds.training.modeling import ModelRecipe, build_model, param_groups
from meft_ds.training.trainer import global_batches, linear_schedule, micro_batch
from train_helpers import free_port, launcher_command, run, save_tiny_bert, write_tiny_sst2

ISSUE_FLAGS = (
    "model_name_or_path task_name data_dir train_file validation_file max_seq_length per_device_train_batch_size "
    "gradient_accumulation_steps learning_rate num_train_epochs max_steps warmup_ratio weight_decay seed output_dir "
    "logging_dir eval_steps save_steps resume_from_checkpoint deepspeed variant adapter_dim lam beta "
    "num_frozen_layers num_reversible_layers backward method local_rank"
).split()
SINGLE_RANK = DistEnv(rank=0, world_size=1, local_rank=0)


def test_every_issue_flag_exists_with_help():
    actions = {a.dest: a for a in build_parser()._actions}
    for flag in ISSUE_FLAGS:
        assert flag in actions, flag
        assert len(actions[flag].help) > 20, flag
    assert set(actions["method"].choices) == {"meft", "full", "lora"}
    assert set(actions["backward"].choices) == {"reversible", "vanilla"}


def test_every_meft_config_field_is_a_flag_with_its_default():
    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(MEFTConfig):
        assert actions[f.name].default == f.default and actions[f.name].help.startswith(f.metadata["help"][:40])
    args = parse_args(["--frac_bits", "40", "--no-split_layer_recompute", "--adapter_init", "zero_up"])
    config = args.meft_config()
    assert (config.frac_bits, config.split_layer_recompute, config.adapter_init) == (40, False, "zero_up")


def test_defaults_are_the_offline_model_and_the_sst2_sample():
    args = RunArgs()
    assert Path(args.model_name_or_path, "config.json").is_file()
    assert (args.task_name, args.data_dir) == ("sst2", str(DEFAULT_DATA_DIR))
    assert args.logging_dir == str(Path("output", "runs"))
    assert args.deepspeed == ("zero2_bf16" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"bf16": True, "fp16": True}, "--bf16 and --fp16"),
    ({"warmup_ratio": 1.5}, "--warmup_ratio"),
    ({"learning_rate": -1.0}, "--learning_rate"),
    ({"per_device_train_batch_size": 0}, "--per_device_train_batch_size"),
    ({"max_steps": -1, "num_train_epochs": 0}, "--max_steps"),
    ({"data_dir": "a", "train_file": "b"}, "--data_dir"),
    ({"lm": True}, "--lm"),
    ({"method": "lora", "num_frozen_layers": 2}, "--num_frozen_layers applies to --method meft only"),
    ({"method": "full", "num_frozen_layers": 0}, "--num_frozen_layers applies to --method meft only"),
    ({"lam": 0.3}, r"--lam=0.3 is not 1/m"),  # MEFTConfig's check, before any weight is loaded
    ({"frac_bits": 50}, r"--frac_bits=50 must be an integer in \[8, 45\]"),
])
def test_invalid_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunArgs(model_name_or_path="unused", **kwargs)


def test_an_unknown_nonfinite_policy_is_a_choice_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--nonfinite", "maybe"])
    assert exit_info.value.code == 2
    assert "error: argument --nonfinite: invalid choice: 'maybe'" in capsys.readouterr().err  # then the choices


def test_check_inputs_finds_missing_files_and_keeps_earlier_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_file"):
        RunArgs(model_name_or_path="m", train_file=str(tmp_path / "nope.csv"),
                output_dir=str(tmp_path / "o")).check_inputs()
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        RunArgs(model_name_or_path="m", resume_from_checkpoint=str(tmp_path / "nope"),
                output_dir=str(tmp_path / "o")).check_inputs()
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        RunArgs(model_name_or_path="m", output_dir=str(earlier)).check_inputs()
    RunArgs(model_name_or_path="m", output_dir=str(earlier), overwrite_output_dir=True).check_inputs()
    RunArgs(model_name_or_path="m", output_dir=str(earlier), resume_from_checkpoint="latest").check_inputs()
    assert (earlier / "results.json").read_text() == "{}"


@pytest.mark.parametrize("config, expected", [
    (OPTConfig(num_hidden_layers=24), 8),
    (LlamaConfig(num_hidden_layers=32), 10),
])
def test_deep_decoders_freeze_a_third_of_their_layers_by_default(config, expected):
    assert default_num_frozen_layers(config) == expected


def test_encoders_freeze_nothing_by_default():
    from transformers import BertConfig

    assert default_num_frozen_layers(BertConfig(num_hidden_layers=12)) == 0


@pytest.mark.parametrize("world_size, accumulation", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_a_global_batch_is_the_same_whatever_the_split(world_size, accumulation):
    micro = 16 // (world_size * accumulation)
    for epoch in range(3):
        batches = global_batches(100, 16, seed=7, epoch=epoch)
        assert len(batches) == 6  # the last partial batch (4 examples) is dropped
        for batch in batches:
            parts = [micro_batch(batch, k, r, world_size, micro)
                     for k in range(accumulation) for r in range(world_size)]
            assert all(len(p) == micro for p in parts)
            assert sorted(itertools.chain(*parts)) == sorted(batch)
    assert global_batches(100, 16, 7, 0) == global_batches(100, 16, 7, 0) != global_batches(100, 16, 7, 1)
    assert len(set(itertools.chain(*global_batches(100, 16, 7, 0)))) == 96


def test_linear_warmup_then_decay():
    factor = linear_schedule(total_steps=10, warmup_steps=4)
    values = [factor(step) for step in range(11)]
    assert values[:4] == [0.2, 0.4, 0.6, 0.8] and values[4] == 1.0 and values[10] == 0.0
    assert all(a > b for a, b in zip(values[4:], values[5:]))
    assert linear_schedule(10, 0)(0) == 1.0


class _FailingEngine:
    """Writes part of a checkpoint, then dies (as a killed or out-of-disk save would)."""

    def save_checkpoint(self, save_dir, **kwargs):
        Path(save_dir, "deepspeed").mkdir(parents=True)
        Path(save_dir, "deepspeed", "partial.pt").write_bytes(b"x")
        raise OSError("disk full")


class _Engine:
    def __init__(self, module=None):
        self.module = module

    def save_checkpoint(self, save_dir, **kwargs):
        Path(save_dir, "deepspeed").mkdir(parents=True)
        Path(save_dir, "deepspeed", "model.pt").write_bytes(b"x")


def test_an_interrupted_save_never_looks_complete(tmp_path):
    state = {"global_step": 4, "world_size": 1, "global_batch_size": 8, "log_history": []}
    good = save_checkpoint(_Engine(), str(tmp_path), state, SINGLE_RANK)
    assert good.name == "checkpoint-4" and (good / TRAINER_STATE).is_file() and (good / "rng_state_0.pt").is_file()
    with pytest.raises(OSError):
        save_checkpoint(_FailingEngine(), str(tmp_path), state | {"global_step": 8}, SINGLE_RANK)
    assert not (tmp_path / "checkpoint-8").exists()
    assert find_latest_checkpoint(str(tmp_path)) == good
    assert resolve_resume_path("latest", str(tmp_path)) == good
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume_path(str(tmp_path / ".tmp-checkpoint-8"), str(tmp_path))
    # The next save of that step replaces the leftover staging directory.
    assert save_checkpoint(_Engine(), str(tmp_path), state | {"global_step": 8}, SINGLE_RANK).name == "checkpoint-8"
    assert find_latest_checkpoint(str(tmp_path)).name == "checkpoint-8"
    assert not list(tmp_path.glob(".tmp-*"))


def test_no_checkpoint_to_resume_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_path("latest", str(tmp_path))


@pytest.mark.parametrize("method", ["meft", "lora"])
def test_adapter_export_round_trip(tmp_path, method):
    """Exported trainable weights, loaded onto the original pretrained model, give the trained model."""
    base = save_tiny_bert(tmp_path / "base", dropout=0.0)
    meft = {"variant": "meft2", "adapter_dim": 4, "num_frozen_layers": 1} if method == "meft" else None
    recipe = ModelRecipe(method, str(base), "classification", 3, meft_config=meft and _meft_dict(meft),
                         lora_rank=4 if method == "lora" else None)
    trained = build_model(recipe).eval()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # stands in for training
    export_adapter(_Engine(trained), recipe, str(tmp_path / "out"), SINGLE_RANK)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "config.json"]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["method"] == method
    loaded = load_adapter_model(str(tmp_path / "out"))
    fresh = build_model(recipe).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        expected, got, untrained = (m(input_ids=ids).logits for m in (trained, loaded, fresh))
    assert torch.equal(got, expected) and not torch.allclose(untrained, expected)
    weights = tmp_path / "out" / "adapter_model.safetensors"
    state = load_file(weights)
    state.pop(sorted(state)[0])
    save_file(state, weights)
    with pytest.raises(ValueError, match="do not match"):
        load_adapter_model(str(tmp_path / "out"))


def _meft_dict(values: dict) -> dict:
    return MEFTConfig(**values).to_dict()


def test_param_groups_hold_only_trainable_weights(tmp_path):
    base = save_tiny_bert(tmp_path / "base", dropout=0.0)
    model = build_model(ModelRecipe("meft", str(base), "classification", 2, meft_config=_meft_dict({})))
    groups = param_groups(model, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nonempty_output_dir", "conflicting_ds_value", "missing_train_file", "fp16_on_cpu",
                                  "hub_task_offline", "sequence_beyond_positions", "frozen_layers_with_lora",
                                  "train_set_below_one_global_batch"])
def test_launcher_reports_bad_input_in_one_line_and_writes_nothing(tmp_path, case):
    output = tmp_path / "out"
    flags = ["--output_dir", output]
    # An empty datasets cache: a hub task is never found there, whatever this machine downloaded before.
    extra_env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    if case == "nonempty_output_dir":
        output.mkdir()
        (output / "results.json").write_text('{"accuracy": 0.9}')
        expected = "is not empty"
    elif case == "conflicting_ds_value":
        flags += ["--deepspeed", "zero2_bf16", "--fp16"]
        expected = "fp16.enabled=False but --fp16=True"
    elif case == "missing_train_file":
        flags += ["--train_file", tmp_path / "missing.csv"]
        expected = "--train_file"
    elif case == "hub_task_offline":  # launch_env sets HF_HUB_OFFLINE=1
        flags += ["--task_name", "rte"]
        expected = "offline, pass --data_dir"
    elif case == "sequence_beyond_positions":  # the default MiniLM has 512 positions
        flags += ["--max_seq_length", "513"]
        expected = "--max_seq_length 513 exceeds the 512 positions of this bert model"
    elif case == "frozen_layers_with_lora":
        flags += ["--method", "lora", "--num_frozen_layers", "2"]
        expected = "--num_frozen_layers applies to --method meft only"
    elif case == "train_set_below_one_global_batch":
        data = write_tiny_sst2(tmp_path / "data", train_lines=4, dev_lines=2)
        flags += ["--task_name", "sst2", "--data_dir", data, "--per_device_train_batch_size", 8]
        expected = "The training set has 4 examples, fewer than one global batch of 8"
    else:
        if fp16_supported_here():
            pytest.skip("this machine's accelerator supports fp16, so fp16 is not a bad input here "
                        "(test_fp16_is_refused_only_where_the_accelerator_lacks_it covers both answers)")
        flags += ["--deepspeed", "zero2_fp16"]
        expected = "fp16 (from"
    result = run(launcher_command("python", free_port()) + flags, timeout=300, extra_env=extra_env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: " in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    if case == "nonempty_output_dir":
        assert [p.name for p in output.iterdir()] == ["results.json"]
        assert (output / "results.json").read_text() == '{"accuracy": 0.9}'
    else:
        assert not output.exists()


def fp16_supported_here() -> bool:
    """What DeepSpeed's accelerator answers in the launched runs (DS_ACCELERATOR as launch_env sets it)."""
    code = "from deepspeed.accelerator import get_accelerator; print(get_accelerator().is_fp16_supported())"
    result = run([sys.executable, "-c", code], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("supported", [False, True])
def test_fp16_is_refused_only_where_the_accelerator_lacks_it(monkeypatch, supported):
    from deepspeed.accelerator import get_accelerator

    from meft_ds.training.trainer import check_precision_supported

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: supported)
    args = RunArgs(model_name_or_path="unused", fp16=True)
    if supported:
        check_precision_supported(args, "zero2_fp16")
    else:
        with pytest.raises(ValueError, match=r"fp16 \(from zero2_fp16 or --fp16\) is not supported") as error:
            check_precision_supported(args, "zero2_fp16")
        assert "\n" not in str(error.value)
    check_precision_supported(RunArgs(model_name_or_path="unused", bf16=True), "zero2_bf16")  # never asks


def test_a_one_line_error_from_a_library_names_where_it_was_raised():
    """Bad input is one `error:` line without a traceback; when a library raised it (not meft_ds's own checks, whose
    messages say what to fix) the line also names the file and line, relative to site-packages (seen on an H200:
    DeepSpeed's op builder failing on TORCH_CUDA_ARCH_LIST=9.0a printed only "invalid literal for int()")."""
    from transformers import AutoConfig

    from meft_ds import MEFTConfig
    from meft_ds.training.cli import _origin

    with pytest.raises(ValueError) as library:
        AutoConfig.for_model("no_such_model_type")
    origin = _origin(library.value)
    assert origin.startswith(" (ValueError in transformers/") and ", line " in origin and "-packages" not in origin
    with pytest.raises(ValueError) as own:
        MEFTConfig(variant="meft4")
    assert _origin(own.value) == ""
