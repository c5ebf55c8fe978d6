"""Per-family facts: the recomposed blocks equal the original layer; what is trainable; eval runs plain."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import CASE_IDS, MODEL_CASES, build, make_batch
from helpers import graph_node_names
from meft_ds import MEFTConfig, make_reversible
from meft_ds.adapters import Adapter
from meft_ds.models import REGISTRY, family_for
from meft_ds.reversible import MEFTStack


def capture_layer_calls(model, batch):
    """Run the unconverted model once; per stack return [layer, hidden_states, args, kwargs, rng state, output]."""
    family = family_for(model)
    calls = []
    handles = []
    for site in family.sites(model):
        layer = getattr(site.parent, site.attribute)[0]

        def pre(module, args, kwargs):
            calls.append([module, args[0].detach(), args[1:], dict(kwargs), torch.get_rng_state()])

        def post(module, args, kwargs, output):
            calls[-1].append(output.detach())

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        torch.manual_seed(7)
        model.config.use_cache = False  # a cache changes the attention's rounding (keys come from the cache)
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    return family, calls


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("model_type,head", MODEL_CASES, ids=CASE_IDS)
def test_attention_then_ffn_equals_original_layer(model_type, head, training):
    model = build(model_type, head)
    model.train(training)
    family, calls = capture_layer_calls(model, make_batch(model))
    assert calls, "no layer call captured"
    for layer, hidden, args, kwargs, rng_state, expected in calls:
        inputs = family.input_binder(layer)(args, kwargs, True)  # no cache: the original call filled it
        torch.set_rng_state(rng_state)  # same dropout masks as the original call
        got = family.ffn(layer, family.attention(layer, hidden, inputs), None)
        assert torch.equal(got, expected), f"{type(layer).__name__}: recomposed layer differs from the original"


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("model_type,head", MODEL_CASES, ids=CASE_IDS)
def test_only_adapters_mix_and_head_train(model_type, head, variant):
    model = build(model_type, head)
    original = {n for n, _ in model.named_parameters()}
    make_reversible(model, MEFTConfig(variant=variant, num_frozen_layers=0))
    heads = ("classifier.", "score.", "qa_outputs.", "classification_head.")
    for name, param in model.named_parameters():
        is_adapter = ".adapter." in name or "meft_ffn_adapter." in name
        expected = is_adapter or name.endswith(".mix") or name.startswith(heads)
        assert param.requires_grad == expected, f"{name}: requires_grad={param.requires_grad}"
    # every original weight still exists (frozen) under the converted model
    converted = {n for n, _ in model.named_parameters()}
    assert len(converted) > len(original)
    stacks = [m for m in model.modules() if isinstance(m, MEFTStack)]
    assert len(stacks) == (2 if model_type == "bart" else 1)
    # every variant has two adapters per layer (FFN + stand-alone for MEFT1/2, FFN + serial for MEFT3)
    n_layers = sum(len(s.meft_layers) for s in stacks)
    assert sum(isinstance(m, Adapter) for m in model.modules()) == 2 * n_layers


def test_eval_mode_runs_plain_forward_and_matches_training_function():
    model = build("opt", tf.OPTForCausalLM)
    make_reversible(model, MEFTConfig(stream_dtype="float64", num_frozen_layers=0))
    batch = make_batch(model)
    model.eval()
    with torch.enable_grad():
        out = model(**batch).loss
    assert "ReversibleFunctionBackward" not in graph_node_names(out)
    model.train()
    model.config.dropout = 0.0
    for module in model.modules():
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    train_out = model(**batch).loss
    assert "ReversibleFunctionBackward" in graph_node_names(train_out)
    torch.testing.assert_close(train_out, out, rtol=1e-12, atol=0)


@pytest.mark.parametrize("model_type,head", [("opt", tf.OPTForCausalLM), ("llama", tf.LlamaForCausalLM),
                                             ("bart", tf.BartForConditionalGeneration)])
def test_generation_with_cache_after_conversion(model_type, head):
    """In eval mode the key/value cache passes through, so generation works and matches no-cache decoding."""
    model = build(model_type, head, dtype=torch.float32)
    make_reversible(model, MEFTConfig(variant="meft3", num_frozen_layers=0))
    model.eval()
    ids = make_batch(model, batch_size=1)["input_ids"][:, :5]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without_cache = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)


def test_registry_lists_the_promised_families():
    assert {"bert", "roberta", "bart", "opt", "llama"} <= set(REGISTRY)


def test_same_seed_same_run_and_global_rng_not_clobbered():
    model = build("bert", tf.BertForSequenceClassification)
    make_reversible(model, MEFTConfig(stream_dtype="float64"))
    batch = make_batch(model)
    model.train()
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        losses.append(model(**batch).loss.item())
    assert losses[0] == losses[1], "same seed must give the same dropout masks"
    assert losses[0] != losses[2], "a different seed must give different dropout masks"
    # The stack draws exactly one number from the global generator per forward and restores the
    # generator after every seeded sub-block: not re-seeded from OS entropy, not reset to a fixed seed.
    stack = next(m for m in model.modules() if isinstance(m, MEFTStack))
    seen = {}
    handle = stack.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    model(**batch)
    handle.remove()
    torch.manual_seed(5)
    stack(*seen["args"], **seen["kwargs"])
    after_forward = torch.rand(3)
    torch.manual_seed(5)
    torch.randint(0, 2**62, ())
    assert torch.equal(after_forward, torch.rand(3))
