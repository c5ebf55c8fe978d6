"""OPT decoders: pre-LN (125m, 1.3b, ...) or post-LN (350m), per config.do_layer_norm_before."""

from __future__ import annotations

from fractions import Fraction

from torch.nn import functional

from .base import Family, StackSite, without


class OPTFamily(Family):
    model_types = ("opt",)
    # Deep decoders: the reference work keeps the lowest third frozen (docs/method.md, "Deep models").
    frozen_share = Fraction(1, 3)

    def sites(self, model):
        return [StackSite(model.base_model.decoder, "layers", "decoder")]

    def attention(self, layer, hidden_states, inputs):
        residual = hidden_states
        if layer.do_layer_norm_before:
            hidden_states = layer.self_attn_layer_norm(hidden_states)
        out, _ = layer.self_attn(hidden_states=hidden_states, **without(inputs, "use_cache"))
        out = residual + functional.dropout(out, p=layer.dropout, training=layer.training)
        return out if layer.do_layer_norm_before else layer.self_attn_layer_norm(out)

    def ffn(self, layer, hidden_states, adapter):
        residual = hidden_states
        ffn_input = layer.final_layer_norm(hidden_states) if layer.do_layer_norm_before else hidden_states
        out = layer.fc2(layer.activation_fn(layer.fc1(ffn_input)))
        if adapter is not None:
            out = out + adapter(ffn_input)
        out = residual + functional.dropout(out, p=layer.dropout, training=layer.training)
        return out if layer.do_layer_norm_before else layer.final_layer_norm(out)

    def output_projection(self, layer):
        return layer.self_attn, "out_proj"
