"""Build the model a run trains: pretrained weights + head, then the method (MEFT, LoRA or nothing for full).

`ModelRecipe` is everything needed to rebuild that model from the original pretrained weights; it is
saved as adapter_config.json next to the exported trainable weights, so `load_adapter_model` rebuilds the
same structure (make_reversible, or LoRA) and loads them.
"""

from __future__ import annotations

import contextlib
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


def check_sequence_length(model_config, max_seq_length: int) -> None:
    """Raise ValueError when --max_seq_length exceeds the positions the model was trained with (learned
    position tables would fail with an index error deep in the forward; rotary models would silently
    extrapolate)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the {limit} positions of this "
                         f"{model_config.model_type} model (max_position_embeddings); use at most {limit}.")


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


def build_model(recipe: ModelRecipe, dtype: torch.dtype = torch.float32, ds_config: dict | None = None) -> nn.Module:
    """Load the pretrained weights in `dtype` and apply the method.

    Training passes its precision (bf16/fp16: DeepSpeed would cast every weight to it anyway, so no rank
    ever holds an fp32 copy of the frozen weights) and its merged DeepSpeed config. Under ZeRO-3 the
    pretrained model is built partitioned (`zero3_construction`): every rank holds only its shard of each
    weight from the start, and rank 0 streams the checkpoint into the shards tensor by tensor. The method
    is applied to the partitioned model: make_reversible and PEFT read shapes from the model config and
    module attributes, never from a partitioned weight (whose local shape is empty); the adapters they
    create are ordinary tensors that deepspeed.initialize partitions.

    Afterwards exactly the weights the method trains require grad. Raises ValueError from
    make_reversible / PEFT for an unsupported model or layer counts that do not fit.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    options = {"dtype": dtype}
    if recipe.pad_token_id is not None:
        options["pad_token_id"] = recipe.pad_token_id
    with zero3_construction(ds_config):
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


@contextlib.contextmanager
def zero3_construction(ds_config: dict | None):
    """Within the body, transformers' from_pretrained builds under deepspeed.zero.Init (when `ds_config`
    is a ZeRO-3 config; otherwise this does nothing).

    transformers reads the config through a module-level weak reference that HfDeepSpeedConfig sets; it
    is cleared on exit so that a later model built in the same process (another run, an export reload)
    is not partitioned by a config that no longer applies.
    """
    if ds_config is None or int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    registered = HfDeepSpeedConfig(ds_config)
    try:
        yield registered
    finally:
        unset_hf_deepspeed_config()


def release_weights_after_recompute(engine) -> int:
    """Under ZeRO-3, partition each reversible layer's weights again as soon as the reversible backward is
    done with that layer; returns the number of MEFT stacks hooked (0 for other ZeRO stages).

    DeepSpeed treats a forward inside backward as activation-checkpoint recomputation and attributes the
    frozen weights it gathers to the module whose backward is running -- here the whole MEFT stack -- so
    it releases them only when the stack's backward ends: by then every reversible layer's weights would
    be gathered at once on every rank, the whole model for a fully reversible one. Releasing through the
    parameter coordinator (not by partitioning behind its back) keeps its count of gathered weights, which
    limits prefetching, right.
    """
    from ..reversible import MEFTStack

    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None)
    if offload is None:  # not ZeRO-3: every rank holds its weights whole anyway
        return 0
    coordinator = offload.get_param_coordinator()
    stacks = [m for m in engine.module.modules() if isinstance(m, MEFTStack)]
    for stack in stacks:
        stack.after_layer_backward = coordinator.release_and_reset_all
    return len(stacks)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count of the whole model, also when ZeRO-3 has partitioned it (numel() is then 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (frozen ones never reach the optimizer), in two groups: matrices get
    weight decay; biases, norm weights and the scalar stream mix (ndim < 2) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # A ZeRO-3 partitioned parameter is a flat empty tensor; its real shape is ds_shape.
    matrices = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trainable]
    groups = [
        {"params": [p for p, matrix in zip(trainable, matrices) if matrix], "weight_decay": weight_decay},
        {"params": [p for p, matrix in zip(trainable, matrices) if not matrix], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
