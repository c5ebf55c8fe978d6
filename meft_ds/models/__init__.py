"""Registry of supported model families, keyed by Hugging Face `config.model_type`."""

from __future__ import annotations

from .bart import BartFamily
from .base import Family, StackSite
from .bert import BertFamily
from .llama import LlamaFamily
from .opt import OPTFamily

REGISTRY: dict[str, Family] = {}
for _family in (BertFamily(), BartFamily(), OPTFamily(), LlamaFamily()):
    for _model_type in _family.model_types:
        REGISTRY[_model_type] = _family


def family_for(model) -> Family:
    return _family_of(getattr(getattr(model, "config", None), "model_type", None))


def default_num_frozen_layers(model_config) -> int:
    """Lowest layers kept frozen when MEFTConfig.num_frozen_layers is None: the family's frozen share."""
    return _family_of(model_config.model_type).default_num_frozen_layers(model_config)


def _family_of(model_type: str | None) -> Family:
    if model_type not in REGISTRY:
        raise ValueError(
            f"meft_ds cannot convert model_type={model_type!r}; supported model_types: {sorted(REGISTRY)}."
        )
    return REGISTRY[model_type]


__all__ = ["Family", "StackSite", "REGISTRY", "family_for", "default_num_frozen_layers"]
