"""Bad configurations and unsupported models fail early with a message that names the fix."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import build
from meft_ds import MEFTConfig, make_reversible, set_backward


@pytest.mark.parametrize("kwargs,message", [
    (dict(variant="meft4"), "variant='meft4' is unknown"),
    (dict(lam=0.0), "lam=0.0 must be in (0, 1]"),
    (dict(beta=0), "beta=0.0 must be in (0, 1]"),
    (dict(lam=-0.1), "lam=-0.1"),
    (dict(adapter_dim=0), "adapter_dim=0 must be a positive integer"),
    (dict(num_frozen_layers=-1), "num_frozen_layers=-1"),
    (dict(num_reversible_layers=-2), "num_reversible_layers=-2"),
    (dict(adapter_init="xavier"), "adapter_init='xavier' is unknown"),
    (dict(adapter_dropout=1.0), "adapter_dropout=1.0"),
    (dict(stream_dtype="float16"), "stream_dtype='float16' is unknown"),
    (dict(backward="checkpoint"), "backward='checkpoint' is unknown"),
    (dict(batch_chunks=0), "batch_chunks=0 must be an integer >= 1"),
    (dict(batch_chunks=2.0), "batch_chunks=2.0 must be an integer >= 1"),
    (dict(batch_chunks=True), "batch_chunks=True must be an integer >= 1"),
    (dict(ffn_chunks=0), "ffn_chunks=0 must be an integer >= 1"),
    (dict(ffn_chunks=True), "ffn_chunks=True must be an integer >= 1"),
    (dict(attention_chunks=0), "attention_chunks=0 must be an integer >= 1"),
])
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(ValueError) as error:
        MEFTConfig(**kwargs)
    assert message in str(error.value)


def test_variant_defaults_and_json_round_trip():
    assert (MEFTConfig("meft1").lam, MEFTConfig("meft1").beta) == (0.1, 1.0)
    assert (MEFTConfig("meft2").lam, MEFTConfig("meft2").beta) == (1.0, 0.1)
    assert (MEFTConfig("meft3").lam, MEFTConfig("meft3").beta) == (0.1, 0.1)
    cfg = MEFTConfig(variant="meft3", adapter_dim=16, lam=0.05, num_frozen_layers=2)
    assert MEFTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="Unknown MEFTConfig field"):
        MEFTConfig.from_dict({"variant": "meft1", "adaptor_dim": 8})


def test_too_many_frozen_or_reversible_layers():
    with pytest.raises(ValueError, match=r"num_frozen_layers=3 leaves no MEFT layer in the encoder \(3 layers\)"):
        make_reversible(build("bert", tf.BertForSequenceClassification), MEFTConfig(num_frozen_layers=3))
    with pytest.raises(ValueError, match="num_reversible_layers=3 exceeds the 2 MEFT layers"):
        make_reversible(build("opt", tf.OPTForCausalLM),
                        MEFTConfig(num_frozen_layers=1, num_reversible_layers=3))


@pytest.mark.parametrize("model_type,head,frozen", [("opt", tf.OPTForCausalLM, 2), ("llama", tf.LlamaForCausalLM, 2),
                                                    ("bert", tf.BertForSequenceClassification, 0)])
def test_python_api_uses_the_family_default_frozen_layers(model_type, head, frozen):
    """num_frozen_layers=None (the default): a third of a decoder's layers frozen, none of an encoder's; the
    model records the number it used."""
    model = make_reversible(build(model_type, head, num_layers=6), MEFTConfig())
    assert model.meft_config.num_frozen_layers == frozen
    (stack,) = [m for m in model.modules() if hasattr(m, "meft_layers")]
    assert len(stack.meft_layers) == 6 - frozen


def test_model_left_untouched_when_conversion_is_refused():
    model = build("bert", tf.BertForSequenceClassification)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError):
        make_reversible(model, MEFTConfig(num_frozen_layers=5))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_model_lists_supported_types():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError) as error:
        make_reversible(model, MEFTConfig())
    assert "model_type='gpt2'" in str(error.value)
    for supported in ("bart", "bert", "llama", "opt", "roberta"):
        assert supported in str(error.value)


def test_converting_twice_and_wrong_arguments():
    model = make_reversible(build("bert", tf.BertForSequenceClassification), MEFTConfig())
    with pytest.raises(ValueError, match="already reversible"):
        make_reversible(model, MEFTConfig())
    with pytest.raises(ValueError, match="backward mode 'fast' is unknown"):
        set_backward(model, "fast")
    with pytest.raises(TypeError, match="needs a MEFTConfig"):
        make_reversible(build("bert", tf.BertForSequenceClassification), {"variant": "meft1"})
    with pytest.raises(ValueError, match="no MEFT stack"):
        set_backward(build("bert", tf.BertForSequenceClassification), "vanilla")


def test_bert_decoder_refused():
    model = build("bert", tf.BertForSequenceClassification, is_decoder=True)
    with pytest.raises(ValueError, match="encoders only"):
        make_reversible(model, MEFTConfig())
