"""Resumable DeepSpeed checkpoints and the adapter-only export.

Checkpoint layout: <output_dir>/checkpoint-<step>/ holding DeepSpeed's files under the tag "deepspeed"
(trainable weights, optimizer and scheduler state; frozen weights excluded, they come from the pretrained
model), rng_state_<rank>.pt per rank, and trainer_state.json (step, log history). Every rank writes into
.tmp-checkpoint-<step>/; after a barrier rank 0 writes trainer_state.json and renames the directory. So a
directory named checkpoint-<step> is complete; an interrupted save leaves only a .tmp- directory, which
`find_latest_checkpoint` ignores and the next save of that step replaces. Assumes a filesystem shared by
all ranks (as Hugging Face's Trainer does by default).

Adapter export: the trainable weights in fp32, gathered from ZeRO's fp32 masters, written by
meft_ds.adapter_io.write_adapter (the same directory `save_pretrained` of a converted model writes);
`meft_ds.load_adapter_model` rebuilds the model from the original pretrained weights and loads them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from ..adapter_io import ModelRecipe, load_adapter_model, write_adapter
from .distributed import DistEnv, barrier

__all__ = ["save_checkpoint", "find_latest_checkpoint", "resolve_resume_path", "load_checkpoint",
           "trainable_state_dict", "export_adapter", "load_adapter_model"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DEEPSPEED_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.json"


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(engine, output_dir: str, trainer_state: dict, env: DistEnv) -> Path:
    """Save a resumable checkpoint of `trainer_state["global_step"]`; every rank must call this."""
    output = Path(output_dir)
    step = trainer_state["global_step"]
    final, staging = output / f"checkpoint-{step}", output / f".tmp-checkpoint-{step}"
    if env.is_main and staging.exists():
        shutil.rmtree(staging)  # left by an interrupted save of this step
    barrier()
    engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), staging / _rng_file(env.rank))
    barrier()  # every rank's files are written before the checkpoint is declared complete
    if env.is_main:
        _write_json(staging / TRAINER_STATE, trainer_state)
        if final.exists():
            shutil.rmtree(final)  # --overwrite_output_dir run replacing an earlier run's checkpoint
        os.replace(staging, final)
    barrier()
    return final


def find_latest_checkpoint(output_dir: str) -> Path | None:
    """The complete checkpoint with the highest step in output_dir, or None."""
    found = []
    if os.path.isdir(output_dir):
        for entry in Path(output_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and (entry / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), entry))
    return max(found)[1] if found else None


def resolve_resume_path(resume_from_checkpoint: str, output_dir: str) -> Path:
    """'latest' -> the newest complete checkpoint of output_dir; a path -> itself, if complete.

    Raises FileNotFoundError when there is none, or the directory is not a complete checkpoint.
    """
    if resume_from_checkpoint == "latest":
        path = find_latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint-<step> in {output_dir}.")
        return path
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE).is_file() or not (path / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINER_STATE} or {DEEPSPEED_TAG}/); "
            "an interrupted save leaves such a directory.")
    return path


def load_checkpoint(engine, path: Path, env: DistEnv) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; return its trainer state.

    Raises ValueError when the checkpoint was written with another world size (each rank's RNG state and
    ZeRO partition are per rank; convert with DeepSpeed's universal checkpoint to change it).
    """
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if trainer_state["world_size"] != env.world_size:
        raise ValueError(f"{path} was saved by {trainer_state['world_size']} ranks, this run has {env.world_size}; "
                         "resume with the same world size (or convert it with ds_to_universal).")
    loaded, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_module_strict=False)
    if loaded is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {path / DEEPSPEED_TAG}.")
    rng = torch.load(path / _rng_file(env.rank), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values of every trainable parameter, from ZeRO's fp32 masters. Collective: all ranks call."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)  # None without a ZeRO optimizer: the parameter is whole
            state[name] = (param.detach() if full is None else full).float().cpu().contiguous()
    return state


def export_adapter(engine, recipe: ModelRecipe, output_dir: str, env: DistEnv) -> None:
    """Write the adapter directory (adapter_io.write_adapter) into output_dir on rank 0. Collective."""
    state = trainable_state_dict(engine)
    if env.is_main:
        write_adapter(output_dir, state, recipe)
    barrier()


def _write_json(path: Path, value: dict) -> None:
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)
