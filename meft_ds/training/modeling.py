"""Build the model a run trains: pretrained weights + head, then the method (MEFT, LoRA or nothing for full).

`ModelRecipe` (meft_ds.adapter_io) is everything needed to rebuild that model from the original
pretrained weights; it is saved as adapter_config.json next to the exported trainable weights, the same
record `save_pretrained` of a converted model writes, so `load_adapter_model` reads both.
"""

from __future__ import annotations

from torch import nn

from ..adapter_io import ModelRecipe, base_fingerprint, build_model
from ..config import MEFTConfig

__all__ = ["ModelRecipe", "build_model", "make_recipe", "load_tokenizer", "default_num_frozen_layers", "param_groups"]

# Deep decoders: the reference work keeps the lowest layers frozen (METHOD.md, "Deep models").
FROZEN_SHARE_MODEL_TYPES = ("opt", "llama", "mistral")
FROZEN_SHARE_DIVISOR = 3


def load_tokenizer(name_or_path: str):
    """The pretrained tokenizer; decoder tokenizers without a pad token pad with EOS (the mask hides it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_num_frozen_layers(model_config) -> int:
    """0 for encoders; a third of the layers (rounded down) for OPT and LLaMA-family decoders."""
    if model_config.model_type in FROZEN_SHARE_MODEL_TYPES:
        return model_config.num_hidden_layers // FROZEN_SHARE_DIVISOR
    return 0


def make_recipe(args, spec, tokenizer) -> ModelRecipe:
    """The recipe for a run's flags and task; reads the model config (not the weights) for defaults."""
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(args.model_name_or_path)
    meft_config = None
    if args.method == "meft":
        num_frozen = args.num_frozen_layers
        if num_frozen is None:
            num_frozen = default_num_frozen_layers(base_config)
        meft_config = MEFTConfig(
            variant=args.variant, adapter_dim=args.adapter_dim, lam=args.lam, beta=args.beta,
            num_frozen_layers=num_frozen, num_reversible_layers=args.num_reversible_layers, backward=args.backward,
            stream_arithmetic=args.stream_arithmetic,
        ).to_dict()
    return ModelRecipe(
        method=args.method, base_model_name_or_path=args.model_name_or_path, task_kind=spec.kind,
        num_labels=spec.num_labels, meft_config=meft_config,
        lora_rank=args.adapter_dim if args.method == "lora" else None, pad_token_id=tokenizer.pad_token_id,
        base_model_config=base_fingerprint(base_config),
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (frozen ones never reach the optimizer), in two groups: matrices get
    weight decay; biases, norm weights and the scalar stream mix (ndim < 2) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
