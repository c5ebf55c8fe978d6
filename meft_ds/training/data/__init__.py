"""Datasets for fine-tuning: GLUE tasks, user CSV/JSON files and causal-LM prompt/answer data.

Everything is loaded with the `datasets` library and ends up in one shape, whatever the source:

    dsdict, spec = load_task_datasets(task_name="sst2", data_dir="data/sst2")
    tokenized = tokenize_dataset(dsdict, tokenizer, spec, max_seq_length=128)
    loader = DataLoader(tokenized["train"], batch_size=16, collate_fn=collate_fn(tokenizer))

* `load_task_datasets` returns a `DatasetDict` with a "train" split and one split per name in
  `spec.eval_splits`, using the Hugging Face hub's GLUE column names (sentence / sentence1,sentence2 /
  premise,hypothesis / question,sentence / question1,question2, plus `label` and `idx`) and integer labels
  in the hub's order (`spec.label_names`); regression labels are floats, causal-LM data has prompt/answer.
* `tokenize_dataset` keeps only the model inputs (`input_ids`, `attention_mask`, and `token_type_ids`
  when the tokenizer produces them) and `labels`. By default sequences are NOT padded: `collate_fn`
  pads each batch to its longest sequence (dynamic padding). With `pad_to_max_length=True` every
  sequence is padded to `max_seq_length` already and the collator only stacks.
* Every check raises ValueError / FileNotFoundError saying what was found, what was expected, and
  how to fix it; docs/data.md lists the accepted formats.
"""

from .batching import PaddingCollator, collate_fn, tokenize_dataset
from .loading import load_task_datasets, validate_dataset
from .tasks import GLUE_TASKS, HUB_GLUE_DATASET, LABEL_PAD_ID, TASK_KINDS, TaskSpec, get_task_spec

__all__ = ["TaskSpec", "TASK_KINDS", "LABEL_PAD_ID", "GLUE_TASKS", "HUB_GLUE_DATASET", "get_task_spec",
           "load_task_datasets", "validate_dataset", "tokenize_dataset", "PaddingCollator", "collate_fn"]
