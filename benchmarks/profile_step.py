"""Where one training step's time goes: torch.profiler over one forward + backward, LoRA + checkpointing vs MEFT.

    python -m benchmarks.profile_step [--device cuda] [--shape opt-1.3b] [--layers 4] [--batch_size 4] [--seq_len 512]

Prints, per method, the wall time of the step, the device's own kernel time, the number of kernels launched, and
the profiler's table of the ops with the most device time (on the CPU: the CPU time). Random bf16 weights of the
benchmark shapes (benchmarks/setups.py), three warm-up steps first. Results: docs/benchmarks.md, section 0.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import setups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="opt-1.3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--methods", default="lora_gc,meft1_exact")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    config = setups.make_config(args.shape, args.layers)
    batch = {k: v.to(args.device) for k, v in
             setups.make_batch(config, args.batch_size, args.seq_len, seed=0, padding=True).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in args.methods.split(","):
        model = setups.build_method(setups.base_model(config, seed=0, dtype=torch.bfloat16), setups.Method(name))
        model = model.to(args.device).train()
        for _ in range(3):
            model(**batch).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model(**batch).loss.backward()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        device_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"== {name}: wall {wall * 1e3:.1f} ms, device kernel time {device_ms / 1e3:.1f} ms, kernels {kernels}")
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=18, max_name_column_width=60))
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
