"""Check at start that every host reads the same base model, data and DeepSpeed config.

On several hosts each reads its own copy of the inputs; a stale or partial copy on one host trains a
different model on that host's ranks, with no error. Every rank computes a digest per input file, the digests
are gathered, and any difference stops the run with one line naming the file and the two hosts.

What is compared: data files and the DeepSpeed config byte for byte; in a local model directory every file up
to 16 MiB byte for byte (config, tokenizer, the weights index) and larger files (the weights) by their size
and their first and last MiB (a safetensors file starts with its tensor names, shapes and offsets), which
keeps the check to a second on multi-GB checkpoints. A model given as a hub id is compared by its name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .distributed import DistEnv, all_gather_objects, where

WHOLE_FILE_LIMIT = 16 << 20
EDGE_BYTES = 1 << 20


def _file_digest(path: Path, whole: bool) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if whole or size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def _tree_digests(flag: str, root: Path, whole: bool) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digests[f"{flag} {root}: {path.relative_to(root)}"] = _file_digest(path, whole)
    return digests


def input_digests(args, ds_config_source: str) -> dict[str, str]:
    """{description of an input file: short digest} for the run's model, data and DeepSpeed config."""
    digests = {}
    model = Path(args.model_name_or_path)
    if model.is_dir():
        digests.update(_tree_digests("--model_name_or_path", model, whole=False))
    else:
        digests["--model_name_or_path"] = hashlib.sha256(str(args.model_name_or_path).encode()).hexdigest()[:16]
    for flag in ("train_file", "validation_file"):
        path = getattr(args, flag)
        if path is not None:
            digests[f"--{flag} {path}"] = _file_digest(Path(path), whole=True)
    if args.data_dir is not None:
        digests.update(_tree_digests("--data_dir", Path(args.data_dir), whole=True))
    if os.path.isfile(ds_config_source):
        digests[f"--deepspeed {ds_config_source}"] = _file_digest(Path(ds_config_source), whole=True)
    return digests


def check_same_inputs(args, ds_config_source: str, env: DistEnv) -> None:
    """Raise ValueError (the same on every rank) when a rank's inputs differ from rank 0's. Collective."""
    if env.world_size == 1:
        return
    gathered = all_gather_objects((where(), input_digests(args, ds_config_source)))
    reference_place, reference = gathered[0]
    for place, digests in gathered[1:]:
        for name in sorted(set(reference) | set(digests)):
            if reference.get(name) != digests.get(name):
                if name in reference and name in digests:
                    detail = f"{name} differs between {reference_place} and {place}"
                elif name not in digests:
                    detail = f"{name} exists on {reference_place} but not on {place}"
                else:
                    detail = f"{name} exists on {place} but not on {reference_place}"
                raise ValueError(f"the hosts' inputs differ: {detail}; every host needs the same copy of the base "
                                 "model, the data and the DeepSpeed config.")
