"""LLaMA-family decoders: pre-RMSNorm, rotary embeddings (passed in as position_embeddings), gated MLP."""

from __future__ import annotations

from fractions import Fraction

from .base import Family, StackSite


class LlamaFamily(Family):
    model_types = ("llama", "mistral")
    # Deep decoders: the reference work keeps the lowest third frozen (docs/method.md, "Deep models").
    frozen_share = Fraction(1, 3)

    def check_config(self, config) -> None:
        layer_types = getattr(config, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise ValueError(
                f"meft_ds runs all layers of a stack with one attention mask; this config mixes layer types "
                f"{sorted(set(layer_types))}. Use a config whose layers all have the same attention type."
            )

    def sites(self, model):
        return [StackSite(model.base_model, "layers", "decoder")]

    def attention(self, layer, hidden_states, inputs):
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **inputs)
        return hidden_states + out

    def ffn(self, layer, hidden_states, adapter):
        ffn_input = layer.post_attention_layernorm(hidden_states)
        out = layer.mlp(ffn_input)
        if adapter is not None:
            out = out + adapter(ffn_input)
        return hidden_states + out

    def output_projection(self, layer):
        return layer.self_attn, "o_proj"
