"""Activation memory is flat in depth in reversible mode and grows in vanilla mode."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import build, make_batch
from meft_ds import MEFTConfig, make_reversible, set_backward
from meft_ds.memory import SavedTensorCounter


def saved_bytes(model, batch, mode):
    set_backward(model, mode)
    model.train()
    with SavedTensorCounter(model) as counter:
        loss = model(**batch).loss
    loss.backward()
    return counter.bytes


def test_counter_sees_what_autograd_saves_and_skips_parameters():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter(linear) as counter:
        linear(x).sum()
    assert counter.bytes == x.numel() * 4  # the input only; the weight is a parameter


def test_live_tracking_counts_a_storage_once_and_sees_its_release():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter(linear, track_live=True) as counter:
        y = linear(x)
        z = (y * y).sum()  # y saved twice (both operands): one storage
        counter.mark_forward_done()
    assert counter.saved_bytes == 2 * 4 * 8 * 4  # x (for the weight grad) and y; the weight is a parameter
    z.backward()
    del y, z
    assert counter.live_bytes == 0 and counter.peak_bytes == counter.saved_bytes


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("model_type,head", [("bert", tf.BertForSequenceClassification),
                                             ("opt", tf.OPTForCausalLM), ("llama", tf.LlamaForCausalLM),
                                             ("bart", tf.BartForConditionalGeneration)])
def test_reversible_memory_flat_in_depth(model_type, head, variant):
    results = {}
    for depth in (4, 16):
        model = build(model_type, head, num_layers=depth, dtype=torch.float32)
        # Float streams: nothing grows with depth. The exact arithmetic adds its remainders (tested below).
        make_reversible(model, MEFTConfig(variant=variant, stream_arithmetic="float", num_frozen_layers=0))
        batch = make_batch(model, batch_size=4, seq_len=32)
        results[depth] = {mode: saved_bytes(model, batch, mode) for mode in ("reversible", "vanilla")}
    rev_ratio = results[16]["reversible"] / results[4]["reversible"]
    vanilla_ratio = results[16]["vanilla"] / results[4]["vanilla"]
    assert rev_ratio <= 1.2, f"reversible saved bytes grew {rev_ratio:.2f}x from 4 to 16 layers: {results}"
    assert vanilla_ratio > 2.0, f"vanilla should grow with depth: {results}"
    assert results[16]["reversible"] < results[16]["vanilla"] / 3


def test_cached_layers_on_top_cost_memory_again():
    """num_reversible_layers splits the stack: only the cached part grows."""
    sizes = {}
    for num_reversible in (8, 4, 0):
        model = build("bert", tf.BertForSequenceClassification, num_layers=8, dtype=torch.float32)
        make_reversible(model, MEFTConfig(num_reversible_layers=num_reversible, stream_arithmetic="float"))
        sizes[num_reversible] = saved_bytes(model, make_batch(model, 4, 32), "reversible")
    assert sizes[8] < sizes[4] < sizes[0]


@pytest.mark.parametrize("variant,buffers_per_layer", [("meft1", 1), ("meft2", 1), ("meft3", 2)])
def test_exact_arithmetic_costs_log2_m_bits_per_element_per_divided_stream(variant, buffers_per_layer):
    """The exact arithmetic keeps x mod m for every factor 1/m != 1, bit-packed (4 bits for m = 10), plus a
    32-byte checksum per layer: saved bytes grow by exactly that with depth, nothing else."""
    batch_size, seq_len, hidden = 4, 32, 16
    sizes = {}
    for depth in (4, 16):
        model = build("bert", tf.BertForSequenceClassification, num_layers=depth, dtype=torch.float32)
        make_reversible(model, MEFTConfig(variant=variant, stream_arithmetic="exact"))
        sizes[depth] = saved_bytes(model, make_batch(model, batch_size, seq_len), "reversible")
    elements = batch_size * seq_len * hidden
    per_layer = buffers_per_layer * elements * 4 // 8 + 2 * 2 * 8
    assert sizes[16] - sizes[4] == 12 * per_layer, sizes


@pytest.mark.parametrize("model_type,head", [("bert", tf.BertForSequenceClassification),
                                             ("opt", tf.OPTForSequenceClassification)])
def test_breakdown_puts_saved_bytes_where_the_registry_says(model_type, head):
    """Without MEFT the layers hold most saved bytes; reversible MEFT holds none in its layers, only in
    the stack (top streams, layer inputs) and around it. Every byte lands in one part."""
    shares = {}
    for convert in (False, True):
        model = build(model_type, head, num_layers=3, dtype=torch.float32).train()
        if convert:
            make_reversible(model, MEFTConfig(stream_arithmetic="float", num_frozen_layers=0))
        with SavedTensorCounter(model, track_live=True, by_module=True) as counter:
            loss = model(**make_batch(model, 2, 16)).loss
            counter.mark_forward_done()
        del loss
        assert sum(counter.breakdown.values()) == counter.saved_bytes > 0
        shares[convert] = counter.breakdown
    assert shares[False]["transformer layers"] > sum(shares[False].values()) / 2, shares
    assert shares[True].get("transformer layers", 0) == 0 and shares[True]["reversible stack (streams, layer inputs)"] > 0
    assert shares[False].get("head", 0) > 0 and shares[True].get("head", 0) > 0
