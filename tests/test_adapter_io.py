"""save_pretrained / load_adapter_model / AutoModel*.from_pretrained on a converted model, the one record
(ModelRecipe) both the Python API and the launcher write, and gradient checkpointing of cached MEFT layers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification)

import meft_ds
from meft_ds import MEFTConfig, ModelRecipe, load_adapter_model, make_reversible, set_checkpointing
from meft_ds.adapter_io import base_fingerprint, build_model, read_recipe
from meft_ds.memory import SavedTensorCounter
from train_helpers import save_tiny_bert, save_tiny_opt

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "config.json"]


def _perturb_trainable(model):
    """Stands in for training: every trainable weight moves away from its initial value."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "base", dropout=0.0)


@pytest.fixture(scope="module")
def saved(bert_dir, tmp_path_factory):
    """A converted tiny BERT classifier with moved adapters, saved with save_pretrained; and its logits."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_dir), num_labels=3)
    make_reversible(model, MEFTConfig(variant="meft3", adapter_dim=4, num_reversible_layers=1))
    _perturb_trainable(model)
    out = tmp_path_factory.mktemp("saved") / "adapter"
    model.save_pretrained(str(out))
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return out, ids, logits, model


def test_save_pretrained_writes_only_trainable_weights_and_the_record(saved, bert_dir):
    out, _, _, model = saved
    assert sorted(p.name for p in out.iterdir()) == ADAPTER_FILES
    from safetensors.torch import load_file

    state = load_file(str(out / "adapter_model.safetensors"))
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".mix" in n for n in state) and any("classifier" in n for n in state)
    record = json.loads((out / "adapter_config.json").read_text())
    assert record["base_model_name_or_path"] == str(bert_dir) and record["method"] == "meft"
    assert record["auto_class"] == "AutoModelForSequenceClassification"
    assert record["base_model_config"] == {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2}
    assert MEFTConfig.from_dict(record["meft_config"]) == model.meft_config


@pytest.mark.parametrize("load", ["load_adapter_model", "AutoModelForSequenceClassification"])
def test_reloads_to_identical_logits(saved, bert_dir, load):
    out, ids, logits, _ = saved
    loader = load_adapter_model if load == "load_adapter_model" else AutoModelForSequenceClassification.from_pretrained
    loaded = loader(str(out))
    fresh = AutoModelForSequenceClassification.from_pretrained(str(bert_dir), num_labels=3).eval()
    with torch.no_grad():
        got, untrained = loaded(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert type(loaded) is BertForSequenceClassification and loaded.meft_config is not None
    assert torch.equal(got, logits) and not torch.allclose(untrained, logits, atol=1e-3)


@pytest.mark.parametrize("call, message", [
    (lambda d: AutoModel.from_pretrained(d), "load it with AutoModelForSequenceClassification.from_pretrained"),
    (lambda d: AutoModelForCausalLM.from_pretrained(d), "load it with AutoModelForSequenceClassification"),
    (lambda d: AutoModelForSequenceClassification.from_pretrained(d, num_labels=5), "use meft_ds.load_adapter_model"),
])
def test_other_auto_loads_fail_in_one_line_naming_the_call(saved, call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(str(saved[0]))
    assert "\n" not in str(error.value)


def test_without_meft_ds_imported_transformers_refuses_the_directory(saved):
    """config.json's model_type is meft_ds: a plain transformers process cannot load the bare base model
    from this directory and call it the trained one."""
    code = ("import sys; from transformers import AutoModelForSequenceClassification as A; "
            "A.from_pretrained(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", code, str(saved[0])], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "model type `meft_ds`" in result.stderr


def test_wrong_base_is_a_one_line_error(saved, tmp_path):
    out = str(saved[0])
    wider = tmp_path / "wider"
    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(wider)
    with pytest.raises(ValueError, match="hidden_size=32 but the base has 48") as error:
        load_adapter_model(out, str(wider))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="model_type='bert' but the base has 'opt'"):
        load_adapter_model(out, str(save_tiny_opt(tmp_path / "opt")))


def test_launcher_recipe_and_save_pretrained_write_the_same_record(bert_dir, tmp_path):
    """One schema: a model built from a launcher-style recipe, saved with save_pretrained, records that recipe."""
    from transformers import AutoConfig

    # The launcher's recipe records the number of frozen layers (make_recipe resolves the family default).
    meft_config = MEFTConfig(variant="meft2", num_frozen_layers=0).to_dict()
    recipe = ModelRecipe("meft", str(bert_dir), "classification", 2, meft_config=meft_config,
                         pad_token_id=0, base_model_config=base_fingerprint(AutoConfig.from_pretrained(bert_dir)))
    model = build_model(recipe)
    model.save_pretrained(str(tmp_path / "a"))
    assert read_recipe(str(tmp_path / "a")) == recipe


def test_causal_lm_round_trip(tmp_path):
    base = save_tiny_opt(tmp_path / "opt")
    model = make_reversible(AutoModelForCausalLM.from_pretrained(str(base)), MEFTConfig(num_frozen_layers=1))
    _perturb_trainable(model).save_pretrained(str(tmp_path / "out"))
    assert read_recipe(str(tmp_path / "out")).task_kind == "causal_lm"
    ids = torch.randint(1000, 2000, (2, 7))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_pretrained_needs_a_known_base():
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    make_reversible(model, MEFTConfig())
    with pytest.raises(ValueError, match="base_model_name_or_path=..."):
        model.save_pretrained("unused")


def test_unknown_record_field_is_refused(saved, tmp_path):
    record = json.loads((saved[0] / "adapter_config.json").read_text()) | {"peft_type": "LORA"}
    with pytest.raises(ValueError, match="peft_type"):
        ModelRecipe.from_dict(record)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter_model(str(tmp_path))


def _grads_and_saved_bytes(model, ids, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with SavedTensorCounter(model) as counter:
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, counter.bytes


def test_gradient_checkpointing_covers_the_cached_layers(bert_dir):
    """Trainer's gradient_checkpointing=True lands here: same gradients, fewer saved bytes, no input hook."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_dir), num_labels=2)
    make_reversible(model, MEFTConfig(variant="meft3", adapter_dim=4, num_reversible_layers=1))
    ids, labels = torch.randint(1000, 2000, (4, 16)), torch.tensor([0, 1, 1, 0])
    plain, plain_bytes = _grads_and_saved_bytes(model, ids, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_bytes = _grads_and_saved_bytes(model, ids, labels)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
    assert all(g.abs().sum() > 0 for n, g in checkpointed.items() if "adapter" in n)
    assert checkpointed_bytes < plain_bytes
    assert not model.get_input_embeddings()._forward_hooks  # HF's enable_input_require_grads hook
    model.gradient_checkpointing_disable()
    assert _grads_and_saved_bytes(model, ids, labels)[1] == plain_bytes
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_gradient_checkpointing_is_refused_when_every_layer_is_reversible(bert_dir):
    model = make_reversible(AutoModelForSequenceClassification.from_pretrained(str(bert_dir)), MEFTConfig())
    with pytest.raises(ValueError, match="every MEFT layer is reversible") as error:
        model.activation_checkpointing_enable()
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="every MEFT layer is reversible"):
        set_checkpointing(model, True)
    assert meft_ds.set_checkpointing(model, False) is model


def test_copies_save_their_own_weights(saved, tmp_path):
    """save_pretrained is bound per model: a deepcopy or an unpickled copy saves itself, not the original."""
    import copy
    import io

    original = saved[3]
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    for i, clone in enumerate([copy.deepcopy(original), torch.load(buffer, weights_only=False)]):
        with torch.no_grad():
            clone.classifier.weight.add_(1.0)
        clone.save_pretrained(str(tmp_path / str(i)))
        assert torch.equal(load_adapter_model(str(tmp_path / str(i))).classifier.weight, clone.classifier.weight)
