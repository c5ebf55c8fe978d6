"""Where one training step's time goes: torch.profiler over one forward + backward, LoRA + checkpointing vs MEFT.

    python -m benchmarks.profile_step [--device cuda] [--shape opt-1.3b] [--layers 4] [--batch_size 4] [--seq_len 512]

Prints, per method, the wall time of the step, the device's own kernel time, the number of kernels launched, and
the profiler's table of the ops with the most device time (on the CPU: the CPU time). Random bf16 weights
(or --dtype float32) of the benchmark shapes (benchmarks/setups.py), three warm-up steps first. Results:
docs/benchmarks.md, section 0.

Then, from one more step, the number of compute ops (every aten op but views and allocations: on a GPU, about
one kernel launch each) and the meft_ds source lines that issue the most of them. Unlike time, this count is
the same on every machine for a given shape, so it can be compared across devices: a launch-bound GPU step
(docs/benchmarks.md) shortens with it. Last, the ops and their host time per source file: on a CPU, where ops
run as they are called, the share of the step each file's ops take (e.g. meft_ds/coupling.py, the exact stream
arithmetic); on a GPU the launch time.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import setups


class OpCounter(TorchDispatchMode):
    """Counts compute ops (not views, not allocations), each under the innermost meft_ds source line that issued
    it ("elsewhere": torch, transformers), and the host time each op took (`seconds`, same keys). On a CPU an op
    runs while it is called, so that is its run time; on a GPU it is only the time to launch it."""

    SKIP = {"empty", "empty_strided", "detach", "lift_fresh", "alias", "resize_", "set_"}

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()
        self.seconds = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func.overloadpacket.__name__ in self.SKIP:
            return func(*args, **(kwargs or {}))
        frame = next((f for f in reversed(traceback.extract_stack()) if "/meft_ds/" in f.filename), None)
        key = (f"meft_ds/{frame.filename.split('/meft_ds/')[-1]}:{frame.lineno}" if frame else "elsewhere",
               func.overloadpacket.__name__)
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[key] += time.perf_counter() - start
        self.sites[key] += 1
        return out

    def by_file(self) -> dict[str, tuple[int, float]]:
        """(ops, seconds) per source file: meft_ds/coupling.py, ..., elsewhere."""
        files: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        for (site, op), n in self.sites.items():
            entry = files[site.split(":")[0]]
            entry[0] += n
            entry[1] += self.seconds[(site, op)]
        return {name: (n, s) for name, (n, s) in sorted(files.items(), key=lambda kv: -kv[1][1])}

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="opt-1.3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="of the weights")
    parser.add_argument("--methods", default="lora_gc,meft1_exact")
    parser.add_argument("--top_sites", type=int, default=12, help="meft_ds source lines listed by compute ops")
    parser.add_argument("--json", help="also write each method's wall time, kernels, kernel time and compute ops here")
    args = parser.parse_args()
    results = {}
    cuda = args.device == "cuda"
    config = setups.make_config(args.shape, args.layers)
    batch = {k: v.to(args.device) for k, v in
             setups.make_batch(config, args.batch_size, args.seq_len, seed=0, padding=True).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in args.methods.split(","):
        base = setups.base_model(config, seed=0, dtype=getattr(torch, args.dtype))
        model = setups.build_method(base, setups.Method(name))
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
        # Kernels only: user annotations (record_function ranges) also appear as device events; counting their
        # time too is probably what made an earlier version's kernel time twice the table's "Self CUDA time total"
        # (not checked on a GPU since).
        device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
        kernels, device_ms = sum(e.count for e in device), sum(e.self_device_time_total for e in device) / 1e3
        print(f"== {name}: wall {wall * 1e3:.1f} ms, device kernel time {device_ms:.1f} ms, kernels {kernels}")
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=18, max_name_column_width=60))
        with OpCounter() as counter:
            model(**batch).loss.backward()
        print(f"== {name}: compute ops {counter.total} in one step; most from meft_ds source lines:")
        own = [(site, op, n) for (site, op), n in counter.sites.most_common() if site != "elsewhere"]
        for site, op, n in own[: args.top_sites]:
            print(f"   {n:6d}  {op:<24s} {site}")
        files = counter.by_file()
        op_seconds = sum(s for _, s in files.values())
        print(f"== {name}: ops and their host time ({'launch' if cuda else 'run'} time, "
              f"{op_seconds * 1e3:.1f} ms in all) by source file:")
        for file, (n, s) in files.items():
            print(f"   {n:6d} ops  {s * 1e3:9.1f} ms  {100 * s / op_seconds:5.1f}%  {file}")
        results[name] = dict(wall_ms=round(wall * 1e3, 2), kernels=kernels, device_kernel_ms=round(device_ms, 2),
                             compute_ops=counter.total,
                             ops_and_host_ms_by_file={f: [n, round(s * 1e3, 2)] for f, (n, s) in files.items()})
        del model, base
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, shape=args.shape,
                    layers=args.layers, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype)
        with open(args.json, "w") as handle:
            json.dump(dict(meta=meta, methods=results), handle, indent=2)


if __name__ == "__main__":
    main()
