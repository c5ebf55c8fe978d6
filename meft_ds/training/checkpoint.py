"""Resumable DeepSpeed checkpoints and the adapter-only export.

Checkpoint layout: <output_dir>/checkpoint-<step>/ holding DeepSpeed's files under the tag "deepspeed"
(trainable weights, optimizer and scheduler state; frozen weights excluded, they come from the pretrained
model), rng_state_<rank>.pt per rank, and trainer_state.json (step, log history). Every rank writes into
.tmp-checkpoint-<step>/; after a barrier one rank per disk (its "committer") writes trainer_state.json and
renames the directory. So a directory named checkpoint-<step> is complete on that disk; an interrupted save
leaves only a .tmp- directory, which `find_latest_checkpoint` ignores and the next save of that step replaces.

No shared filesystem is needed: `probe_output_disks` finds out at the start of training which ranks see the
same --output_dir (a file per rank, looked for by every rank), and the lowest rank of each such group
commits there. With one disk per host, every host's checkpoint-<step>/ holds what its own ranks wrote (and
DeepSpeed's replicated model-states file, which ZeRO-0/1/2 otherwise writes on rank 0 only); a resume on the
same hosts reads it back. `agree_on_latest_checkpoint` resumes from the newest step that is complete on
every rank's disk, since a failure between two hosts' renames leaves the newest step complete on one only.

Adapter export: the trainable weights in fp32, gathered from ZeRO's fp32 masters, written by
meft_ds.adapter_io.write_adapter (the same directory `save_pretrained` of a converted model writes);
`meft_ds.load_adapter_model` rebuilds the model from the original pretrained weights and loads them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import torch
from ..adapter_io import ModelRecipe, load_adapter_model, write_adapter
from .distributed import DistEnv, all_gather_objects, barrier

__all__ = ["save_checkpoint", "find_latest_checkpoint", "resolve_resume_path", "load_checkpoint",
           "trainable_state_dict", "export_adapter", "load_adapter_model", "probe_output_disks",
           "agree_on_latest_checkpoint", "prepare_resharding", "missing_shard_files"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DEEPSPEED_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL_DIR = "universal"  # <checkpoint>/universal/: the checkpoint converted for another world size

logger = logging.getLogger("meft_ds.train")


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def probe_output_disks(output_dir: str, env: DistEnv) -> bool:
    """Whether this rank commits checkpoints in output_dir: True for the lowest rank among those that see the
    same directory (rank 0 on a shared filesystem; the first rank of each host with a disk per host).
    Collective: every rank calls it. Creates output_dir on every rank's disk.

    Raises ValueError when the ranks disagree on who shares a disk (a filesystem that does not show one
    rank's new file to another consistently): checkpoints could not be committed safely there.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if env.world_size == 1:
        return True
    token = all_gather_objects(secrets.token_hex(8))[0]  # rank 0's: one name for this probe on every rank
    probe = output / f".disk-probe-{token}-{env.rank}"
    probe.write_text(f"{env.rank}\n")
    barrier()
    sees = [rank for rank in range(env.world_size) if (output / f".disk-probe-{token}-{rank}").exists()]
    barrier()
    probe.unlink()
    groups = all_gather_objects(sees)
    for rank, group in enumerate(groups):
        if any(groups[other] != group for other in group):
            raise ValueError(f"--output_dir {output_dir}: ranks disagree on which of them share this directory "
                             f"(rank {rank} sees the files of ranks {group}, they see {[groups[o] for o in group]}); "
                             "use a disk per host or one filesystem that every host sees consistently.")
    return env.rank == min(sees)


def save_checkpoint(engine, output_dir: str, trainer_state: dict, env: DistEnv, commits: bool | None = None) -> Path:
    """Save a resumable checkpoint of `trainer_state["global_step"]`; every rank must call this.

    commits: whether this rank commits the checkpoint on its disk (`probe_output_disks`); default: rank 0
    only, right for one shared filesystem.
    """
    output = Path(output_dir)
    step = trainer_state["global_step"]
    final, staging = output / f"checkpoint-{step}", output / f".tmp-checkpoint-{step}"
    commits = env.is_main if commits is None else commits
    if commits and staging.exists():
        shutil.rmtree(staging)  # left by an interrupted save of this step
    barrier()
    # DeepSpeed creates the directory on rank 0 only, and writes the replicated model states (ZeRO-0/1/2)
    # from rank 0 only: each other disk needs both from its own ranks.
    if not env.is_main:
        (staging / DEEPSPEED_TAG).mkdir(parents=True, exist_ok=True)
    if commits and not getattr(engine, "save_non_zero_checkpoint", True):
        engine.save_non_zero_checkpoint = True
    engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), staging / _rng_file(env.rank))
    barrier()  # every rank's files are written before the checkpoint is declared complete
    if commits:
        _write_json(staging / TRAINER_STATE, trainer_state)
        if final.exists():
            shutil.rmtree(final)  # --overwrite_output_dir run replacing an earlier run's checkpoint
        os.replace(staging, final)
    barrier()
    return final


