"""Reversible backward == ordinary backprop through the same MEFT architecture (float64, dropout, padding)."""

from __future__ import annotations

import pytest
import torch

from conftest import CASE_IDS, MODEL_CASES, build, make_batch
from helpers import embedding_grad_step, graph_node_names, rel_err
from meft_ds import MEFTConfig, make_reversible, set_backward
from meft_ds.reversible import MEFTLayer, MEFTStack

VARIANTS = ("meft1", "meft2", "meft3")
TOL = 1e-8


def assert_same_gradients(model, batch, expect_embedding_grad=True):
    # The stream mix starts at 0, which leaves MEFT1's top G adapter without gradient at init; a
    # non-zero mix makes every trainable path carry gradient, so no comparison below is vacuous.
    for stack in model.modules():
        if isinstance(stack, MEFTStack):
            stack.mix.data.fill_(0.3)
    loss_v, vanilla = embedding_grad_step(model, batch, "vanilla")
    loss_r, reversible = embedding_grad_step(model, batch, "reversible")
    assert torch.equal(loss_v, loss_r), "both modes must compute the same forward"
    assert vanilla.keys() == reversible.keys()
    checked = 0
    for name, ref in vanilla.items():
        if name.startswith("input_embeddings") and not expect_embedding_grad:
            assert ref is None and reversible[name] is None
            continue
        assert ref is not None and reversible[name] is not None, f"{name} got no gradient"
        assert ref.abs().sum() > 0, f"{name} has an all-zero gradient: the comparison would be vacuous"
        err = rel_err(reversible[name], ref)
        assert err < TOL, f"{name}: relative error {err:.3e} >= {TOL}"
        checked += 1
    return checked


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_type,head", MODEL_CASES, ids=CASE_IDS)
def test_reversible_equals_vanilla(model_type, head, variant):
    model = build(model_type, head)
    # num_frozen_layers=0: every layer converted (the OPT/LLaMA default freezes a third)
    make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", adapter_dropout=0.1,
                                      num_frozen_layers=0))
    checked = assert_same_gradients(model, make_batch(model))
    assert checked >= 3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_type,head", [MODEL_CASES[0], MODEL_CASES[5], MODEL_CASES[6], MODEL_CASES[8]],
                         ids=[CASE_IDS[0], CASE_IDS[5], CASE_IDS[6], CASE_IDS[8]])
def test_frozen_layers_and_mixed_stack(model_type, head, variant):
    """1 frozen layer, 2 reversible MEFT layers, 1 cached MEFT layer on top."""
    model = build(model_type, head, num_layers=4)
    make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", num_frozen_layers=1,
                                      num_reversible_layers=2, adapter_dropout=0.1))
    # Below a frozen layer nothing needs gradient: the input embeddings get none (in both modes).
    assert_same_gradients(model, make_batch(model), expect_embedding_grad=False)


def test_reversible_mode_uses_the_function_and_vanilla_does_not():
    """Guards against a 'reversible' mode that silently runs the cached path."""
    model = build("bert", MODEL_CASES[0][1], num_layers=4)
    make_reversible(model, MEFTConfig(stream_dtype="float64"))
    batch = make_batch(model)
    model.train()
    assert "ReversibleFunctionBackward" in graph_node_names(model(**batch).loss)
    set_backward(model, "vanilla")
    assert "ReversibleFunctionBackward" not in graph_node_names(model(**batch).loss)



@pytest.mark.parametrize("variant", ["meft1", "meft2"])
@pytest.mark.parametrize("model_type,head", [MODEL_CASES[0], MODEL_CASES[6]], ids=[CASE_IDS[0], CASE_IDS[6]])
def test_whole_layer_recomputed_in_one_stage_too(model_type, head, variant):
    """split_layer_recompute=False (attention and FFN recomputed together) gives the same gradients."""
    model = build(model_type, head)
    make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", adapter_dropout=0.1,
                                      split_layer_recompute=False, num_frozen_layers=0))
    assert assert_same_gradients(model, make_batch(model)) >= 3


