"""Soak on two hosts (issue 13 item 5): a long run interrupted by SIGKILLs of host B's rank and resumed by
rerunning the same command must end on the uninterrupted run's adapter weights; the per-rank resident
memory of the final segment should plateau.

Two namespaced hosts, each with its own disk (tests/multihost.py), one rank each, deepspeed --no_ssh on
each: the tiny random OPT causal LM of tests/test_multihost.py (lower third frozen, dropout as there),
ZeRO-3 with stage3_param_persistence_threshold 0, fp32, gloo. The uninterrupted run and the interrupted
one run side by side (separate output directories and ports). Kill points are drawn with --seed; a kill
SIGKILLs the training process (not the launcher) on host B once host A's log shows that step, then both
hosts' launchers are waited for (bounded) and the same command is run again (--resume_from_checkpoint
auto). Needs root (network namespaces).

    python scripts/soak_multihost.py --steps 1000 --save_steps 50 --kills 2 --seed 14 --output soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from multihost import TwoHosts, unavailable_reason  # noqa: E402
from train_helpers import BIN, free_port, launch_env, write_multihost_inputs  # noqa: E402

TRAIN = REPO / "launch" / "train.py"
STEP_LINE = re.compile(r'\{"step": (\d+)')


def flags(hosts: TwoHosts, output: str, steps: int, save_steps: int) -> list:
    disk = hosts.mount_point
    values = {"model_name_or_path": disk / "model", "train_file": disk / "lm.jsonl",
              "validation_file": disk / "lm.jsonl", "deepspeed": disk / "ds_zero3.json", "max_seq_length": 48,
              "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": steps,
              "save_steps": save_steps, "logging_steps": 1, "output_dir": disk / output,
              "resume_from_checkpoint": "auto", "ddp_timeout": 30}
    return ["--lm"] + [item for key, value in values.items() for item in (f"--{key}", value)]


def launch(hosts: TwoHosts, output: str, steps: int, save_steps: int) -> list:
    port = free_port()
    processes = []
    for host in hosts.hosts:
        command = [BIN / "deepspeed", "--hostfile", hosts.root / "hostfile", "--no_ssh", "--node_rank", host.index,
                   "--master_addr", hosts.master_addr, "--master_port", port, TRAIN,
                   *flags(hosts, output, steps, save_steps)]
        processes.append(hosts.start(host.index, command, launch_env(), log_name=f"{output}-{host.name}"))
    return processes


def last_step(log_path: Path) -> int:
    steps = STEP_LINE.findall(log_path.read_text(errors="replace"))
    return int(steps[-1]) if steps else 0


def training_pids(hosts: TwoHosts, index: int, output: str) -> list[int]:
    """The rank processes (launch/train.py, not the deepspeed launcher) of the job writing `output` in host
    `index`'s namespace (the uninterrupted job runs there too)."""
    output_flag = str(hosts.mount_point / output).encode()
    pids = subprocess.run(["ip", "netns", "pids", hosts.hosts[index].netns], capture_output=True, text=True,
                          timeout=20).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"launch/train.py") for part in cmdline) and b"deepspeed.launcher.launch" not in cmdline \
                and not any(part.endswith(b"/deepspeed") for part in cmdline[:2]) and output_flag in cmdline:
            found.append(int(pid))
    # The rank's own children (its watchdog, say) carry its command line too: keep the topmost.
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in found}
    return [pid for pid in found if parents[pid] not in found]


def run_killed_at(hosts: TwoHosts, output: str, steps: int, save_steps: int, kill_step: int | None,
                  timeout: float) -> dict:
    """One segment: start the job; if kill_step, SIGKILL host B's rank once host A logged that step."""
    start = time.time()
    processes = launch(hosts, output, steps, save_steps)
    segment = {"kill_step": kill_step, "log": processes[0].log_path.name}
    if kill_step is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if last_step(processes[0].log_path) >= kill_step or any(p.poll() is not None for p in processes):
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"{output}: step {kill_step} not reached in {timeout} s")
        pids = training_pids(hosts, 1, output)
        if len(pids) != 1:
            raise RuntimeError(f"expected one training process on host B, found {pids}: " + "; ".join(
                Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300] for p in pids))
        os.kill(pids[0], signal.SIGKILL)
        segment["killed_at_logged_step"] = last_step(processes[0].log_path)
    codes = hosts.wait(processes, timeout)
    segment.update(exit_codes=codes, wall_s=round(time.time() - start, 1),
                   last_logged_step=last_step(processes[0].log_path))
    resumed = re.search(r"resumed from \S+ at step (\d+)", processes[0].log_path.read_text(errors="replace"))
    segment["resumed_at_step"] = int(resumed.group(1)) if resumed else None
    return segment


