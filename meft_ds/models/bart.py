"""BART encoder and decoder (post-LN); the decoder's attention block is self- then cross-attention."""

from __future__ import annotations

from torch.nn import functional

from .base import Family, StackSite, without


class BartFamily(Family):
    model_types = ("bart",)

    def sites(self, model):
        base = model.base_model
        return [StackSite(base.encoder, "layers", "encoder"), StackSite(base.decoder, "layers", "decoder")]

    def attention(self, layer, hidden_states, inputs):
        residual = hidden_states
        rest = without(inputs, "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "use_cache")
        out, _ = layer.self_attn(hidden_states, attention_mask=inputs.get("attention_mask"), **rest)
        out = functional.dropout(out, p=layer.dropout, training=layer.training)
        hidden_states = layer.self_attn_layer_norm(residual + out)
        encoder_states = inputs.get("encoder_hidden_states")
        if hasattr(layer, "encoder_attn") and encoder_states is not None:
            residual = hidden_states
            out, _ = layer.encoder_attn(
                hidden_states, key_value_states=encoder_states,
                attention_mask=inputs.get("encoder_attention_mask"), **rest,
            )
            out = functional.dropout(out, p=layer.dropout, training=layer.training)
            hidden_states = layer.encoder_attn_layer_norm(residual + out)
        return hidden_states

    def ffn(self, layer, hidden_states, adapter):
        out = layer.activation_fn(layer.fc1(hidden_states))
        out = functional.dropout(out, p=layer.activation_dropout, training=layer.training)
        out = layer.fc2(out)
        if adapter is not None:
            out = out + adapter(hidden_states)
        out = functional.dropout(out, p=layer.dropout, training=layer.training)
        return layer.final_layer_norm(hidden_states + out)

    def output_projection(self, layer):
        return layer.self_attn, "out_proj"
