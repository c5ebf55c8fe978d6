"""Non-finite and out-of-range values: never a finite wrong number, and the same in every backward mode."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from conftest import build, make_batch
from helpers import embedding_grad_step
from meft_ds import MEFTConfig, make_reversible
from meft_ds.coupling import ExactCoupling, representable_magnitude
from meft_ds.reversible import MEFTStack

BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "overflow": 1e30}


def llama_with_bad_f_output(variant: str, arithmetic: str, bad: float, layer: int = 1):
    """A 4-layer tiny LLaMA whose MEFT layer `layer` puts `bad` into one element of its F output."""
    model = build("llama", tf.LlamaForCausalLM, num_layers=4, dtype=torch.float32)
    make_reversible(model, MEFTConfig(variant=variant, stream_arithmetic=arithmetic, num_frozen_layers=0))
    target = next(m for m in model.modules() if isinstance(m, MEFTStack)).meft_layers[layer]
    original_f = target.f

    def bad_f(owner, hidden, inputs):
        out = original_f(owner, hidden, inputs).clone()
        out.view(-1)[5] = bad
        return out

    target.f = bad_f
    return model


def all_finite(loss, grads) -> bool:
    return bool(torch.isfinite(loss)) and all(g is None or bool(torch.isfinite(g).all()) for g in grads.values())


# Exact arithmetic: every variant x every bad value. Float: the reference behaviour (NaN, one variant).
CASES = [(v, "exact", b) for v in ("meft1", "meft2", "meft3") for b in BAD_VALUES] + [("meft1", "float", "nan")]


@pytest.mark.parametrize("variant,arithmetic,bad", CASES, ids=["-".join(c) for c in CASES])
def test_reversible_and_vanilla_agree_on_non_finite_values(variant, arithmetic, bad):
    """Every backward mode gives a non-finite loss and non-finite gradients: nothing is hidden."""
    model = llama_with_bad_f_output(variant, arithmetic, BAD_VALUES[bad])
    batch = make_batch(model)
    for mode in ("vanilla", "reversible"):
        loss, grads = embedding_grad_step(model, batch, mode)
        assert not torch.isfinite(loss), (mode, loss)
        trainable = {n: g for n, g in grads.items() if not n.startswith("input_embeddings")}
        assert not any(bool(torch.isfinite(g).all()) for g in trainable.values()), mode


def test_a_clean_model_stays_finite_in_both_modes():
    """Control for the test above: without the injected value nothing is poisoned."""
    model = build("llama", tf.LlamaForCausalLM, num_layers=4, dtype=torch.float32)
    make_reversible(model, MEFTConfig(variant="meft1", stream_arithmetic="exact", num_frozen_layers=0))
    for mode in ("vanilla", "reversible"):
        assert all_finite(*embedding_grad_step(model, make_batch(model), mode)), mode


def test_a_sum_beyond_the_range_is_nan_not_a_wrapped_value():
    """Factor 1 sums grow a stream; states hold |value| < 2 * 2^(61-frac_bits): within that the sum is right,
    beyond it the stream is NaN, never wrapped modulo 2^64 (2e4 + 2e4 once decoded to -25536 at 48 bits)."""
    frac_bits = 45
    coupling = ExactCoupling(torch.float32, frac_bits)
    limit = representable_magnitude(frac_bits)
    x = coupling.encode(torch.full((4,), 0.9 * limit))
    assert torch.isfinite(x.value).all()
    within, _ = coupling.combine(x, torch.full((4,), 0.9 * limit), 1.0)
    assert torch.equal(within.value, torch.full((4,), 1.8 * limit))
    beyond, _ = coupling.combine(within, torch.full((4,), 0.9 * limit), 1.0)
    assert torch.isnan(beyond.value).all()
    # and the poison stays with the stream, even through a layer whose block output is fine
    after, _ = coupling.combine(beyond, torch.zeros(4), 0.1)
    assert torch.isnan(after.value).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 2.0 ** 40])
def test_encode_poisons_non_finite_or_out_of_range_input(value):
    coupling = ExactCoupling(torch.float32, 32)
    hidden = torch.ones(2, 3)
    hidden[1, 2] = value
    assert torch.isnan(coupling.encode(hidden).value).all()


def test_frac_bits_must_leave_room_for_float16_values():
    assert representable_magnitude(45) > torch.finfo(torch.float16).max
    MEFTConfig(frac_bits=45)
    with pytest.raises(ValueError, match="frac_bits=48 must be an integer in \\[8, 45\\]"):
        MEFTConfig(frac_bits=48)


def test_a_forward_overflow_reaches_the_optimizer_step_as_a_non_finite_gradient():
    """bf16 F/G (as DeepSpeed's bf16 mode casts them) overflowing in one layer: the gradient norm the optimizer
    step (and DeepSpeed's overflow check) sees is not finite."""
    model = llama_with_bad_f_output("meft1", "exact", 1e30)
    model.to(torch.bfloat16)
    _, grads = embedding_grad_step(model, make_batch(model), "reversible")
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
    assert not math.isfinite(float(norm))


def test_the_step_guard_decides_from_the_reduced_values():
    from meft_ds.training.trainer import MAX_CONSECUTIVE_NONFINITE, NonFiniteError, NonFiniteGuard

    stop = NonFiniteGuard("stop", fp16=False, rank=0)
    assert stop.check(1, [0.5, 0.7], 1.2, applied=True)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss on rank 1 \(nan\), gradient norm inf"):
        stop.check(2, [0.5, float("nan")], float("inf"), applied=False)
    with pytest.raises(NonFiniteError, match="applied this step"):  # weights already updated with it
        NonFiniteGuard("skip", fp16=False, rank=0).check(3, [float("inf")], None, applied=True)
    fp16 = NonFiniteGuard("stop", fp16=True, rank=0)
    assert not fp16.check(4, [0.5], float("inf"), applied=False)  # the loss scaler's normal skip
    skip = NonFiniteGuard("skip", fp16=False, rank=0)
    for step in range(1, MAX_CONSECUTIVE_NONFINITE):
        assert not skip.check(step, [float("nan")], float("nan"), applied=False)
    assert skip.check(50, [0.5], 1.0, applied=True) and skip.consecutive == 0
    for step in range(1, MAX_CONSECUTIVE_NONFINITE):
        skip.check(step, [float("nan")], float("nan"), applied=False)
    with pytest.raises(NonFiniteError, match="in a row"):
        skip.check(99, [float("nan")], float("nan"), applied=False)


def test_non_finite_weights_are_never_exported(tmp_path):
    from meft_ds.training.checkpoint import NonFiniteAdapterError, export_adapter
    from meft_ds.training.distributed import DistEnv

    class Engine:
        module = torch.nn.Linear(2, 2)

    with torch.no_grad():
        Engine.module.bias[1] = float("nan")
    with pytest.raises(NonFiniteAdapterError, match=r"1 trained weight\(s\) hold NaN or Inf \(first: bias\)"):
        export_adapter(Engine(), None, str(tmp_path / "out"), DistEnv(rank=0, world_size=1, local_rank=0))
    assert not (tmp_path / "out").exists()


def _stack(model) -> MEFTStack:
    return next(m for m in model.modules() if isinstance(m, MEFTStack))


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("mode", ["reversible", "vanilla"])
def test_the_first_non_finite_layer_is_named(layer, mode):
    """Exact arithmetic: the per-layer flags (one stream element each, read only on the error path) name the
    layer whose F output went non-finite, in both backward modes, and the input when the embeddings did."""
    model = llama_with_bad_f_output("meft1", "exact", float("inf"), layer=layer)
    stack = _stack(model)
    model.get_input_embeddings().weight.requires_grad_(False)
    stack.backward = mode
    batch = make_batch(model)
    model.train()
    model(**batch)
    assert stack.first_nonfinite_layer() == (f"MEFT layer {layer} (its F or G output was not finite or beyond "
                                             "the fixed-point range)")
    stack.reset_nonfinite_record()
    assert stack.first_nonfinite_layer() is None  # nothing recorded since the reset
    clean = build("llama", tf.LlamaForCausalLM, num_layers=4, dtype=torch.float32)
    make_reversible(clean, MEFTConfig(variant="meft1", stream_arithmetic="exact", num_frozen_layers=1))
    clean.train()
    clean(**batch)
    assert _stack(clean).first_nonfinite_layer() == "none of MEFT layers 1-3 (their outputs were finite)"
    with torch.no_grad():
        clean.get_input_embeddings().weight[batch["input_ids"][0, 0]] = float("nan")
    clean(**batch)  # summed with the clean forward before: a step's micro-batches all count
    assert _stack(clean).first_nonfinite_layer() == ("the input of MEFT layer 1 (the embeddings or the frozen "
                                                     "layers below it)")


def test_float_arithmetic_does_not_claim_a_layer():
    """Float streams: an Inf in one element need not reach the element the flags read; naming no layer is
    honest, naming a wrong one would not be."""
    model = llama_with_bad_f_output("meft1", "float", float("inf"), layer=1)
    model.train()
    model(**make_batch(model))
    assert _stack(model).first_nonfinite_layer() is None


def test_the_stop_message_names_step_rank_and_layer():
    """The guard with the trainer's locate_nonfinite over a real model (one rank: no collective)."""
    from meft_ds.training.distributed import DistEnv
    from meft_ds.training.trainer import NonFiniteError, NonFiniteGuard, locate_nonfinite

    model = llama_with_bad_f_output("meft1", "exact", float("nan"), layer=3)
    model.train()
    loss = model(**make_batch(model)).loss
    located = []

    def locate():
        located.append(True)
        return locate_nonfinite([_stack(model)], DistEnv(rank=0, world_size=1, local_rank=0))

    with pytest.raises(NonFiniteError, match=r"^step 7: non-finite loss on rank 0 \(nan\), gradient norm nan, first "
                                             r"non-finite stream: rank 0: MEFT layer 3 \(its F or G output"):
        NonFiniteGuard("stop", fp16=False, rank=0, locate=locate).check(7, [loss.item()], float("nan"), applied=False)
    fp16 = NonFiniteGuard("stop", fp16=True, rank=0, locate=locate)
    located.clear()
    assert not fp16.check(8, [loss.item()], float("inf"), applied=False)
    assert not located  # the loss scaler's normal skip asks nothing (no collective on that path)