def complete_checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoint-<step> directories in output_dir (on this rank's disk), ascending."""
    found = []
    if os.path.isdir(output_dir):
        for entry in Path(output_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and (entry / TRAINER_STATE).is_file():
                found.append(int(match.group(1)))
    return sorted(found)


def agree_on_latest_checkpoint(output_dir: str, env: DistEnv) -> Path | None:
    """The newest checkpoint-<step> that is complete on every rank's disk, or None. Collective."""
    steps = set(complete_checkpoint_steps(output_dir))
    if env.world_size > 1:
        steps = set.intersection(*(set(s) for s in all_gather_objects(sorted(steps))))
    return Path(output_dir) / f"checkpoint-{max(steps)}" if steps else None


def find_latest_checkpoint(output_dir: str) -> Path | None:
    """The complete checkpoint with the highest step in output_dir, or None."""
    found = []
    if os.path.isdir(output_dir):
        for entry in Path(output_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and (entry / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), entry))
    return max(found)[1] if found else None


def resolve_resume_path(resume_from_checkpoint: str, output_dir: str, env: DistEnv | None = None) -> Path | None:
    """'latest' -> the newest complete checkpoint of output_dir; 'auto' -> the same, or None (start from
    scratch) when there is none; a path -> itself, if complete. With `env` (collective: every rank calls
    it), the newest step complete on every rank's disk.

    Raises FileNotFoundError when there is none ('latest'), or the directory is not a complete checkpoint.
    """
    if resume_from_checkpoint in ("latest", "auto"):
        path = find_latest_checkpoint(output_dir) if env is None else agree_on_latest_checkpoint(output_dir, env)
        if path is None and resume_from_checkpoint == "auto":
            return None
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint-<step> in {output_dir}.")
        return path
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE).is_file() or not (path / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINER_STATE} or {DEEPSPEED_TAG}/); "
            "an interrupted save leaves such a directory.")
    return path


