"""Saving and loading trained adapters the Hugging Face way: one record, one pair of functions.

A directory written here holds (PEFT's file names):

- adapter_model.safetensors: the trainable weights only (adapters, stream mixes, task head), fp32;
- adapter_config.json: the `ModelRecipe`, everything needed to rebuild the model from the original
  pretrained weights: which base model (path, model_type, widths), which transformers Auto class, which
  method (meft | lora | full) and, for MEFT, every MEFTConfig setting;
- config.json: only `{"model_type": "meft_ds"}`, so that `AutoModel*.from_pretrained(dir)` never loads
  the bare base model and calls it the trained one. With meft_ds imported, the Auto classes rebuild the
  MEFT model through `load_adapter_model`; without it, transformers refuses the unknown model type.

Writers: `save_adapter` (what `model.save_pretrained(dir)` of a converted model calls, and what
transformers.Trainer calls when it saves) and the launcher's export (meft_ds.training.checkpoint), both
through `write_adapter`. Reader: `load_adapter_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MEFTConfig, strict_from_dict
from .convert import make_reversible

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
MODEL_TYPE = "meft_ds"
LOAD_HINT = "meft_ds.load_adapter_model(dir)"

# Base-model config fields the trained weights depend on; a base that differs in any of them is refused.
BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers")
# task_kind (the launcher's data/loss kind) -> the Auto class that builds its model.
TASK_AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
}
# Auto classes a converted model can be rebuilt with, the most specific first (a class name may be in several).
AUTO_CLASS_MAPPINGS = (
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


@dataclass
class ModelRecipe:
    """How the trained model is built from the original pretrained one; saved as adapter_config.json.

    The same record is written by `model.save_pretrained` (Python API, Trainer) and by the launcher's
    export, and read back by `load_adapter_model`. Raises ValueError for an unknown method, a MEFT
    recipe without meft_config, or no way to name the Auto class.
    """

    method: str  # meft | lora | full
    base_model_name_or_path: str
    task_kind: str | None  # classification | regression | causal_lm (meft_ds.training.data.TaskSpec.kind); None: other heads
    num_labels: int
    meft_config: dict | None = None  # MEFTConfig.to_dict() for method "meft"
    lora_rank: int | None = None  # for method "lora"; alpha = 2 * rank
    pad_token_id: int | None = None  # set on the model config when the tokenizer needed one (LLaMA)
    auto_class: str | None = None  # transformers Auto class that builds the base; None: from task_kind
    base_model_config: dict | None = None  # BASE_FIELDS of the base model; a base differing in one is refused

    def __post_init__(self):
        if self.method not in ("meft", "lora", "full"):
            raise ValueError(f"ModelRecipe.method={self.method!r} is unknown; use meft, lora or full.")
        if self.method == "meft" and self.meft_config is None:
            raise ValueError("ModelRecipe.method='meft' needs meft_config (MEFTConfig.to_dict()).")
        if self.auto_class is None:
            if self.task_kind not in TASK_AUTO_CLASSES:
                raise ValueError(f"ModelRecipe: task_kind={self.task_kind!r} names no Auto class; set auto_class "
                                 f"or use one of {sorted(TASK_AUTO_CLASSES)}.")
            self.auto_class = TASK_AUTO_CLASSES[self.task_kind]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelRecipe":
        return strict_from_dict(cls, values, "adapter_config.json")


def base_fingerprint(model_config) -> dict:
    """The BASE_FIELDS of a transformers config (BART/OPT map hidden_size and num_hidden_layers themselves)."""
    return {name: getattr(model_config, name, None) for name in BASE_FIELDS}


def check_base(recipe: ModelRecipe, model_config, base: str) -> None:
    """Raise ValueError (one line) when `model_config` is not the kind of base the recipe was trained on."""
    if recipe.base_model_config is None:
        return
    found = base_fingerprint(model_config)
    differing = {k: (v, found[k]) for k, v in recipe.base_model_config.items() if found.get(k) != v}
    if differing:
        detail = ", ".join(f"{k}={want!r} but the base has {got!r}" for k, (want, got) in sorted(differing.items()))
        raise ValueError(f"These adapters were trained on another base model than {base} ({detail}); "
                         f"pass the base they were trained on ({recipe.base_model_name_or_path}).")


def recipe_for(model: nn.Module, base_model_name_or_path: str | None = None) -> ModelRecipe:
    """The record of a model converted by make_reversible: its base (model.name_or_path unless given),
    its Auto class, head size and MEFT settings.

    Raises ValueError when the base path is unknown (a model built from a config, not from_pretrained)
    or when no transformers Auto class builds this model class.
    """
    from transformers.models.auto import modeling_auto

    config = getattr(model, "meft_config", None)
    if config is None:
        raise ValueError("recipe_for needs a model converted by make_reversible.")
    base = base_model_name_or_path or getattr(model, "name_or_path", "")
    if not base:
        raise ValueError("This model was not loaded with from_pretrained, so the base model it must be rebuilt from "
                         "is unknown; pass base_model_name_or_path=... to save_pretrained.")
    model_config = model.config
    class_name = type(model).__name__
    auto_class = None
    for name, mapping_name in AUTO_CLASS_MAPPINGS:
        names = getattr(modeling_auto, mapping_name).get(model_config.model_type, ())
        if class_name in ((names,) if isinstance(names, str) else names):
            auto_class = name
            break
    if auto_class is None:
        raise ValueError(f"No transformers Auto class builds {class_name} for model_type={model_config.model_type!r}, "
                         "so this model cannot be rebuilt from its base by name.")
    task_kind = None
    if auto_class == "AutoModelForSequenceClassification":
        regression = model_config.problem_type == "regression" or model_config.num_labels == 1
        task_kind = "regression" if regression else "classification"
    elif auto_class == "AutoModelForCausalLM":
        task_kind = "causal_lm"
    return ModelRecipe(
        method="meft", base_model_name_or_path=str(base), task_kind=task_kind, num_labels=model_config.num_labels,
        meft_config=config.to_dict(), pad_token_id=model_config.pad_token_id, auto_class=auto_class,
        base_model_config=base_fingerprint(model_config),
    )


def build_model(recipe: ModelRecipe, model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
                ds_config: dict | None = None) -> nn.Module:
    """Load the pretrained weights in `dtype` and apply the method.

    Training passes its precision (bf16/fp16: DeepSpeed would cast every weight to it anyway, so no rank
    ever holds an fp32 copy of the frozen weights) and its merged DeepSpeed config. Under ZeRO-3 the
    pretrained model is built partitioned (`zero3_construction`): every rank holds only its shard of each
    weight from the start, and rank 0 streams the checkpoint into the shards module by module. The method
    is applied to the partitioned model: make_reversible and PEFT read shapes from the model config and
    module attributes, never from a partitioned weight (whose local tensor is empty); the adapters they
    create are ordinary tensors that deepspeed.initialize partitions.

    Afterwards exactly the weights the method trains require grad. Raises ValueError for a base that is
    not the one the recipe was trained on (model_type or widths), and from make_reversible / PEFT for an
    unsupported model or layer counts that do not fit.
    """
    import transformers

    base = model_name_or_path or recipe.base_model_name_or_path
    options = {}
    if recipe.pad_token_id is not None:
        options["pad_token_id"] = recipe.pad_token_id
    if recipe.auto_class != "AutoModelForCausalLM":
        options["num_labels"] = recipe.num_labels
    model_config = transformers.AutoConfig.from_pretrained(base, **options)
    check_base(recipe, model_config, base)  # before any weight is read
    with zero3_construction(ds_config):
        model = getattr(transformers, recipe.auto_class).from_pretrained(base, config=model_config, dtype=dtype)
    return apply_method(model, recipe)


def apply_method(model: nn.Module, recipe: ModelRecipe) -> nn.Module:
    """The recipe's method applied to a freshly built base model (in place for MEFT; LoRA wraps it).

    The one place a method is applied: training, export reloads and the memory planner (meft_ds.plan,
    on a model built on the meta device) all go through it, so they count the same trainable weights.
    """
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


def write_adapter(save_directory: str, state: dict[str, torch.Tensor], recipe: ModelRecipe) -> None:
    """Write the adapter directory (each file replaced atomically). `state`: the trainable weights."""
    from safetensors.torch import save_file

    output = Path(save_directory)
    output.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in state.items()}
    staging = output / f".tmp-{ADAPTER_WEIGHTS}"
    save_file(tensors, str(staging), metadata={"format": "pt"})
    os.replace(staging, output / ADAPTER_WEIGHTS)
    _write_json(output / ADAPTER_CONFIG, recipe.to_dict())
    _write_json(output / MODEL_CONFIG, {"model_type": MODEL_TYPE, "load_with": LOAD_HINT})


def save_adapter(model: nn.Module, save_directory: str, state_dict: dict | None = None,
                 is_main_process: bool = True, base_model_name_or_path: str | None = None, **kwargs) -> None:
    """`save_pretrained` of a model converted by make_reversible: writes the adapter directory.

    `state_dict` (as transformers.Trainer passes it, e.g. gathered by DeepSpeed) supplies the values of
    the trainable weights when given; otherwise they are read from the model. Other keyword arguments
    of PreTrainedModel.save_pretrained that change nothing here (safe_serialization, max_shard_size, ...)
    are accepted; push_to_hub is refused (upload the directory with huggingface_hub instead).
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for MEFT models; save, then upload "
                         "the directory with huggingface_hub.")
    recipe = recipe_for(model, base_model_name_or_path)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if state_dict is None:
        state_dict = dict(model.named_parameters())
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise ValueError(f"save_pretrained: the given state_dict lacks trainable weights {missing[:5]}.")
    if is_main_process:
        write_adapter(save_directory, {name: state_dict[name] for name in names}, recipe)


