"""Tokenization (classification, regression, causal-LM answer masking) and the padding collator."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import torch

from .loading import validate_dataset
from .tasks import LABEL_PAD_ID, TaskSpec

logger = logging.getLogger(__name__)


def _model_input_names(tokenizer) -> list[str]:
    names = getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in names or n == "input_ids"]


def tokenize_dataset(
    dsdict: datasets.DatasetDict,
    tokenizer,
    spec: TaskSpec,
    max_seq_length: int,
    pad_to_max_length: bool = False,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize every split into `input_ids`, `attention_mask` (+ `token_type_ids` when the tokenizer
    makes them, e.g. BERT) and `labels`; all other columns are removed.

    * classification: `labels` is the int class id; regression: float32.
    * causal_lm: the text is prompt + answer (joined by one space unless the prompt ends with, or the
      answer starts with, whitespace) + EOS. `labels` copies `input_ids` with -100 on prompt and special
      tokens, so the loss covers only the answer and EOS (padding gets -100 in `collate_fn`). The whole
      text is tokenized once (the tokens the model will see) and answer tokens, those covering any
      character after the prompt, are found from character offsets, so a fast tokenizer is required. Sequences longer than
      `max_seq_length` are cut at the right; examples left with no answer token are dropped (logged).

    Sequences are truncated to `max_seq_length` and left unpadded (use `collate_fn`) unless
    `pad_to_max_length=True`. Raises ValueError on a bad max_seq_length, a tokenizer without EOS (LM),
    without a pad token when padding classification inputs here, or data that fails `validate_dataset`.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    validate_dataset(dsdict, spec)
    if pad_to_max_length and tokenizer.pad_token is None and not spec.is_causal_lm:
        raise ValueError("pad_to_max_length=True needs tokenizer.pad_token (e.g. tokenizer.pad_token = "
                         "tokenizer.eos_token), or leave padding to collate_fn, which falls back to EOS")
    input_names = _model_input_names(tokenizer)

    if spec.is_causal_lm:
        return _tokenize_lm(dsdict, tokenizer, max_seq_length, pad_to_max_length, num_proc, input_names)

    def encode(batch):
        texts = [batch[name] for name in spec.text_columns]
        enc = tokenizer(
            *texts, truncation=True, max_length=max_seq_length,
            padding="max_length" if pad_to_max_length else False,
        )
        out = {name: enc[name] for name in input_names if name in enc}
        out["labels"] = batch[spec.label_column]
        return out

    label_type = datasets.Value("float32") if spec.is_regression else datasets.Value("int64")
    tokenized = datasets.DatasetDict()
    for split, ds in dsdict.items():
        mapped = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                        desc=f"tokenizing {split}")
        features = mapped.features.copy()
        features["labels"] = label_type
        tokenized[split] = mapped.cast(features)
    return tokenized


def _tokenize_lm(dsdict, tokenizer, max_seq_length, pad_to_max_length, num_proc, input_names):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("causal-LM tokenization finds answer tokens by character offsets and needs a fast "
                         "tokenizer: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token, which ends every answer; set tokenizer.eos_token first")
    pad_id = _pad_token_id(tokenizer)
    names = [n for n in input_names if n != "token_type_ids"]  # one segment: decoder LMs take no token types

    def encode_one(prompt: str, answer: str):
        joiner = "" if (not prompt or prompt[-1].isspace() or answer[:1].isspace()) else " "
        enc = tokenizer(prompt + joiner + answer, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        # A token is supervised when it covers any character after the prompt. Byte-level BPE (GPT-2,
        # OPT) and SentencePiece (LLaMA) fold the joining space into the first answer token, whose
        # offsets then start inside the joiner, so "starts at the answer" would miss it.
        labels = [
            token if not special and end > len(prompt) else LABEL_PAD_ID
            for token, (_, end), special in zip(ids, enc["offset_mapping"], enc["special_tokens_mask"])
        ]
        if ids[-1] == eos_id:  # the tokenizer already ends with EOS (e.g. add_eos_token): learn it
            labels[-1] = eos_id
        else:
            ids.append(eos_id)
            labels.append(eos_id)
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        mask = [1] * len(ids)
        if pad_to_max_length:
            pad = max_seq_length - len(ids)
            ids, mask, labels = ids + [pad_id] * pad, mask + [0] * pad, labels + [LABEL_PAD_ID] * pad
        return ids, mask, labels

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, answer in zip(batch["prompt"], batch["answer"]):
            ids, mask, labels = encode_one(prompt, answer)
            out["input_ids"].append(ids)
            out["attention_mask"].append(mask)
            out["labels"].append(labels)
        return {name: out[name] for name in (*names, "labels")}

    tokenized = datasets.DatasetDict()
    for split, ds in dsdict.items():
        mapped = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                        desc=f"tokenizing {split}")
        kept = mapped.filter(lambda labels: any(t != LABEL_PAD_ID for t in labels), input_columns="labels")
        if len(kept) < len(mapped):
            logger.warning("%s: dropped %d of %d examples whose answer does not fit in max_seq_length=%d",
                           split, len(mapped) - len(kept), len(mapped), max_seq_length)
        tokenized[split] = kept
    return tokenized


def _pad_token_id(tokenizer) -> int:
    """The pad id; decoder tokenizers without one (LLaMA) pad with EOS, which the attention mask hides."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token first")


@dataclass
class PaddingCollator:
    """Pads a list of tokenized examples into a batch of tensors.

    input_ids get the tokenizer's pad id (EOS when it has none), attention_mask and token_type_ids 0,
    per-token labels (causal LM) -100. Scalar labels become int64 (classification) or float32
    (regression) tensors. Padding goes on `padding_side` ("right" or "left"). A plain class rather than
    a closure, so DataLoader worker processes can pickle it.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": LABEL_PAD_ID}
        batch = {}
        for name in examples[0]:
            values = [example[name] for example in examples]
            if name == "labels" and not isinstance(values[0], (list, tuple)):
                is_float = isinstance(values[0], float)
                batch[name] = torch.tensor(values, dtype=torch.float32 if is_float else torch.long)
                continue
            if name not in pad_values:
                raise ValueError(f"cannot pad column {name!r}; tokenize_dataset keeps only {list(pad_values)}")
            rows = []
            for row in values:
                padding = [pad_values[name]] * (longest - len(row))
                rows.append(padding + list(row) if self.padding_side == "left" else list(row) + padding)
            batch[name] = torch.tensor(rows, dtype=torch.long)
        return batch


def collate_fn(tokenizer, pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """The batch collator for `tokenize_dataset` output: dynamic padding to the batch's longest sequence
    (a no-op on length when the data was tokenized with pad_to_max_length=True), on the tokenizer's
    padding side. Raises ValueError when the tokenizer has neither a pad nor an EOS token."""
    return PaddingCollator(_pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right",
                           pad_to_multiple_of)
