"""What a model family tells the converter: where its layer lists are and how to run a layer's halves.

A family implements `attention` (the attention block with its residual and norm) and `ffn` (the
feed-forward block with its residual and norm, plus an optional parallel adapter on its input), using
the layer's own submodules so that DeepSpeed ZeRO-3 gathers their weights (docs/method.md, ZeRO rule 1).
A full layer is `ffn(attention(h))`; tests check that this equals the original layer exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

# Keyword arguments that carry a key/value cache: never used while training (a layer recomputed in
# backward would append its keys and values twice).
CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


@dataclass
class StackSite:
    """One list of layers to convert: `getattr(parent, attribute)` is an nn.ModuleList."""

    parent: nn.Module
    attribute: str
    name: str  # for messages: "encoder", "decoder"


class Family:
    model_types: tuple[str, ...] = ()
    # Task heads trained next to the adapters (the pretrained body stays frozen).
    head_names: tuple[str, ...] = ("classifier", "score", "qa_outputs", "classification_head")
    # Modules that LoRA baselines adapt (the attention query and value projections; PEFT's defaults).
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Share of the lowest layers kept frozen when MEFTConfig.num_frozen_layers is None (rounded down).
    frozen_share: Fraction = Fraction(0)

    def default_num_frozen_layers(self, config) -> int:
        return int(config.num_hidden_layers * self.frozen_share)

    def sites(self, model: nn.Module) -> list[StackSite]:
        raise NotImplementedError

    def check_config(self, config) -> None:
        """Raise ValueError for configurations of this family that MEFT does not support."""

    def activation(self, config) -> str:
        return getattr(config, "hidden_act", None) or config.activation_function

    def attention(self, layer: nn.Module, hidden_states: torch.Tensor, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def ffn(self, layer: nn.Module, hidden_states: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
        raise NotImplementedError

    def output_projection(self, layer: nn.Module) -> tuple[nn.Module, str]:
        """(parent, attribute) of the attention output projection, where MEFT3's serial adapter goes."""
        raise NotImplementedError

    def run_frozen(self, layer: nn.Module, hidden_states: torch.Tensor, inputs: dict) -> torch.Tensor:
        return layer(hidden_states, **inputs)

    def input_binder(self, layer: nn.Module):
        """Return f(args, kwargs, training) -> inputs dict, by binding to the original layer's signature.

        The model calls the stack like it called its first layer; binding names every positional
        argument so F and G can read e.g. inputs["attention_mask"], whatever the call order.
        """
        signature = inspect.signature(layer.forward)
        return _InputBinder(signature)


class _InputBinder:
    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        self.var_keyword = next(
            (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )

    def __call__(self, args, kwargs, training: bool) -> dict:
        kwargs = dict(kwargs)
        if "past_key_values" in kwargs and "cache" in self.signature.parameters:
            kwargs["cache"] = kwargs.pop("past_key_values")  # transformers 5.23 spelling
        bound = self.signature.bind(None, *args, **kwargs)  # None stands for hidden_states
        inputs = dict(bound.arguments)
        inputs.pop(next(iter(self.signature.parameters)))
        if self.var_keyword is not None:
            inputs.update(inputs.pop(self.var_keyword, {}))
        if training:
            for key in CACHE_KEYS:
                if key in inputs:
                    inputs[key] = None
            if "use_cache" in inputs:
                inputs["use_cache"] = False
        return inputs


def without(inputs: dict, *keys: str) -> dict:
    return {k: v for k, v in inputs.items() if k not in keys}
