"""Training with DeepSpeed: run settings, config presets, model building, the loop, checkpoints, export.

    from meft_ds.training import parse_args, train, load_adapter_model
    results = train(parse_args(["--output_dir", "out"]))
"""

from .args import RunArgs, build_parser, parse_args
from .checkpoint import export_adapter, find_latest_checkpoint, load_adapter_model
from .ds_config import load_preset, merge_ds_config
from .modeling import ModelRecipe, build_model
from .trainer import fit, setup, train

__all__ = [
    "RunArgs", "build_parser", "parse_args", "setup", "fit", "train", "load_adapter_model", "export_adapter",
    "find_latest_checkpoint", "load_preset", "merge_ds_config", "ModelRecipe", "build_model",
]
