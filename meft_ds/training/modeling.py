"""Build the model a run trains: pretrained weights + head, then the method (MEFT, LoRA or nothing for full).

`ModelRecipe` is everything needed to rebuild that model from the original pretrained weights; it is
saved as adapter_config.json next to the exported trainable weights, so `load_adapter_model` rebuilds the
same structure (make_reversible, or LoRA) and loads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MEFTConfig
from ..convert import make_reversible

# Deep decoders: the reference work keeps the lowest layers frozen (METHOD.md, "Deep models").
FROZEN_SHARE_MODEL_TYPES = ("opt", "llama", "mistral")
FROZEN_SHARE_DIVISOR = 3


@dataclass
class ModelRecipe:
    """How the trained model is built from the original pretrained one (JSON round-trip via asdict)."""

    method: str  # meft | lora | full
    base_model_name_or_path: str
    task_kind: str  # classification | regression | causal_lm (meft_ds.data.TaskSpec.kind)
    num_labels: int
    meft_config: dict | None = None  # MEFTConfig.to_dict() for method "meft"
    lora_rank: int | None = None  # for method "lora"; alpha = 2 * rank
    pad_token_id: int | None = None  # set on the model config when the tokenizer needed one (LLaMA)


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

    meft_config = None
    if args.method == "meft":
        num_frozen = args.num_frozen_layers
        if num_frozen is None:
            num_frozen = default_num_frozen_layers(AutoConfig.from_pretrained(args.model_name_or_path))
        meft_config = MEFTConfig(
            variant=args.variant, adapter_dim=args.adapter_dim, lam=args.lam, beta=args.beta,
            num_frozen_layers=num_frozen, num_reversible_layers=args.num_reversible_layers, backward=args.backward,
            stream_arithmetic=args.stream_arithmetic,
        ).to_dict()
    return ModelRecipe(
        method=args.method, base_model_name_or_path=args.model_name_or_path, task_kind=spec.kind,
        num_labels=spec.num_labels, meft_config=meft_config,
        lora_rank=args.adapter_dim if args.method == "lora" else None, pad_token_id=tokenizer.pad_token_id,
    )


def build_model(recipe: ModelRecipe) -> nn.Module:
    """Load the pretrained weights in fp32 (DeepSpeed casts for bf16/fp16) and apply the method.

    Afterwards exactly the weights the method trains require grad. Raises ValueError from
    make_reversible / PEFT for an unsupported model or layer counts that do not fit.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    options = {"dtype": torch.float32}
    if recipe.pad_token_id is not None:
        options["pad_token_id"] = recipe.pad_token_id
    if recipe.task_kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(recipe.base_model_name_or_path, **options)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            recipe.base_model_name_or_path, num_labels=recipe.num_labels, **options)
    if recipe.method == "meft":
        make_reversible(model, MEFTConfig.from_dict(recipe.meft_config))
    elif recipe.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        task_type = TaskType.CAUSAL_LM if recipe.task_kind == "causal_lm" else TaskType.SEQ_CLS
        lora = LoraConfig(task_type=task_type, r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, lora_dropout=0.0)
        model = get_peft_model(model, lora)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (frozen ones never reach the optimizer), in two groups: matrices get
    weight decay; biases, norm weights and the scalar stream mix (ndim < 2) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