def test_check_gradients_passes_a_correct_backward_and_catches_a_wrong_one(monkeypatch):
    """The public check (meft_ds.check_gradients): tiny float64 BERT, every tensor within 1e-10; then a
    backward that scales one layer's rebuilt-input gradient by 1.001 is caught and the model's mode restored."""
    from meft_ds import check_gradients
    from meft_ds.reversible import MEFTLayer, MEFTStack

    model = build("bert", MODEL_CASES[0][1], num_layers=4)
    make_reversible(model, MEFTConfig(stream_dtype="float64", stream_arithmetic="float"))
    for stack in model.modules():
        if isinstance(stack, MEFTStack):
            stack.mix.data.fill_(0.3)
    batch = make_batch(model)
    good = check_gradients(model, batch)
    assert good.max_error < 1e-10 and len(good.errors) > 10 and good.loss_reversible == good.loss_vanilla, str(good)
    step = MEFTLayer.backward_step

    def wrong_step(self, *args):
        x1, x2, dx1, dx2 = step(self, *args)
        return x1, x2, dx1 * 1.001, dx2

    monkeypatch.setattr(MEFTLayer, "backward_step", wrong_step)
    bad = check_gradients(model, batch)
    assert bad.max_error > 1e-4, str(bad)
    assert all(s.backward == "reversible" for s in model.modules() if isinstance(s, MEFTStack))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="converted by make_reversible"):
        check_gradients(build("bert", MODEL_CASES[0][1], num_layers=2), batch)


NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "bart": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
              "opt": dict(dropout=0.0, attention_dropout=0.0), "llama": dict(attention_dropout=0.0)}


@pytest.mark.parametrize("model_type,head", [MODEL_CASES[0], MODEL_CASES[5], MODEL_CASES[6], MODEL_CASES[8]],
                         ids=[CASE_IDS[0], CASE_IDS[5], CASE_IDS[6], CASE_IDS[8]])
def test_batch_chunks_compute_the_same_function(model_type, head):
    """Without dropout (whose masks each slice draws from its own seed) the model is the same function whatever
    the slicing of the batch: loss and every gradient of batch_chunks=2 (uneven slices of 3 sequences, padded,
    BART's decoder reading encoder states through cross-attention) equal the unsliced ones in float64."""
    results = {}
    for chunks in (1, 2):
        model = build(model_type, head, **NO_DROPOUT[model_type])
        torch.manual_seed(1)
        make_reversible(model, MEFTConfig(variant="meft1", stream_dtype="float64", num_frozen_layers=0,
                                          batch_chunks=chunks))
        for stack in model.modules():
            if isinstance(stack, MEFTStack):
                stack.mix.data.fill_(0.3)
        results[chunks] = embedding_grad_step(model, make_batch(model), "reversible")
    (loss_1, grads_1), (loss_2, grads_2) = results[1], results[2]
    assert rel_err(loss_2, loss_1) < 1e-12
    assert grads_1.keys() == grads_2.keys() and len(grads_1) >= 3
    for name, ref in grads_1.items():
        assert ref is not None and ref.abs().sum() > 0, name
        assert rel_err(grads_2[name], ref) < 1e-10, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_equals_vanilla_with_uneven_batch_chunks(variant):
    """Dropout on, 2 slices of 1 and 2 sequences: the reversible backward redraws each slice's masks."""
    model = build("opt", MODEL_CASES[6][1])
    make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", adapter_dropout=0.1,
                                      num_frozen_layers=0, batch_chunks=2))
    assert assert_same_gradients(model, make_batch(model)) >= 3


@pytest.mark.parametrize("model_type,head", [MODEL_CASES[0], MODEL_CASES[5], MODEL_CASES[6], MODEL_CASES[8]],
                         ids=[CASE_IDS[0], CASE_IDS[5], CASE_IDS[6], CASE_IDS[8]])