def read_recipe(adapter_dir: str) -> ModelRecipe:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no {ADAPTER_CONFIG}; it is not an adapter directory written by "
                                "save_pretrained of a MEFT model or by the meft_ds launcher.")
    return ModelRecipe.from_dict(json.loads(path.read_text()))


def load_adapter_model(adapter_dir: str, model_name_or_path: str | None = None) -> nn.Module:
    """The trained model: the original pretrained model (from adapter_config.json, or `model_name_or_path`
    if it moved), converted the same way (make_reversible / LoRA), with the saved weights loaded; in eval mode.

    Raises FileNotFoundError for a directory without adapter_config.json, and ValueError (one line) for
    a base of another model_type or width, or saved weights that do not match the rebuilt model.
    """
    from safetensors.torch import load_file

    recipe = read_recipe(adapter_dir)
    model = build_model(recipe, model_name_or_path)
    state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(expected):
        raise ValueError(f"{adapter_dir}: saved weights do not match the rebuilt model; missing "
                         f"{sorted(set(expected) - set(state))[:5]}, unexpected {sorted(set(state) - set(expected))[:5]}.")
    wrong = [name for name, p in expected.items() if p.shape != state[name].shape]
    if wrong:
        raise ValueError(f"{adapter_dir}: saved weights do not match the rebuilt model's shapes ({wrong[:3]}).")
    model.load_state_dict(state, strict=False)
    return model.eval()


