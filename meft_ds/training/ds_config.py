"""DeepSpeed configs: presets in ds_configs/*.json are data; the run's settings are merged in here, in code.

A preset value that the run also knows (batch sizes, precision, clipping, learning rate, weight decay)
may be "auto" (or left out): it is filled from the flag, or from the flag's default. An explicit preset
value with no flag given is adopted by the run; an explicit value that differs from a given flag is a
ValueError naming both, as in Hugging Face's DeepSpeed integration. The result contains no "auto".
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from .args import FALLBACKS, PACKAGE_DATA, RunArgs

PRESET_DIR = PACKAGE_DATA / "ds_configs"
AUTO = "auto"

# DeepSpeed key path <-> RunArgs field, for every value both may set.
SHARED_SETTINGS = (
    ("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("gradient_clipping", "max_grad_norm"),
    ("optimizer.params.lr", "learning_rate"),
    ("optimizer.params.weight_decay", "weight_decay"),
    ("bf16.enabled", "bf16"),
    ("fp16.enabled", "fp16"),
)
# The learning rate schedule comes from --warmup_ratio and the step count, so a preset may not set one.
FORBIDDEN_KEYS = ("scheduler",)


def resolve_preset(name_or_path: str) -> Path:
    """A JSON path, or the name of a preset in ds_configs/ ("zero2_bf16" or "zero2_bf16.json")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / (name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json")
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    raise FileNotFoundError(f"--deepspeed {name_or_path}: no such file, nor a preset in {PRESET_DIR} ({known}).")


def load_preset(name_or_path: str) -> dict:
    path = resolve_preset(name_or_path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _get(config: dict, path: str) -> Any:
    node = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return AUTO  # absent counts as "auto": the run fills it
        node = node[key]
    return node


def _set(config: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _find_auto(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == AUTO else []


def merge_ds_config(preset: dict, args: RunArgs, world_size: int,
                    source: str = "the DeepSpeed config") -> tuple[dict, RunArgs]:
    """Return (DeepSpeed config for this run, RunArgs with every shared setting resolved).

    Raises ValueError when an explicit preset value conflicts with a flag, when the preset sets
    train_batch_size inconsistently, has a learning rate scheduler or no optimizer, enables both 16-bit
    modes, or leaves an "auto" this function does not know how to fill.
    """
    config = copy.deepcopy(preset)
    for key in FORBIDDEN_KEYS:
        if key in config:
            raise ValueError(f"{source} sets {key!r}; remove it: the schedule is linear warm-up/decay set by "
                             "--warmup_ratio and --max_steps/--num_train_epochs.")
    if "optimizer" not in config:
        raise ValueError(f"{source} has no 'optimizer' block; add one (e.g. AdamW with lr and weight_decay 'auto').")
    resolved = {}
    for ds_path, flag in SHARED_SETTINGS:
        ds_value, flag_value = _get(config, ds_path), getattr(args, flag)
        if ds_value == AUTO:
            default = args.learning_rate_default() if flag == "learning_rate" else FALLBACKS[flag]
            value = default if flag_value is None else flag_value
        elif flag_value is None or flag_value == ds_value:
            value = ds_value
        else:
            raise ValueError(f"{source} sets {ds_path}={ds_value!r} but --{flag}={flag_value!r}; remove one of the "
                             f"two or make the config value \"auto\".")
        _set(config, ds_path, value)
        resolved[flag] = value
    if resolved["bf16"] and resolved["fp16"]:
        raise ValueError(f"{source} and the flags enable both bf16 and fp16; pick one precision.")

    global_batch = resolved["per_device_train_batch_size"] * resolved["gradient_accumulation_steps"] * world_size
    explicit = config.get("train_batch_size", AUTO)
    if explicit != AUTO and explicit != global_batch:
        raise ValueError(
            f"{source} sets train_batch_size={explicit} but per_device_train_batch_size "
            f"({resolved['per_device_train_batch_size']}) x gradient_accumulation_steps "
            f"({resolved['gradient_accumulation_steps']}) x world size ({world_size}) = {global_batch}; "
            "make it \"auto\" or change the flags.")
    config["train_batch_size"] = global_batch
    left = _find_auto(config)
    if left:
        raise ValueError(f"{source} has \"auto\" at {left}, which no flag fills; give explicit values there.")
    return config, dataclasses.replace(args, **resolved)


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
