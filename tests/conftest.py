"""Shared fixtures: tiny random models of every supported family, with dropout on."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 64
PAD, BOS, EOS = 1, 0, 2
DROPOUT = 0.1


def tiny_config(model_type: str, num_layers: int = 3, **overrides):
    """A small config with dropout active everywhere the family has it."""
    if model_type in ("bert", "roberta"):
        cls = tf.BertConfig if model_type == "bert" else tf.RobertaConfig
        cfg = cls(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                  intermediate_size=32, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT,
                  max_position_embeddings=64, pad_token_id=PAD, type_vocab_size=1)
    elif model_type == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=num_layers, decoder_layers=num_layers,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, dropout=DROPOUT, attention_dropout=DROPOUT,
                            activation_dropout=DROPOUT, max_position_embeddings=64,
                            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS)
    elif model_type == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                           ffn_dim=32, dropout=DROPOUT, attention_dropout=DROPOUT, max_position_embeddings=64,
                           word_embed_proj_dim=16, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    elif model_type in ("llama", "mistral"):
        cls = tf.LlamaConfig if model_type == "llama" else tf.MistralConfig
        cfg = cls(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=32, attention_dropout=DROPOUT,
                  max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    else:
        raise KeyError(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# (model_type, head class) pairs: every family with its usual heads.
MODEL_CASES = [
    ("bert", tf.BertForSequenceClassification),
    ("bert", tf.BertForQuestionAnswering),
    ("roberta", tf.RobertaForSequenceClassification),
    ("roberta", tf.RobertaForQuestionAnswering),
    ("bart", tf.BartForSequenceClassification),
    ("bart", tf.BartForConditionalGeneration),
    ("opt", tf.OPTForCausalLM),
    ("opt", tf.OPTForSequenceClassification),
    ("llama", tf.LlamaForCausalLM),
    ("mistral", tf.MistralForCausalLM),
]
CASE_IDS = [f"{t}-{cls.__name__}" for t, cls in MODEL_CASES]


def make_batch(model, batch_size: int = 3, seq_len: int = 9, seed: int = 0) -> dict:
    """A padded batch (the first row is shorter) with the labels the head needs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    lengths = [seq_len - 3] + [seq_len] * (batch_size - 1)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = EOS  # BART classification reads the last EOS
        ids[row, length:] = PAD
        mask[row, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    elif name.endswith("ForQuestionAnswering"):
        batch["start_positions"] = torch.randint(0, seq_len - 3, (batch_size,), generator=g)
        batch["end_positions"] = torch.randint(0, seq_len - 3, (batch_size,), generator=g)
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
        batch["labels"] = labels
    return batch


def build(model_type: str, head_cls, num_layers: int = 3, dtype=torch.float64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, num_layers, **overrides)
    if head_cls.__name__.endswith(("SequenceClassification",)):
        cfg.num_labels = 2
    model = head_cls(cfg).to(dtype)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
