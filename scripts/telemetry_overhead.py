"""Logging overhead of the per-rank telemetry: training step time with logging every step vs. no logging.

    python scripts/telemetry_overhead.py --steps 30 --rounds 2 --output_root /tmp/telemetry-overhead

Runs launch/train.py in one process on the default model (the real MiniLM, MEFT) alternately with
`--logging_steps 1` and `--logging_steps 1000000` (only the final step logs), `--rounds` times, then once
with logging every step plus --log_saved_bytes and --reconstruction_error_steps 1; prints the mean
step time of each run (train_runtime_s / steps from results.json: the whole loop, logging included).
Alternating in one session keeps the comparison fair on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "off": ["--logging_steps", "1000000"],
    "every step": ["--logging_steps", "1"],
    "every step + saved bytes + reconstruction": ["--logging_steps", "1", "--log_saved_bytes",
                                                  "--reconstruction_error_steps", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_root", default="/tmp/telemetry-overhead")
    parser.add_argument("train_flags", nargs="*", help="extra launch/train.py flags (after --)")
    options = parser.parse_args()
    order = ["off", "every step"] * options.rounds + ["every step + saved bytes + reconstruction"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    rows = []
    for index, mode in enumerate(order):
        output = Path(options.output_root) / f"run{index}"
        command = [sys.executable, str(REPO / "launch" / "train.py"), "--max_steps", str(options.steps),
                   "--output_dir", str(output), "--overwrite_output_dir", *MODES[mode], *options.train_flags]
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
        results = json.loads((output / "results.json").read_text())
        rows.append((mode, results["train_runtime_s"] / results["global_step"]))
        print(f"run {index}: logging {mode}: {rows[-1][1]:.3f} s/step", flush=True)
    print("\n| run | logging | mean step time (s) |\n|---|---|---|")
    for index, (mode, seconds) in enumerate(rows):
        print(f"| {index} | {mode} | {seconds:.3f} |")
    for mode in MODES:
        times = [s for m, s in rows if m == mode]
        print(f"{mode}: mean {sum(times) / len(times):.3f} s/step over {len(times)} run(s)")


if __name__ == "__main__":
    main()
