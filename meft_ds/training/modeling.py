"""Build the model a run trains: pretrained weights + head, then the method (MEFT, LoRA or nothing for full).

`ModelRecipe` (meft_ds.adapter_io) is everything needed to rebuild that model from the original
pretrained weights; it is saved as adapter_config.json next to the exported trainable weights, the same
record `save_pretrained` of a converted model writes, so `load_adapter_model` reads both.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..adapter_io import ModelRecipe, base_fingerprint, build_model
from ..models import default_num_frozen_layers

__all__ = ["ModelRecipe", "build_model", "make_recipe", "load_tokenizer", "param_groups", "check_sequence_length",
           "num_parameters", "release_weights_after_recompute", "init_regression_bias", "regression_start"]


def load_tokenizer(name_or_path: str):
    """The pretrained tokenizer; decoder tokenizers without a pad token pad with EOS (the mask hides it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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

    base_config = AutoConfig.from_pretrained(args.model_name_or_path)
    meft_config = None
    if args.method == "meft":
        # The recipe records the number of frozen layers, not None, so a resume compares what was built.
        config = args.meft_config()
        if config.num_frozen_layers is None:
            config = dataclasses.replace(config, num_frozen_layers=default_num_frozen_layers(base_config))
        meft_config = config.to_dict()
    return ModelRecipe(
        method=args.method, base_model_name_or_path=args.model_name_or_path, task_kind=spec.kind,
        num_labels=spec.num_labels, meft_config=meft_config,
        lora_rank=args.adapter_dim if args.method == "lora" else None, pad_token_id=tokenizer.pad_token_id,
        base_model_config=base_fingerprint(base_config),
    )


def regression_start(labels) -> float:
    """Where a regression head's output starts: the mean of the central 80% of the training labels. It removes
    the labels' offset as the mean does, and a few stray labels (a typo, a corrupt row) cannot move it to where
    every prediction overflows; unlike the median, it stays between the values of two-valued labels."""
    import torch

    values = torch.as_tensor(labels, dtype=torch.float64).sort().values
    cut = int(0.1 * values.numel())
    return float(values[cut: values.numel() - cut].mean())


def init_regression_bias(model: nn.Module, value: float) -> list[str]:
    """Set the bias of the regression head's output (every trainable one-output nn.Linear inside a task head:
    BERT's classifier, RoBERTa's classifier.out_proj, PEFT's modules_to_save copy) to `value`, the mean
    training label (`regression_start`); returns the names of the biases set (empty when the head has none,
    e.g. OPT's score).

    Why: a new head outputs ~0 while labels such as STS-B's 0-5 average ~2.7. The first steps' MSE gradient
    is then a shift of every output the same way, ~10x larger than once the mean is fitted (docs/quality.md,
    "Regression"): Adam moves every adapter by the full learning rate toward that shift (MEFT1/MEFT3 at 1e-2
    collapse to a constant), and its second-moment estimate keeps the large early gradients for the whole
    short run, so the later, informative gradients take ~10x smaller steps (LoRA stays at the mean). Starting
    the bias at the mean removes the shift; the weights and the rest of the head keep their initialisation.
    Under ZeRO-3 the bias is gathered, set on rank 0 and partitioned again (every rank must call this).
    """
    import torch

    from ..models.base import Family

    head_names = set(Family.head_names)  # the default every family uses (the dataclass field's class attribute)
    names = []
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not (isinstance(module, nn.Linear) and module.out_features == 1 and bias is not None and bias.requires_grad
                and head_names & set(name.split("."))):
            continue
        if hasattr(bias, "ds_id"):  # ZeRO-3 partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters([bias], modifier_rank=0), torch.no_grad():
                bias.fill_(value)
        else:
            with torch.no_grad():
                bias.fill_(value)
        names.append(f"{name}.bias")
    return names


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
