"""What is benchmarked: model shapes (randomly initialised from a config), methods, and the data batch.

Every method gets the same randomly initialised weights (one seed) and the same token batch. The task
is sequence classification (2 labels) for every family, so the head is a small trainable linear layer
and no vocabulary-sized logits tensor hides the differences between the methods.

Methods (`METHODS`), all training the task head:
- full:           every weight trainable.
- lora:           PEFT LoRA, r=8, alpha=16, no dropout, on the attention query and value projections.
- lora_gc:        lora + Hugging Face activation (gradient) checkpointing, use_reentrant=False.
- lora_gc_naive:  the same with two Hugging Face defaults kept that cost memory with frozen layers
                  (see below); not in the default set, shown once in docs/benchmarks.md.
- meft1_vanilla:  the MEFT1 architecture differentiated by ordinary cached autograd.
- meft1/2/3:      MEFT1/2/3 with the reversible backward (adapter r=8) and the paper's float stream
                  arithmetic (MEFTConfig.stream_arithmetic="float").
- meft1/2/3_exact: the same with meft_ds's exact fixed-point stream arithmetic (its default): int64
                  streams plus one remainder byte per element per layer and factor < 1, so it grows
                  slowly with depth.
- meft1_exact_one_stage: meft1_exact with MEFTConfig.split_layer_recompute=False and ffn_chunks=1 (F, a
                  whole layer, recomputed in one piece in backward: more memory, less time).
- meft1_exact_bf16: meft1_exact with MEFTConfig.stream_dtype="bfloat16" (decoded stream values and the
                  gradients through the coupling in bf16; the states stay int64). With bf16 weights this is
                  what the default ("auto") does; meft1_exact_fp32 keeps float32 values there (the default
                  before 2026-11-30).
- meft1_exact_chunksN (N = 1, 2, 4, 8), meft1_chunksN, meft3_chunksN (N = 1, 4): the same with
                  MEFTConfig.batch_chunks=N (default 1): F and G run on N slices of the batch in forward and in the
                  reversible backward. (The default was 4 for a few hours on 2026-11-30: in the JSON files of
                  those runs, meft1_exact, meft1 and meft3 without a suffix ran with 4 slices.)
- meft1_exact_ffnN (N = 1, 4, 8), meft1_exact_one_stage_ffnN (N = 2, 4): the same with MEFTConfig.ffn_chunks=N
                  (default 2 since 2026-12-02, 1 before: in older JSON files meft1_exact ran with 1): the FFN
                  inside F runs on N slices of the tokens, each recomputed and back-propagated before the next.
- meft1_exact_attnN (N = 2, 4, 8): meft1_exact with MEFTConfig.attention_chunks=N: the attention inside F runs on
                  N slices of the batch's sequences, each recomputed and back-propagated before the next;
                  meft1_exact_attnN_ffnN (N = 4, 8) with ffn_chunks=N too; meft1_exact_bf16_int32_attn4_ffn4
                  both slicings with meft1_exact_bf16_int32's int32 states.
- meft1_exact_int32, meft1_exact_bf16_int32: meft1_exact and meft1_exact_bf16 with int32 states
                  (MEFTConfig.state_dtype="int32", frac_bits=16); meft1_exact_int32_chunks8: int32 states and 8
                  batch slices (the least memory the options give).
Any method can also run with the lowest `num_frozen_layers` layers frozen (label suffix `+frozenK`):
- MEFT: MEFTConfig.num_frozen_layers (original layers run under no_grad);
- LoRA: no LoRA in those layers (`layers_to_transform`). Their weights are frozen and so is the
  embedding, so the hidden state entering the first LoRA layer does not require grad and autograd
  records nothing below it: those layers save no activation at all, as MEFT's frozen layers (checked
  by measurement: LoRA with K of N layers frozen saves exactly what LoRA on N-K layers saves).
- LoRA + checkpointing: two Hugging Face defaults are undone. (1) `activation_checkpointing_enable`
  (alias `gradient_checkpointing_enable`) calls `enable_input_require_grads`, a hook that makes the
  embedding output require grad (only the reentrant checkpoint needs it); then every frozen layer
  records its graph. (2) A checkpointed layer saves its inputs for the recomputation even when nothing
  in it needs grad (torch's non-reentrant checkpoint always records its input saver), so frozen layers
  are not checkpointed. `build_method` checks that no hook on the embedding is left.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from meft_ds import MEFTConfig, make_reversible
from meft_ds.models import family_for

# Hugging Face config fields of each shape (public model cards); `--layers` overrides the depth.
SHAPES: dict[str, dict] = {
    "roberta-base": dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=50265, max_position_embeddings=514,
                         type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "roberta-large": dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, vocab_size=50265, max_position_embeddings=514,
                          type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "opt-125m": dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     ffn_dim=3072, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
                     do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     ffn_dim=8192, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048,
                     do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    # TinyLlama-1.1B's shape: grouped-query attention (4 KV heads), gated MLP, RMSNorm, rotary embeddings.
    "llama-1.1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                       max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # For tests only: seconds per step on a CPU.
    "tiny-roberta": dict(model_type="roberta", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128, vocab_size=1000, max_position_embeddings=130,
                         type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "tiny-opt": dict(model_type="opt", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=128,
                     vocab_size=1000, max_position_embeddings=256, word_embed_proj_dim=64,
                     do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "tiny-llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}

# LoRA targets, the task head and the layer list come from the family registry (meft_ds.models).
LORA_RANK = 8
ADAPTER_DIM = 8


@dataclass(frozen=True)
class Method:
    """One way of fine-tuning. `name` is one of METHODS; `num_frozen_layers` > 0 adds `+frozenK`."""

    name: str
    num_frozen_layers: int = 0

    @property
    def label(self) -> str:
        return self.name if self.num_frozen_layers == 0 else f"{self.name}+frozen{self.num_frozen_layers}"

    @property
    def is_lora(self) -> bool:
        return self.name.startswith("lora")

    @property
    def is_meft(self) -> bool:
        return self.name.startswith("meft")


# The exact stream arithmetic (MEFTConfig.stream_arithmetic="exact") is benchmarked where the core has it.
HAS_EXACT = "stream_arithmetic" in {f.name for f in dataclasses.fields(MEFTConfig)}
METHODS = ("full", "lora", "lora_gc", "lora_gc_naive", "meft1_vanilla", "meft2_vanilla", "meft3_vanilla",
           "meft1", "meft2", "meft3") + (("meft1_exact", "meft2_exact", "meft3_exact", "meft1_exact_one_stage",
                                          "meft1_exact_bf16", "meft1_exact_fp32", "meft1_exact_int32",
                                          "meft1_exact_bf16_int32", "meft1_exact_chunks1", "meft1_exact_chunks2",
                                          "meft1_exact_chunks4", "meft1_exact_chunks8", "meft1_exact_int32_chunks8",
                                          "meft1_chunks1", "meft1_chunks4",
                                          "meft3_chunks1", "meft3_chunks4", "meft1_exact_ffn1", "meft1_exact_ffn4",
                                          "meft1_exact_ffn8", "meft1_exact_one_stage_ffn2",
                                          "meft1_exact_one_stage_ffn4", "meft1_exact_attn2",
                                          "meft1_exact_attn4", "meft1_exact_attn8",
                                          "meft1_exact_attn4_ffn4", "meft1_exact_attn8_ffn8",
                                          "meft1_exact_bf16_int32_attn4_ffn4")
                                         if HAS_EXACT else ())
DEFAULT_METHODS = ("full", "lora", "lora_gc", "meft1_vanilla", "meft1", "meft2", "meft3") + (
    ("meft1_exact",) if HAS_EXACT else ())
# Methods also run with frozen lower layers (full fine-tuning has no frozen variant).
DEFAULT_FROZEN_METHODS = ("lora", "lora_gc", "lora_gc_naive", "meft1_vanilla", "meft1")


# The config field holding the attention-probability dropout, per model_type.
ATTENTION_DROPOUT_FIELD = {"roberta": "attention_probs_dropout_prob", "opt": "attention_dropout",
                           "llama": "attention_dropout"}


def make_config(shape: str, num_layers: int | None = None, attn_implementation: str = "sdpa",
                attention_dropout: float | None = None):
    """A Hugging Face config of `shape` (2 labels), with `num_layers` layers and attention dropout if given.

    Attention dropout matters for memory on CPU: there, scaled_dot_product_attention with dropout > 0
    falls back to the math kernel, which saves the T x T attention probabilities for backward; without
    dropout (and on GPUs, whose flash / memory-efficient kernels do dropout) only q, k, v, the output
    and the log-sum-exp are saved.
    """
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; known shapes: {sorted(SHAPES)}.")
    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    if attention_dropout is not None:
        fields[ATTENTION_DROPOUT_FIELD[model_type]] = attention_dropout
    config = AutoConfig.for_model(model_type, num_labels=2, **fields)
    config._attn_implementation = attn_implementation
    return config


def base_model(config, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """The randomly initialised model every method starts from (same seed -> same weights)."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    return model.to(device=device, dtype=dtype)


