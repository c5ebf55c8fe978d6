"""BERT and RoBERTa encoders (post-LN): attention -> Add&Norm -> FFN -> Add&Norm."""

from __future__ import annotations

from .base import Family, StackSite, without


class BertFamily(Family):
    model_types = ("bert", "roberta")
    lora_targets = ("query", "value")

    def check_config(self, config) -> None:
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("meft_ds supports BERT/RoBERTa as encoders only (config.is_decoder must be False).")

    def sites(self, model):
        return [StackSite(model.base_model.encoder, "layer", "encoder")]

    def attention(self, layer, hidden_states, inputs):
        rest = without(inputs, "attention_mask", "encoder_hidden_states", "encoder_attention_mask")
        out, _ = layer.attention(hidden_states, inputs.get("attention_mask"), **rest)
        return out

    def ffn(self, layer, hidden_states, adapter):
        out = layer.output.dense(layer.intermediate(hidden_states))
        if adapter is not None:
            out = out + adapter(hidden_states)
        return layer.output.LayerNorm(layer.output.dropout(out) + hidden_states)

    def output_projection(self, layer):
        return layer.attention.output, "dense"