def _write_json(path: Path, value: dict) -> None:
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)


# --- transformers Auto classes ---------------------------------------------------------------------------
# config.json of an adapter directory says model_type "meft_ds". Registered below, so that with meft_ds
# imported AutoModel*.from_pretrained(dir) rebuilds the MEFT model instead of failing.

from transformers import PreTrainedConfig  # noqa: E402  (after the record: this part is optional glue)


class MEFTAdapterConfig(PreTrainedConfig):
    """The config.json of an adapter directory: a marker only (the record is adapter_config.json)."""

    model_type = MODEL_TYPE


# Keyword arguments transformers' Auto classes add on their own; anything else a caller passes is refused.
_AUTO_FACTORY_KWARGS = {"config", "adapter_kwargs", "trust_remote_code", "revision", "token", "cache_dir",
                        "local_files_only", "subfolder", "force_download", "proxies", "code_revision"}


def _auto_loader(auto_class: str) -> type:
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        extra = sorted(set(kwargs) - _AUTO_FACTORY_KWARGS)
        config = kwargs.get("config")
        if config is not None and config.to_diff_dict() != MEFTAdapterConfig.from_pretrained(
                pretrained_model_name_or_path).to_diff_dict():
            extra.append("config options such as num_labels")  # AutoConfig took them in; they would be ignored
        if args or extra:
            raise ValueError(f"{auto_class}.from_pretrained of a MEFT adapter directory takes no options "
                             f"({extra or 'positional arguments'}); use {LOAD_HINT}.")
        recipe = read_recipe(pretrained_model_name_or_path)
        if recipe.auto_class != auto_class:
            raise ValueError(f"{pretrained_model_name_or_path} holds a MEFT model built with {recipe.auto_class}; "
                             f"load it with {recipe.auto_class}.from_pretrained(dir) or {LOAD_HINT}.")
        return load_adapter_model(pretrained_model_name_or_path)

    return type(f"MEFTAdapterLoaderFor{auto_class}", (), {
        "config_class": MEFTAdapterConfig, "from_pretrained": classmethod(from_pretrained),
        "__doc__": f"What {auto_class}.from_pretrained calls for a MEFT adapter directory."})


def _register_auto_classes() -> None:
    import transformers

    transformers.AutoConfig.register(MODEL_TYPE, MEFTAdapterConfig, exist_ok=True)
    for auto_class, _ in AUTO_CLASS_MAPPINGS:
        getattr(transformers, auto_class).register(MEFTAdapterConfig, _auto_loader(auto_class), exist_ok=True)


_register_auto_classes()