def test_ffn_and_attention_chunks_compute_the_same_function(model_type, head):
    """Without dropout the FFN in 4 token slices (uneven, 6 and 7 tokens: the padded batch's tokens laid end to
    end; MEFT3's G is the FFN alone, MEFT1's F a whole layer, in one and in two stages), and the attention of a
    whole layer (MEFT1's F, MEFT2's G) in 2 slices of the sequences (1 and 2 of 3; BART's decoder with its
    cross-attention), are the same function: loss and every gradient equal the unsliced ones in float64."""
    cases = (("meft1", True, 4, 1), ("meft1", False, 4, 1), ("meft3", True, 4, 1),
             ("meft1", True, 1, 2), ("meft1", False, 1, 2), ("meft2", True, 4, 2))
    for variant, split, ffn_chunks, attention_chunks in cases:
        results = []
        for chunks in ((1, 1), (ffn_chunks, attention_chunks)):
            model = build(model_type, head, **NO_DROPOUT[model_type])
            torch.manual_seed(1)
            make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", num_frozen_layers=0,
                                              split_layer_recompute=split, ffn_chunks=chunks[0],
                                              attention_chunks=chunks[1]))
            for stack in model.modules():
                if isinstance(stack, MEFTStack):
                    stack.mix.data.fill_(0.3)
            results.append(embedding_grad_step(model, make_batch(model), "reversible"))
        (loss_1, grads_1), (loss_n, grads_n) = results
        case = (variant, split, ffn_chunks, attention_chunks)
        assert rel_err(loss_n, loss_1) < 1e-12, case
        assert grads_1.keys() == grads_n.keys() and len(grads_1) >= 3
        for name, ref in grads_1.items():
            assert ref is not None and ref.abs().sum() > 0, name
            assert rel_err(grads_n[name], ref) < 1e-10, (case, name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", [True, False])
def test_reversible_equals_vanilla_with_ffn_chunks(variant, split):
    """Dropout on, the FFN in 3 token slices (with 2 batch slices too): the reversible backward redraws every
    token slice's masks in the forward's order."""
    model = build("opt", MODEL_CASES[6][1])
    make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", adapter_dropout=0.1,
                                      num_frozen_layers=0, split_layer_recompute=split, ffn_chunks=3,
                                      batch_chunks=2 if split else 1))
    assert assert_same_gradients(model, make_batch(model)) >= 3


def set_on_meft_layers(model, **settings):
    for layer in model.modules():
        if isinstance(layer, MEFTLayer):
            for name, value in settings.items():
                setattr(layer, name, value)


@pytest.mark.parametrize("variant", ("meft1", "meft2"))
@pytest.mark.parametrize("model_type,head", [MODEL_CASES[5], MODEL_CASES[6]], ids=[CASE_IDS[5], CASE_IDS[6]])
@pytest.mark.parametrize("split", [True, False])
def test_reversible_equals_vanilla_with_attention_chunks(model_type, head, variant, split):
    """Dropout on, the attention of a whole layer in 2 slices of the sequences (1 and 2 of 3) and the FFN in 3
    token slices: the reversible backward redraws every slice's masks in the forward's order (BART: the
    decoder's cross-attention sliced with the encoder states it reads, which get their gradient through it)."""
    model = build(model_type, head)
    make_reversible(model, MEFTConfig(variant=variant, stream_dtype="float64", adapter_dropout=0.1,
                                      num_frozen_layers=0, split_layer_recompute=split, ffn_chunks=3,
                                      attention_chunks=2))
    assert assert_same_gradients(model, make_batch(model)) >= 3