def missing_shard_files(path: Path, saved_state: dict) -> list[str]:
    """DeepSpeed files of `path` (relative names) that a re-sharding needs and this rank's disk lacks: every
    saved rank's optimizer partition, and the model states (one file; one per rank with ZeRO-3)."""
    world_size, stage = saved_state["world_size"], saved_state.get("zero_stage")
    folder = path / DEEPSPEED_TAG
    if stage is None:  # a checkpoint written before the stage was recorded: ZeRO-3 writes model states per rank
        stage = 3 if any(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")) else 2
    prefix = "bf16_" if saved_state.get("precision") == "bf16" else ""  # DeepSpeed's name for bf16 optimizer files
    missing = []
    for rank in range(world_size):
        if not any(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")):
            missing.append(f"{DEEPSPEED_TAG}/{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        model_states = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
        if (stage == 3 or rank == 0) and not (folder / model_states).is_file():
            missing.append(f"{DEEPSPEED_TAG}/{model_states}")
    return missing


def prepare_resharding(path: Path, saved_state: dict, env: DistEnv) -> Path:
    """Convert the checkpoint in `path`, saved by another number of ranks, into DeepSpeed's universal format
    (deepspeed.checkpoint.ds_to_universal) in <path>/universal/, once per disk, and return that directory
    (load it with "checkpoint": {"load_universal": true}). An existing conversion is reused. Collective.

    The lowest rank that sees `path` converts into <path>/.tmp-universal/ and renames it, so a directory named
    universal/ is complete. Converting needs every saved rank's optimizer partition on that disk: with a disk
    per host, each host holds only its own ranks' files until they are gathered (docs/training.md).

    Raises ValueError (one line, on every rank) for a ZeRO stage 0 checkpoint (no partitioned optimizer state
    to convert), for shard files missing on some rank's disk (named), or when the conversion fails.
    """
    saved_world = saved_state["world_size"]
    stage = saved_state.get("zero_stage")
    if stage == 0:
        raise ValueError(f"{path} was saved by {saved_world} ranks with ZeRO stage 0, this run has {env.world_size}: "
                         "only ZeRO 1/2/3 checkpoints can be re-sharded; resume with the same world size.")
    universal = path / UNIVERSAL_DIR
    missing = [] if universal.is_dir() else missing_shard_files(path, saved_state)
    for rank, files in enumerate(all_gather_objects(missing) if env.world_size > 1 else [missing]):
        if files:
            raise ValueError(
                f"{path} was saved by {saved_world} ranks, this run has {env.world_size}: re-sharding needs every "
                f"rank's DeepSpeed shard in one folder, and rank {rank}'s disk lacks {', '.join(files)}; gather each "
                "host's checkpoint-<step>/ into one folder (e.g. rsync -a host:<output_dir>/checkpoint-<step>/ "
                "<output_dir>/checkpoint-<step>/ from every host) on every disk the new ranks read, then resume again.")
    logger.info("re-sharding %s from %d to %d ranks (DeepSpeed universal checkpoint in %s/%s)", path, saved_world,
                env.world_size, path.name, UNIVERSAL_DIR)
    converts = probe_output_disks(str(path), env) and not universal.is_dir()
    failure = ""
    if converts:
        try:
            _convert_to_universal(path)
        except Exception as error:  # noqa: BLE001 - reported on every rank below, so none waits for this one
            failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    failures = all_gather_objects(failure) if env.world_size > 1 else [failure]
    for rank, failure in enumerate(failures):
        if failure:
            raise ValueError(f"{path}: converting to a universal checkpoint (ZeRO stage {stage}) to re-shard it "
                             f"from {saved_world} to {env.world_size} ranks failed on rank {rank}: {failure}")
    return universal


def _convert_to_universal(path: Path) -> None:
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    staging, final = path / f".tmp-{UNIVERSAL_DIR}", path / UNIVERSAL_DIR
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted conversion
    # inject_missing_state: DeepSpeed's engine does not record the universal-checkpoint version itself (only
    # Megatron-style clients do); our parameters need no reshaping rules, so the default record is right.
    options = argparse.Namespace(input_folder=str(path / DEEPSPEED_TAG), output_folder=str(staging / DEEPSPEED_TAG),
                                 num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; failures raise
        ds_to_universal(options)
    os.replace(staging, final)


def load_checkpoint(engine, path: Path, env: DistEnv, universal: Path | None = None, seed: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; return its trainer state.

    universal: the converted directory (`prepare_resharding`) when the checkpoint was saved by another number
    of ranks; the engine must have been built with "checkpoint": {"load_universal": true}. Trainable weights and
    optimizer state are then re-sharded by DeepSpeed; the per-rank RNG states cannot be mapped onto other ranks,
    so each rank is re-seeded from (seed, step, rank): deterministic, but not the stream the old run would have
    drawn (identical results need dropout 0). The data position needs nothing: it is a function of the global
    step and the global batch only.

    Raises ValueError when the checkpoint was written with another world size and `universal` is None.
    """
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if trainer_state["world_size"] != env.world_size and universal is None:
        raise ValueError(f"{path} was saved by {trainer_state['world_size']} ranks, this run has {env.world_size}; "
                         "it must be converted first (prepare_resharding).")
    load_dir = path if universal is None else universal
    inner = getattr(engine.optimizer, "optimizer", None)
    decay = [group.get("weight_decay") for group in getattr(inner, "param_groups", [])]
    loaded, _ = engine.load_checkpoint(str(load_dir), tag=DEEPSPEED_TAG, load_module_strict=False)
    if loaded is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {load_dir / DEEPSPEED_TAG}.")
    if universal is not None:
        _unshare_step_counters(engine.optimizer)
        # DeepSpeed 0.19.8's ZeRO-3 universal load copies the first group's hyperparameters into every group: the
        # no-decay group (biases, norms, mix) would get weight decay. The run identity check made them equal to the
        # checkpoint's, so this run's own per-group values are the saved ones.
        for group, value in zip(getattr(inner, "param_groups", []), decay):
            group["weight_decay"] = value
        torch.manual_seed((seed * 1_000_003 + trainer_state["global_step"]) * 1_009 + env.rank)
        return trainer_state
    rng = torch.load(path / _rng_file(env.rank), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def _unshare_step_counters(optimizer) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load stores one and the same `step` tensor in the state of every
    parameter sub-group; torch's Adam increments it in place once per sub-group and step, so with two sub-groups
    (weights with and without weight decay) the bias correction ran ahead and the resumed run drifted (4e-4 in
    the adapter weights after 2 steps of tests/test_resharding.py). Each sub-group gets its own counter."""
    inner = getattr(optimizer, "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values of every trainable parameter, from ZeRO's fp32 masters. Collective: all ranks call."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)  # None without a ZeRO optimizer: the parameter is whole
            state[name] = (param.detach() if full is None else full).float().cpu().contiguous()
    return state


class NonFiniteAdapterError(ValueError):
    """The trained weights hold NaN or Inf: they are not exported."""


def export_adapter(engine, recipe: ModelRecipe, output_dir: str, env: DistEnv) -> None:
    """Write the adapter directory (adapter_io.write_adapter) into output_dir on rank 0. Collective.

    Raises NonFiniteAdapterError (on every rank, nothing written) when a trained weight is not finite.
    """
    state = trainable_state_dict(engine)
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteAdapterError(f"{len(bad)} trained weight(s) hold NaN or Inf (first: {bad[0]}); "
                                    f"the adapter is not exported to {output_dir}.")
    if env.is_main:
        write_adapter(output_dir, state, recipe)
    barrier()


def _write_json(path: Path, value: dict) -> None:
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)
