"""DeepSpeed presets: every shipped one loads, merges with the run's flags and passes DeepSpeed's own
config parser; "auto" is filled from flags; an explicit value that conflicts with a flag is an error."""

from __future__ import annotations

import json

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from meft_ds.training import RunArgs, load_preset, merge_ds_config
from meft_ds.training.ds_config import PRESET_DIR, resolve_preset, zero_stage
from meft_ds.training.args import DEFAULT_LEARNING_RATE

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _args(**overrides) -> RunArgs:
    return RunArgs(model_name_or_path="unused", output_dir="unused", **overrides)


def test_the_issue_s_presets_are_shipped():
    expected = {f"zero{stage}_{precision}" for stage in (1, 2, 3) for precision in ("bf16", "fp16", "fp32")}
    assert expected <= set(PRESETS)
    assert any("offload" in name for name in PRESETS) and "cpu" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("world_size", (1, 2))
def test_every_preset_merges_and_validates(name, world_size):
    config, args = merge_ds_config(load_preset(name), _args(), world_size, source=name)
    assert "auto" not in json.dumps(config)
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * config[
        "gradient_accumulation_steps"] * world_size
    assert config["optimizer"]["params"]["lr"] == args.learning_rate > 0
    if name.startswith("zero"):
        assert zero_stage(config) == int(name[4])
    for precision in ("bf16", "fp16"):
        assert config[precision]["enabled"] == (precision in name) == getattr(args, precision)
    if "fp16" in name:
        assert config["fp16"]["loss_scale"] == 0, "fp16 presets use dynamic loss scaling"
    if "offload" in name:
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    if world_size == 1:  # DeepSpeed's parser (outside a process group it assumes one rank)
        parsed = DeepSpeedConfig(config)
        assert parsed.zero_optimization_stage == zero_stage(config)
        assert parsed.train_batch_size == config["train_batch_size"]


def test_auto_values_come_from_flags():
    args = _args(per_device_train_batch_size=3, gradient_accumulation_steps=5, learning_rate=2e-3, weight_decay=0.1,
                 max_grad_norm=0.0, bf16=True)
    config, merged = merge_ds_config(load_preset("cpu"), args, world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 30
    assert config["optimizer"]["params"]["lr"] == 2e-3 and config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["gradient_clipping"] == 0.0 and config["bf16"]["enabled"] is True
    assert config["fp16"]["enabled"] is False and merged.fp16 is False


def test_defaults_fill_auto_when_no_flag_is_given():
    config, merged = merge_ds_config(load_preset("cpu"), _args(method="full"), world_size=1)
    assert config["optimizer"]["params"]["lr"] == merged.learning_rate == DEFAULT_LEARNING_RATE["full"]
    assert config["gradient_clipping"] == 1.0 and config["bf16"]["enabled"] is False
    _, meft3 = merge_ds_config(load_preset("cpu"), _args(method="meft", variant="meft3"), world_size=1)
    assert meft3.learning_rate == DEFAULT_LEARNING_RATE["meft"]


def test_explicit_preset_value_is_adopted_when_the_flag_is_absent():
    preset = load_preset("zero2_bf16")
    preset["gradient_clipping"] = 0.5
    _, merged = merge_ds_config(preset, _args(), world_size=1)
    assert merged.bf16 is True and merged.max_grad_norm == 0.5


@pytest.mark.parametrize("ds_path, flags", [
    ("train_micro_batch_size_per_gpu", {"per_device_train_batch_size": 4}),
    ("gradient_clipping", {"max_grad_norm": 1.0}),
    ("fp16.enabled", {"fp16": True}),
])
def test_conflicting_explicit_value_names_both(ds_path, flags):
    preset = load_preset("zero2_bf16")
    preset["train_micro_batch_size_per_gpu"] = 8
    preset["gradient_clipping"] = 0.25
    flag = next(iter(flags))
    with pytest.raises(ValueError) as error:
        merge_ds_config(preset, _args(**flags), world_size=1, source="my.json")
    assert ds_path in str(error.value) and f"--{flag}" in str(error.value) and "my.json" in str(error.value)


def test_inconsistent_train_batch_size_is_an_error():
    preset = load_preset("cpu") | {"train_batch_size": 64}
    with pytest.raises(ValueError, match="train_batch_size=64"):
        merge_ds_config(preset, _args(per_device_train_batch_size=4), world_size=2)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(scheduler={"type": "WarmupLR"}), "scheduler"),
    (lambda c: c.pop("optimizer"), "optimizer"),
    (lambda c: c["zero_optimization"].update(reduce_bucket_size="auto"), "reduce_bucket_size"),
])
def test_preset_errors(change, message):
    preset = load_preset("cpu")
    change(preset)
    with pytest.raises(ValueError, match=message):
        merge_ds_config(preset, _args(), world_size=1)


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="zero2_bf16"):
        resolve_preset("zero9_bf16")
    assert resolve_preset("zero2_bf16") == resolve_preset("zero2_bf16.json") == PRESET_DIR / "zero2_bf16.json"
