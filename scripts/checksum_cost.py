"""Cost per MEFT layer of the exact arithmetic's guards: the keyed reconstruction checksum and the range checks.

    python scripts/checksum_cost.py --tokens 2048 --hidden 768 --repeats 20

A stream of `tokens` x `hidden` int64 states (e.g. 16 sequences x 128 tokens, BERT-base width). Per MEFT
layer the reversible backward takes 4 checksums (2 streams in forward, 2 rebuilt in backward) and 2
quantisations in forward + 2 in backward; each quantisation now has one aminmax range check, and a sum
with factor 1 (MEFT1/2) one more on the int64 state. Times (the fastest of --repeats interleaved rounds) are
printed next to one forward of a BERT layer of that width (F and G of MEFT2 together), the work a layer
does anyway, so the ratio is the overhead. Also prints the old checksum (two position-weighted sums).
"""

from __future__ import annotations

import argparse
import time

import torch

from meft_ds.coupling import ExactCoupling, Stream, _within


def fastest_seconds(functions: dict, repeats: int) -> dict:
    """Each function's fastest run over `repeats` interleaved rounds (after a warm-up): on a shared, noisy
    machine the minimum is the stable figure, the median mostly measures the neighbours."""
    times = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def old_checksum(state: torch.Tensor) -> torch.Tensor:
    flat = state.reshape(-1)
    weights = torch.arange(flat.numel(), dtype=torch.int64) % 8191 + 1
    return torch.stack([flat.sum(), (flat * weights).sum()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    coupling = ExactCoupling(torch.float32, 32)
    block_out = torch.randn(args.tokens, args.hidden)
    state = coupling.quantise(block_out)[0]
    stream = Stream(None, state)
    layer = BertLayer(BertConfig(hidden_size=args.hidden, num_attention_heads=12,
                                 intermediate_size=4 * args.hidden)).eval()
    hidden = torch.randn(args.tokens // 128 or 1, min(args.tokens, 128), args.hidden)
    with torch.no_grad():
        results = fastest_seconds({
            "checksum, keyed (one)": lambda: coupling.checksum(stream, 12345),
            "checksum, old position-weighted (one)": lambda: old_checksum(state),
            "quantise with range check (one)": lambda: coupling.quantise(block_out),
            "quantise without (one)": lambda: torch.round(block_out.double() * coupling.scale).to(torch.int64),
            "range check of a factor-1 sum (one)": lambda: _within(state, 2 ** 62),
            "BERT layer forward (reference)": lambda: layer(hidden),
        }, args.repeats)
    layer_time = results["BERT layer forward (reference)"]
    print(f"stream {args.tokens} x {args.hidden}, {torch.get_num_threads()} threads, fastest of {args.repeats}")
    for name, seconds in results.items():
        print(f"{name:42s} {seconds * 1e3:8.3f} ms  ({100 * seconds / layer_time:5.1f}% of a layer forward)")
    per_layer = 4 * results["checksum, keyed (one)"]
    guards = 4 * (results["quantise with range check (one)"] - results["quantise without (one)"]) \
        + 2 * results["range check of a factor-1 sum (one)"]
    print(f"per MEFT layer and step: 4 keyed checksums {per_layer * 1e3:.3f} ms "
          f"(old: {4 * results['checksum, old position-weighted (one)'] * 1e3:.3f} ms); "
          f"range checks {guards * 1e3:.3f} ms; a layer's forward+recompute ~{2 * layer_time * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