def max_abs_difference(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if first.keys() != second.keys():
        raise ValueError(f"different tensors: {sorted(first.keys() ^ second.keys())}")
    return {name: float((first[name].double() - second[name].double()).abs().max()) for name in sorted(first)}


def resident_series(runs_dir: Path) -> dict:
    """Per rank, memory/resident_bytes of the newest event file (the final segment): first/last/max MiB."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = {}
    for rank_dir in sorted(runs_dir.glob("rank_*")):
        files = sorted(rank_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
        if not files:
            continue
        events = EventAccumulator(str(files[-1]), size_guidance={"scalars": 0})
        events.Reload()
        series = [(e.step, e.value / 2**20) for e in events.Scalars("memory/resident_bytes")]
        values = [v for _, v in series]
        quarter = max(1, len(values) // 4)
        result[rank_dir.name] = {
            "steps": [series[0][0], series[-1][0]], "points": len(series), "first_mib": round(values[0], 1),
            "last_mib": round(values[-1], 1), "max_mib": round(max(values), 1),
            # a plateau: the last quarter's mean is close to the second-to-last quarter's
            "mean_mib_by_quarter": [round(sum(values[i * quarter:(i + 1) * quarter]) / quarter, 1)
                                    for i in range(min(4, len(values) // quarter))]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save_steps", type=int, default=50)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--kill_steps", type=int, nargs="*", help="explicit kill steps instead of random ones")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--timeout", type=float, default=3600, help="bound on each segment, seconds")
    parser.add_argument("--output", type=Path, required=True, help="the results JSON")
    parser.add_argument("--keep", type=Path, help="keep the hosts' files here (default: deleted)")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"error: two hosts cannot be created here: {reason}", file=sys.stderr)
        return 2
    if args.kill_steps:
        kill_steps = sorted(args.kill_steps)
    else:  # distinct random steps inside 10%..90% of the run
        kill_steps = sorted(random.Random(args.seed).sample(range(args.steps // 10, args.steps * 9 // 10), args.kills))
    if any(not 0 < s < args.steps for s in kill_steps):
        print(f"error: --kill_steps must lie in 1..{args.steps - 1}", file=sys.stderr)
        return 2

    # A SIGTERM (timeout, a scheduler) unwinds through TwoHosts' exit, which ends the jobs and deletes the
    # namespaces; the default action would leave both behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="soak-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    shared = root / "inputs"
    write_multihost_inputs(shared)
    results = {"steps": args.steps, "save_steps": args.save_steps, "seed": args.seed, "kill_steps": kill_steps,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        with TwoHosts(root) as hosts:
            for host in hosts.hosts:
                shutil.copytree(shared, host.disk, dirs_exist_ok=True)
            (root / "hostfile").write_text("".join(f"{h.name} slots=1\n" for h in hosts.hosts))
            start = time.time()
            # The uninterrupted run in the background, the interrupted one in the foreground.
            plain = launch(hosts, "plain", args.steps, args.save_steps)
            segments = []
            for kill_step in [*kill_steps, None]:
                segments.append(run_killed_at(hosts, "killed", args.steps, args.save_steps, kill_step, args.timeout))
                print(json.dumps(segments[-1]), flush=True)
            codes = hosts.wait(plain, args.timeout)
            results["uninterrupted"] = {"exit_codes": codes, "wall_s_incl_parallel": round(time.time() - start, 1)}
            results["segments"] = segments
            a = hosts.hosts[0].disk
            differences = max_abs_difference(a / "plain" / "adapter_model.safetensors",
                                             a / "killed" / "adapter_model.safetensors")
            results["adapter_tensors"] = len(differences)
            results["max_abs_difference"] = max(differences.values())
            results["resident_final_segment"] = resident_series(a / "killed" / "runs")
            results["resident_uninterrupted"] = resident_series(a / "plain" / "runs")
            results["ok"] = (codes == [0, 0] and segments[-1]["exit_codes"] == [0, 0]
                             and results["max_abs_difference"] <= 1e-6)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