def share_frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters share storage with `model` (new Parameter objects, same data).

    Used to hold many methods in one process for interleaved timing without one copy of the weights
    each. Only for methods that never update the shared weights (the task head is cloned: it trains).
    """
    memo = {}
    head_names = family_for(model).head_names
    for name, param in model.named_parameters():
        data = param.detach().clone() if name.split(".")[0] in head_names else param.detach()
        memo[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers (before any MEFT conversion): its family's one layer site."""
    (site,) = family_for(model).sites(model)
    return getattr(site.parent, site.attribute)


def _train_head(model: nn.Module) -> None:
    for name in family_for(model).head_names:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            head.requires_grad_(True)


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 name; same code path
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_method(model: nn.Module, method: Method) -> nn.Module:
    """Turn a freshly built (or copied) base model into `method`'s trainable model, in place; return it.

    Raises ValueError for an unknown method or a frozen-layer count that leaves no trainable layer.
    """
    if method.name not in METHODS:
        raise ValueError(f"Unknown method {method.name!r}; known methods: {METHODS}.")
    layers = layer_list(model)
    num_layers, frozen = len(layers), method.num_frozen_layers
    if frozen >= num_layers:
        raise ValueError(f"{method.label}: {frozen} frozen layers leave no trainable layer of {num_layers}.")
    if method.name == "full":
        if frozen:
            raise ValueError("full fine-tuning has no frozen-layer variant in this benchmark.")
        return model.requires_grad_(True)
    if method.is_lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
            target_modules=list(family_for(model).lora_targets),
            layers_to_transform=list(range(frozen, num_layers)) if frozen else None,
        )
        hf_model = model
        model = get_peft_model(hf_model, lora_config)
        _train_head(hf_model)
        if method.name.startswith("lora_gc"):
            _enable_checkpointing(hf_model)
            if method.name == "lora_gc":
                # HF makes the embedding output require grad whenever checkpointing is switched on (needed
                # only by the reentrant checkpoint); with it, frozen layers below the first LoRA layer
                # record their graph. use_reentrant=False does not need it, so the fair baseline drops it
                # and does not checkpoint frozen layers. lora_gc_naive keeps both HF defaults.
                hf_model.disable_input_require_grads()
                for layer in layers[:frozen]:
                    layer.gradient_checkpointing = False
        if method.name != "lora_gc_naive" and hf_model.get_input_embeddings()._forward_hooks:
            raise RuntimeError(f"{method.label}: a hook makes the embedding output require grad.")
        return model
    variant, _, suffix = method.name.partition("_")
    options = {"vanilla": dict(backward="vanilla"), "exact": {}, "": {},
               "exact_one_stage": dict(split_layer_recompute=False, ffn_chunks=1),
               "exact_bf16": dict(stream_dtype="bfloat16"),
               "exact_fp32": dict(stream_dtype="float32"),
               "exact_int32": dict(state_dtype="int32", frac_bits=16),
               "exact_bf16_int32": dict(stream_dtype="bfloat16", state_dtype="int32", frac_bits=16),
               "exact_chunks1": dict(batch_chunks=1), "exact_chunks2": dict(batch_chunks=2),
               "exact_chunks4": dict(batch_chunks=4), "exact_chunks8": dict(batch_chunks=8),
               "exact_int32_chunks8": dict(state_dtype="int32", frac_bits=16, batch_chunks=8),
               "chunks1": dict(batch_chunks=1), "chunks4": dict(batch_chunks=4),
               "exact_ffn1": dict(ffn_chunks=1), "exact_ffn4": dict(ffn_chunks=4), "exact_ffn8": dict(ffn_chunks=8),
               "exact_one_stage_ffn2": dict(split_layer_recompute=False, ffn_chunks=2),
               "exact_one_stage_ffn4": dict(split_layer_recompute=False, ffn_chunks=4),
               "exact_attn2": dict(attention_chunks=2), "exact_attn4": dict(attention_chunks=4),
               "exact_attn8": dict(attention_chunks=8),
               "exact_attn4_ffn4": dict(attention_chunks=4, ffn_chunks=4),
               "exact_attn8_ffn8": dict(attention_chunks=8, ffn_chunks=8),
               "exact_bf16_int32_attn4_ffn4": dict(stream_dtype="bfloat16", state_dtype="int32", frac_bits=16,
                                                   attention_chunks=4, ffn_chunks=4)}[suffix]
    if HAS_EXACT:  # pinned: the core's default arithmetic may change
        options["stream_arithmetic"] = "exact" if suffix.startswith("exact") else "float"
    config = MEFTConfig(variant=variant, adapter_dim=ADAPTER_DIM, num_frozen_layers=frozen, **options)
    return make_reversible(model, config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(config, batch_size: int, seq_len: int, seed: int, padding: bool, device="cpu") -> dict:
    """Random token ids (never the pad id), right padding and random binary labels.

    With `padding`, sample i keeps a random length in [seq_len/2, seq_len] (sample 0 the full length),
    as a padded GLUE batch would; the rest is pad tokens with attention_mask 0.
    """
    generator = torch.Generator().manual_seed(seed)
    low = max(config.pad_token_id, config.bos_token_id or 0, config.eos_token_id or 0) + 1
    input_ids = torch.randint(low, config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padding:
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
        lengths[0] = seq_len
        positions = torch.arange(seq_len)
        attention_mask = (positions[None, :] < lengths[:, None]).long()
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}