def test_attention_chunks_run_the_attention_slice_by_slice():
    """The slicing is real: every call of a whole layer's attention (forward, recompute, its backward's recompute)
    sees 1 or 2 of the 3 sequences, in training and in evaluation without a key/value cache (training's forward
    order, as ZeRO-3 records it; the trainer's evaluation passes use_cache=False), with the outputs of the
    attention whole; with a cache (generation) the attention sees the whole batch."""
    model = build("opt", MODEL_CASES[6][1], **NO_DROPOUT["opt"])
    make_reversible(model, MEFTConfig(variant="meft1", stream_dtype="float64", num_frozen_layers=0,
                                      attention_chunks=2))
    batch = make_batch(model)
    seen = []
    q_proj = [m.q_proj for m in model.modules() if hasattr(m, "q_proj")]
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0])) for m in q_proj]
    model.train()
    model(**batch).loss.backward()
    # forward, then in backward the attention without grad (before the FFN) and with grad (its own backward)
    assert sorted(seen) == sorted([1, 2] * 3 * len(q_proj))
    seen.clear()
    model.eval()
    with torch.no_grad():
        sliced = model(**batch, use_cache=False).logits
        assert sorted(seen) == sorted([1, 2] * len(q_proj))
        seen.clear()
        cached = model(**batch, use_cache=True).logits
        assert seen == [3] * len(q_proj)
    for h in hooks:
        h.remove()
    set_on_meft_layers(model, attention_chunks=1)  # the attention whole: the same outputs in float64
    with torch.no_grad():
        whole = model(**batch, use_cache=False).logits
    assert rel_err(sliced, whole) < 1e-12 and rel_err(cached, whole) < 1e-12


def test_ffn_chunks_run_the_ffn_slice_by_slice():
    """The slicing is real: in training every FFN call (forward and reversible backward) sees a quarter of the
    tokens (6 or 7 of 27 with 4 slices); in evaluation too (once per slice: training's forward order, which
    ZeRO-3 records as its prefetch order), with the outputs of the FFN whole."""
    model = build("opt", MODEL_CASES[6][1], **NO_DROPOUT["opt"])
    make_reversible(model, MEFTConfig(variant="meft1", stream_dtype="float64", num_frozen_layers=0, ffn_chunks=4))
    batch = make_batch(model)
    tokens = batch["input_ids"].numel()
    seen = []
    fc1 = [m.fc1 for m in model.modules() if hasattr(m, "fc1")]
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1].numel())) for m in fc1]
    model.train()
    model(**batch).loss.backward()
    assert seen and set(seen) == {tokens // 4, tokens // 4 + 1} and sum(seen) == 2 * tokens * len(fc1)
    seen.clear()
    model.eval()
    with torch.no_grad():
        sliced = model(**batch).logits
    assert set(seen) == {tokens // 4, tokens // 4 + 1} and sum(seen) == tokens * len(fc1) and len(seen) == 4 * len(fc1)
    for h in hooks:
        h.remove()
    set_on_meft_layers(model, ffn_chunks=1)  # the FFN whole: the same outputs in float64
    with torch.no_grad():
        assert rel_err(sliced, model(**batch).logits) < 1e-12


def test_batch_slices_and_what_each_slice_reads():
    from meft_ds.reversible import batch_slices, chunk_seed, slice_inputs

    assert batch_slices(3, 4) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert batch_slices(8, 3) == [slice(0, 2), slice(2, 5), slice(5, 8)]
    assert batch_slices(5, 1) == [slice(0, 5)]
    seeds = [chunk_seed(7, i) for i in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert chunk_seed(None, 3) is None
    mask, positions, cache_position = torch.zeros(4, 1, 5, 5), torch.zeros(1, 5, 2), torch.arange(4)
    encoder = torch.zeros(4, 6, 3)
    sliced = slice_inputs({"attention_mask": mask, "position_embeddings": (positions, encoder),
                           "cache_position": cache_position, "use_cache": False}, 4, slice(1, 3))
    assert sliced["attention_mask"].shape == (2, 1, 5, 5)
    assert sliced["position_embeddings"][0] is positions and sliced["position_embeddings"][1].shape == (2, 6, 3)
    assert sliced["cache_position"] is cache_position and sliced["use_cache"] is False
