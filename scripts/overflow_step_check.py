"""A forward overflow inside a reversible MEFT layer reaches DeepSpeed's step as a non-finite gradient.

    python scripts/overflow_step_check.py --precision fp16 --out output/overflow_fp16.json   # GPU (gpu_check.sh)
    python scripts/overflow_step_check.py --precision bf16                                    # CPU too

One process, a tiny random BERT made reversible (MEFT1, exact stream arithmetic), a DeepSpeed ZeRO-2
engine. Three steps; in step 2 one layer's F output gets an Inf (what an fp16 overflow inside F gives).
Passes when step 2's loss is not finite, DeepSpeed skips that update (was_step_applied() is False, the
trainable weights are unchanged) and, with fp16, the dynamic loss scale drops; steps 1 and 3 are finite
and applied. Writes the per-step record as JSON to --out; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--out", default=None, help="JSON file for the per-step record (default: print only).")
    args = parser.parse_args()

    import deepspeed
    import transformers as tf
    from deepspeed.accelerator import get_accelerator

    from meft_ds import MEFTConfig, make_reversible
    from meft_ds.reversible import MEFTStack

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           num_labels=2)
    model = tf.BertForSequenceClassification(config)
    make_reversible(model, MEFTConfig(variant="meft1", stream_arithmetic="exact"))
    layer = next(m for m in model.modules() if isinstance(m, MEFTStack)).meft_layers[1]
    original_f, inject = layer.f, {"on": False}

    def f_with_overflow(owner, hidden, inputs):
        out = original_f(owner, hidden, inputs)
        if inject["on"]:
            out = out.clone()
            out.view(-1)[3] = float("inf")
        return out

    layer.f = f_with_overflow
    ds_config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6,
        # hysteresis 1: one overflow lowers the scale (DeepSpeed's default, 2, lowers it at the second overflow in
        # a row; seen on an H200: the skipped step kept the scale at 256).
        "fp16": {"enabled": args.precision == "fp16", "initial_scale_power": 8, "hysteresis": 1},
        "bf16": {"enabled": args.precision == "bf16"},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    engine.train()
    device = engine.device
    batch = {"input_ids": torch.randint(3, 128, (4, 12), device=device),
             "attention_mask": torch.ones(4, 12, dtype=torch.long, device=device),
             "labels": torch.tensor([0, 1, 0, 1], device=device)}
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    record, ok = [], True
    for step in (1, 2, 3):
        inject["on"] = step == 2
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
        scale_before = float(getattr(optimizer, "loss_scale", 1.0))
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        after = dict(engine.module.named_parameters())
        unchanged = all(torch.equal(before[n], after[n].detach()) for n in names)
        entry = {"step": step, "overflow_injected": inject["on"], "loss": float(loss.detach()), "applied": engine.was_step_applied(),
                 "weights_unchanged": unchanged, "loss_scale_before": scale_before,
                 "loss_scale_after": float(getattr(optimizer, "loss_scale", 1.0)),
                 "grad_norm": None if engine.get_global_grad_norm() is None else float(engine.get_global_grad_norm())}
        if inject["on"]:
            entry["pass"] = (not math.isfinite(entry["loss"]) and not entry["applied"] and unchanged
                             and (args.precision != "fp16" or entry["loss_scale_after"] < scale_before))
        else:
            entry["pass"] = math.isfinite(entry["loss"]) and entry["applied"] and not unchanged
        ok = ok and entry["pass"]
        record.append(entry)
    summary = {"precision": args.precision, "device": get_accelerator().device_name(), "steps": record, "pass": ok}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
