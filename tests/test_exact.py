"""Exact stream arithmetic: bit-exact reconstruction at any depth, gradients, outputs, checksum errors."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import build, make_batch
from helpers import embedding_grad_step, rel_err
from meft_ds import MEFTConfig, make_reversible
from meft_ds.reversible import Carry, MEFTLayer, MEFTStack, ReconstructionError

FAMILIES = [("bert", tf.BertForSequenceClassification), ("roberta", tf.RobertaForQuestionAnswering),
            ("bart", tf.BartForConditionalGeneration), ("opt", tf.OPTForCausalLM), ("llama", tf.LlamaForCausalLM)]
FAMILY_IDS = [t for t, _ in FAMILIES]


def exact_model(model_type, head, variant, depth, dtype, **config):
    model = build(model_type, head, num_layers=depth, dtype=dtype)
    config.setdefault("num_frozen_layers", 0)  # every layer converted (the OPT/LLaMA default freezes a third)
    make_reversible(model, MEFTConfig(variant=variant, stream_arithmetic="exact", adapter_dropout=0.1, **config))
    for stack in model.modules():
        if isinstance(stack, MEFTStack):
            stack.mix.data.fill_(0.3)  # every path carries gradient
    return model


def record_reconstructions(monkeypatch):
    """Collect each MEFT layer's input states in forward and the states rebuilt for it in backward."""
    forward_inputs, rebuilt = {}, {}
    original_forward, original_step = MEFTLayer.forward, MEFTLayer.backward_step

    def forward(self, carry, *args):
        x1, x2 = carry.take()
        if not torch.is_grad_enabled():  # inside the Function's forward
            forward_inputs[id(self)] = (x1.state.clone(), x2.state.clone())
        return original_forward(self, Carry(x1, x2), *args)

    def backward_step(self, *args):
        x1, x2, dx1, dx2 = original_step(self, *args)
        rebuilt[id(self)] = (x1.state.clone(), x2.state.clone())  # later layers rebuild in place
        return x1, x2, dx1, dx2

    monkeypatch.setattr(MEFTLayer, "forward", forward)
    monkeypatch.setattr(MEFTLayer, "backward_step", backward_step)
    return forward_inputs, rebuilt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("depth", [6, 12, 24, 48])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("model_type,head", FAMILIES, ids=FAMILY_IDS)
def test_reconstruction_is_bit_exact(monkeypatch, model_type, head, variant, depth, dtype):
    model = exact_model(model_type, head, variant, depth, dtype)
    forward_inputs, rebuilt = record_reconstructions(monkeypatch)
    embedding_grad_step(model, make_batch(model, batch_size=2, seq_len=8), "reversible")
    num_layers = sum(len(s.meft_layers) for s in model.modules() if isinstance(s, MEFTStack))
    assert len(forward_inputs) == len(rebuilt) == num_layers
    for key, (x1, x2) in forward_inputs.items():
        assert torch.equal(rebuilt[key][0], x1) and torch.equal(rebuilt[key][1], x2)


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("model_type,head", FAMILIES, ids=FAMILY_IDS)
def test_gradients_equal_cached_autograd_through_the_same_fixed_point_forward(model_type, head, variant):
    """fp32: the only difference is the order in which autograd sums a stream's 3 gradient contributions
    (measured <= ~1e-6); bf16 weights: bit-identical except where bf16 gradients accumulate over layers
    (BART's encoder states), so there only close; fp32 with the batch in 4 slices, bf16 in one piece (with
    slices a weight's gradient is summed slice by slice, in bf16, in another order than autograd's). float32 stream
    values in both (bf16 values, the default with bf16 weights, have their own test below)."""
    for dtype in (torch.float32, torch.bfloat16):
        chunks = 1 if dtype == torch.bfloat16 else 4
        model = exact_model(model_type, head, variant, 12, dtype, stream_dtype="float32", batch_chunks=chunks)
        batch = make_batch(model)
        loss_v, vanilla = embedding_grad_step(model, batch, "vanilla")
        loss_r, reversible = embedding_grad_step(model, batch, "reversible")
        assert torch.equal(loss_v, loss_r)
        for name, ref in vanilla.items():
            if dtype == torch.float32:
                assert rel_err(reversible[name], ref) < 3e-6, name
            elif model_type != "bart":
                assert torch.equal(reversible[name], ref), name
            else:
                assert rel_err(reversible[name], ref) < 5e-2, name


def test_mixed_stack_with_frozen_and_cached_layers_stays_exact(monkeypatch):
    model = exact_model("opt", tf.OPTForCausalLM, "meft3", 8, torch.float32, num_frozen_layers=2,
                        num_reversible_layers=4)
    forward_inputs, rebuilt = record_reconstructions(monkeypatch)
    loss_v, vanilla = embedding_grad_step(model, make_batch(model), "vanilla")
    forward_inputs.clear()
    loss_r, reversible = embedding_grad_step(model, make_batch(model), "reversible")
    assert torch.equal(loss_v, loss_r)
    assert len(forward_inputs) == 4 and all(torch.equal(rebuilt[k][0], v[0]) for k, v in forward_inputs.items())
    for name, ref in vanilla.items():
        if ref is not None:
            assert rel_err(reversible[name], ref) < 3e-6, name


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_outputs_match_float_arithmetic(variant):
    model = build("llama", tf.LlamaForCausalLM, num_layers=12, dtype=torch.float32)
    batch = make_batch(model)
    outputs = {}
    for arithmetic in ("float", "exact"):
        torch.manual_seed(0)
        converted = make_reversible(build("llama", tf.LlamaForCausalLM, num_layers=12, dtype=torch.float32),
                                    MEFTConfig(variant=variant, stream_arithmetic=arithmetic, num_frozen_layers=0)).eval()
        with torch.no_grad():
            outputs[arithmetic] = converted(**batch).logits
    assert rel_err(outputs["exact"], outputs["float"]) < 1e-5


def test_one_ulp_in_a_recomputed_block_raises_instead_of_wrong_gradients():
    model = exact_model("bert", tf.BertForSequenceClassification, "meft1", 6, torch.float32)
    stack = next(m for m in model.modules() if isinstance(m, MEFTStack))
    target = stack.meft_layers[2]
    original_g = target.g
    calls = []

    def perturbed_g(owner, hidden, inputs):
        out = original_g(owner, hidden, inputs)
        calls.append(1)
        if len(calls) == 2:  # the recomputation in backward: move the largest element by one ulp
            flat = out.detach().reshape(-1)
            i = flat.abs().argmax()
            out = out.clone()
            out.view(-1)[i] = torch.nextafter(flat[i], flat[i] + 1)
        return out

    target.g = perturbed_g
    for p in model.parameters():
        p.grad = None
    with pytest.raises(ReconstructionError, match="MEFT layer 2"):
        embedding_grad_step(model, make_batch(model), "reversible")
    trained = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    # layers above 2 already produced their gradients; the error stops the step before any update
    assert trained, "the error must come from backward, after the layers above"


def test_exact_config_needs_unit_fractions():
    with pytest.raises(ValueError, match="not 1/m"):
        MEFTConfig(variant="meft1", lam=0.3, stream_arithmetic="exact")
    assert MEFTConfig(variant="meft3", lam=0.125, beta=0.125, stream_arithmetic="exact").lam == 0.125


@pytest.mark.parametrize("arithmetic", ["float", "exact"])
def test_reconstruction_error_diagnostic(arithmetic):
    """Sampled diagnostic: the stack reports the largest relative error of the inputs rebuilt in backward.
    Exact arithmetic: 0. Float: rounding amplified 10x per division (here ~1e5 at 6 MEFT3 layers). Gradients unchanged."""
    model = build("llama", tf.LlamaForCausalLM, num_layers=6, dtype=torch.float32)
    make_reversible(model, MEFTConfig(variant="meft3", stream_arithmetic=arithmetic, num_frozen_layers=0))
    stack = next(m for m in model.modules() if isinstance(m, MEFTStack))
    batch = make_batch(model)
    _, plain = embedding_grad_step(model, batch, "reversible")
    with stack.measuring_reconstruction() as result:
        assert result.error is None
        _, measured = embedding_grad_step(model, batch, "reversible")
    error = result.error
    assert (error == 0.0) if arithmetic == "exact" else error > 1e-9, error
    assert all(torch.equal(plain[n], measured[n]) for n in plain)


@pytest.mark.parametrize("m", [2, 3, 8, 10, 16, 100, 128])
def test_packed_remainders_round_trip(m):
    """ceil(log2 m)-bit packing of x mod m is lossless, also for a size that is not a multiple of 8."""
    from meft_ds.coupling import pack_remainders, unpack_remainders

    remainders = torch.randint(0, m, (3, 7, 5), dtype=torch.int64)
    packed = pack_remainders(remainders, m)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-remainders.numel() // 8) * (m - 1).bit_length()
    assert torch.equal(unpack_remainders(packed, m, remainders), remainders)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("frac_bits,state_dtype", [(8, torch.int64), (24, torch.int64), (45, torch.int64),
                                                   (8, torch.int32), (16, torch.int32)])
def test_quantise_in_the_input_format_gives_the_float64_integers(dtype, frac_bits, state_dtype):
    """quantise scales and rounds in the input's own format (fp16 widened to fp32): its integers and its range
    flag equal a float64 reference's, on halfway cases, values near the range limit, tiny and subnormal
    values, and values past the range (inf, NaN, too large)."""
    from meft_ds.coupling import ExactCoupling, limits

    coupling, info, scale = ExactCoupling(torch.float32, frac_bits, state_dtype), torch.finfo(dtype), 2.0 ** frac_bits
    quantised_limit = limits(state_dtype)[0]
    limit = quantised_limit / scale
    halfway = (torch.arange(-8, 8, dtype=torch.float64) + 0.5) / scale  # ties: round half to even
    edges = torch.tensor([limit * 0.99, -limit * 0.99, info.tiny, -info.tiny, info.tiny / 4, 0.0, -0.0])
    values = torch.cat([halfway, edges.double(), torch.randn(4096, dtype=torch.float64) * 3])
    values = values.clamp(-info.max, info.max).to(dtype)
    state, poison = coupling.quantise(values)
    assert state.dtype == state_dtype and poison.item() == 0.0
    assert torch.equal(state.long(), torch.round(values.double() * scale).to(torch.int64))
    for bad in (limit * 1.01, float("inf"), float("nan")):
        outside = torch.cat([values, torch.tensor([bad]).to(dtype)])
        expected_ok = bool((outside.double() * scale).abs().lt(quantised_limit).all())
        assert (poison := coupling.quantise(outside)[1]).isnan().item() != expected_ok, (bad, poison)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("state_dtype", [torch.int64, torch.int32])
def test_decode_by_chunks_gives_the_one_pass_float64_values(value_dtype, state_dtype):
    """decode works by chunks of CHUNK elements (a bounded float64 temporary): bit for bit the values of
    one float64 pass over the whole state, for a state spanning several chunks and a ragged last one,
    non-contiguous too."""
    from meft_ds.coupling import CHUNK, ExactCoupling

    coupling = ExactCoupling(value_dtype, 16 if state_dtype == torch.int32 else 32, state_dtype)
    high = 2 ** 29 if state_dtype == torch.int32 else 2 ** 61
    state = torch.randint(-high, high, (3, CHUNK // 2 + 7), dtype=torch.int64).to(state_dtype)
    for s in (state, state.t()):
        expected = (s.double() / coupling.scale).to(value_dtype)
        decoded = coupling.decode(s)
        assert decoded.dtype == value_dtype and decoded.shape == s.shape
        assert torch.equal(decoded, expected)


@pytest.mark.parametrize("m", [1, 2, 3, 10, 16, 200, 1000])
@pytest.mark.parametrize("state_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("chunks", ["1.5 chunks", "over max_chunks chunks"])
def test_combine_and_split_by_chunks_give_the_one_pass_integers(m, state_dtype, chunks):
    """combine and split work chunk_size elements at a time, in place: the new state is floor(x / m) + q(b) of
    one pass over the whole stream, the kept remainders are x mod m (bit-packed, uint8 or int32 by m), the
    checksum equals the one-pass weighted sum, and split gives x back bit for bit; over several chunks and a
    ragged last one (not a multiple of 8), with and without an out-of-range block output. A stream of more than
    max_chunks * CHUNK elements takes larger chunks (at most max_chunks passes)."""
    from meft_ds.coupling import CHECKSUM_ROW, CHUNK, ExactCoupling, Stream, _odd_words, chunk_size, unpack_remainders

    frac_bits, max_chunks = 16 if state_dtype == torch.int32 else 32, 4
    coupling = ExactCoupling(torch.float32, frac_bits, state_dtype, max_chunks)
    shape = (3, CHUNK // 2 + 5) if chunks == "1.5 chunks" else (max_chunks + 1, CHUNK + 5)
    size = chunk_size(shape[0] * shape[1], max_chunks)
    assert size % CHUNK == 0 and -(-shape[0] * shape[1] // size) <= max_chunks and (size > CHUNK) == (shape[0] > 3)
    high = 2 ** 28 if state_dtype == torch.int32 else 2 ** 58
    x_state = torch.randint(-high, high, shape, dtype=torch.int64).to(state_dtype)
    x = Stream(coupling.decode(x_state), x_state)
    block_out = torch.randn(shape) * 50
    y, remainders = coupling.combine(x, block_out, 1.0 / m)
    q = torch.round(block_out.double() * coupling.scale).long()
    expected = torch.div(x_state.long(), m, rounding_mode="floor") + q
    assert y.state.dtype == state_dtype and torch.equal(y.state.long(), expected) and not y.value.isnan().any()
    if m == 1:
        assert remainders is None
    else:
        kept = unpack_remainders(remainders, m, x_state) if m <= 128 else remainders
        assert kept.dtype == (torch.int64 if m <= 128 else torch.uint8 if m <= 256 else torch.int32)
        assert torch.equal(kept.long().view(shape), torch.remainder(x_state.long(), m))
        assert remainders.nbytes == ExactCoupling.remainder_storage(x_state.numel(), m, "meta").nbytes
    flat = y.state.reshape(-1).long()
    rows = -(-flat.numel() // CHECKSUM_ROW)
    words = _odd_words(7, CHECKSUM_ROW + 2 * rows, "cpu")  # a (the column weights), then b (two per row)
    weights = words[:CHECKSUM_ROW].repeat(rows)[: flat.numel()]
    row_sums = torch.stack([part.sum() for part in (flat * weights).split(CHECKSUM_ROW)])
    expected_checksum = (words[CHECKSUM_ROW:].view(2, -1) * row_sums).sum(dim=1)
    assert torch.equal(coupling.checksum(y, 7), expected_checksum)
    rebuilt = coupling.split(Stream(None, y.state.clone()), block_out, 1.0 / m, remainders)
    assert torch.equal(rebuilt.state, x_state) and rebuilt.poison.item() == 0.0
    outside = block_out.clone()
    outside.view(-1)[-1] = float("inf")  # in the last chunk: the flag must survive the chunks before it
    assert coupling.combine(x, outside, 1.0 / m)[0].value.isnan().all()
    assert coupling.split(Stream(None, y.state.clone()), outside, 1.0 / m, remainders).poison.isnan()


@pytest.mark.parametrize("m", [10, 8])
def test_exact_arithmetic_ops_per_chunk(m):
    """The exact arithmetic's ops grow with the number of chunks by a fixed budget per chunk (on a GPU each op is a
    kernel launch, and the reversible step is launch-bound there: docs/benchmarks.md): combine 10 (quantise 3, add,
    remainder, pack 3, decode 2), split 9 (quantise 3, subtract, unpack 4, multiply-add), checksum 2. The range
    checks and the checksum's weights are per tensor, not per chunk; the weights are one kernel (test below).
    Counted at 4 and 8 chunks."""
    from benchmarks.profile_step import OpCounter
    from meft_ds.coupling import CHUNK, ExactCoupling, Stream, chunk_size

    coupling = ExactCoupling(torch.bfloat16, 30, max_chunks=8)
    counts = {}
    for chunks in (4, 8):
        assert chunk_size(chunks * CHUNK, 8) == CHUNK
        x_state = torch.randint(-2 ** 40, 2 ** 40, (chunks, CHUNK), dtype=torch.int64)
        x, block_out = Stream(coupling.decode(x_state), x_state), torch.randn(chunks, CHUNK, dtype=torch.bfloat16)
        with OpCounter() as combined:
            y, remainders = coupling.combine(x, block_out, 1.0 / m)
        coupling.checksum(y, 2)  # builds the checksum's weight table for this size (once per device and size)
        with OpCounter() as summed:
            coupling.checksum(y, 3)
        with OpCounter() as split:
            rebuilt = coupling.split(Stream(None, y.state), block_out, 1.0 / m, remainders)
        assert torch.equal(rebuilt.state, x_state)
        counts[chunks] = (combined.total, split.total, summed.total)
    per_chunk = [(b - a) / 4 for a, b in zip(counts[4], counts[8])]
    assert per_chunk[0] <= 10 and per_chunk[1] <= 9 and per_chunk[2] <= 2, (per_chunk, counts)


def test_checksum_weights_are_odd_keyed_and_one_kernel():
    """The checksum's weights (_odd_words): odd (so any single changed element shows), different for every key,
    the same words whatever table size was built before (a prefix of a longer draw), and one op per call once the
    device's table is long enough."""
    from benchmarks.profile_step import OpCounter
    from meft_ds import coupling

    coupling._CONSTANTS.clear()
    short = coupling._odd_words(5, 3000, "cpu")  # builds a table of 4096 words
    long = coupling._odd_words(5, 9000, "cpu")  # grows it to 16384
    assert torch.equal(long[:3000], short) and bool((long & 1).all())
    with OpCounter() as counted:
        other = coupling._odd_words(6, 9000, "cpu")
    assert counted.total == 1 and bool((other & 1).all())
    assert (other == long).float().mean() < 0.01 and long.unique().numel() == 9000
    assert not torch.equal(coupling._odd_words(-5, 8, "cpu"), coupling._odd_words(5, 8, "cpu"))


@pytest.mark.parametrize("batch_chunks", [1, 3])
def test_stream_arithmetic_takes_two_passes_per_batch_slice(batch_chunks):
    """make_reversible gives the exact arithmetic 2 passes per batch slice (larger chunks, fewer kernel launches,
    where the batch is whole; docs/benchmarks.md section 0 measures that its peak does not grow)."""
    model = exact_model("opt", tf.OPTForCausalLM, "meft1", 2, torch.float32, batch_chunks=batch_chunks)
    stacks = [m for m in model.modules() if isinstance(m, MEFTStack)]
    assert stacks and all(s.coupling_for(torch.float32).max_chunks == 2 * batch_chunks for s in stacks)


@pytest.mark.parametrize("lam", [0.125, 0.1])
def test_exact_reconstruction_with_lam_one_eighth(monkeypatch, lam):
    """lam = 1/8 (3-bit remainders, division a shift) reconstructs bit-exactly, like the default 0.1."""
    model = exact_model("bert", tf.BertForSequenceClassification, "meft3", 12, torch.float32, lam=lam, beta=lam)
    forward_inputs, rebuilt = record_reconstructions(monkeypatch)
    embedding_grad_step(model, make_batch(model, batch_size=2, seq_len=8), "reversible")
    assert len(forward_inputs) == len(rebuilt) == 12
    for key, (x1, x2) in forward_inputs.items():
        assert torch.equal(rebuilt[key][0], x1) and torch.equal(rebuilt[key][1], x2)


@pytest.mark.parametrize("split", [True, False])
def test_exact_reconstruction_with_and_without_split_layer_recompute(monkeypatch, split):
    model = exact_model("opt", tf.OPTForCausalLM, "meft1", 12, torch.float32, split_layer_recompute=split)
    forward_inputs, rebuilt = record_reconstructions(monkeypatch)
    embedding_grad_step(model, make_batch(model, batch_size=2, seq_len=8), "reversible")
    assert len(forward_inputs) == len(rebuilt) == 12
    for key, (x1, x2) in forward_inputs.items():
        assert torch.equal(rebuilt[key][0], x1) and torch.equal(rebuilt[key][1], x2)


@pytest.mark.parametrize("arithmetic", ["exact", "float"])
def test_second_backward_through_the_same_graph_fails_loudly(arithmetic):
    """Backward rebuilds the layer inputs in place in the saved top streams: a retained graph cannot be
    back-propagated twice silently with the overwritten streams."""
    model = build("bert", tf.BertForSequenceClassification, num_layers=2, dtype=torch.float32)
    make_reversible(model, MEFTConfig(stream_arithmetic=arithmetic))
    model.train()
    loss = model(**make_batch(model, batch_size=2, seq_len=8)).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("model_type,head", [FAMILIES[0], FAMILIES[3]], ids=["bert", "opt"])
def test_bf16_stream_values_rebuild_exactly_and_match_the_cached_backward(monkeypatch, model_type, head, variant):
    """stream_dtype="bfloat16" (bf16 weights): the int64 states still rebuild bit-exactly; the decoded values
    and the gradients through the coupling are bf16, so reversible and cached backward agree to bf16 rounding
    (the order of 3 gradient sums per stream differs), and the loss is the same."""
    model = exact_model(model_type, head, variant, 12, torch.bfloat16, stream_dtype="bfloat16")
    forward_inputs, rebuilt = record_reconstructions(monkeypatch)
    loss_v, vanilla = embedding_grad_step(model, make_batch(model), "vanilla")
    forward_inputs.clear()
    loss_r, reversible = embedding_grad_step(model, make_batch(model), "reversible")
    assert torch.equal(loss_v, loss_r)
    assert len(forward_inputs) == 12 and all(torch.equal(rebuilt[k][0], v[0]) and torch.equal(rebuilt[k][1], v[1])
                                             for k, v in forward_inputs.items())
    errors = {name: rel_err(reversible[name], ref) for name, ref in vanilla.items() if ref is not None}
    print(max(errors.values()))
    assert max(errors.values()) < 5e-2, max(errors.items(), key=lambda kv: kv[1])


def test_bf16_streams_need_the_exact_arithmetic():
    with pytest.raises(ValueError, match="stream_dtype='bfloat16' needs stream_arithmetic='exact'"):
        MEFTConfig(stream_dtype="bfloat16", stream_arithmetic="float")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("model_type,head", [FAMILIES[0], FAMILIES[3], FAMILIES[4]], ids=["bert", "opt", "llama"])
def test_int32_states_rebuild_exactly_and_match_the_cached_backward(monkeypatch, model_type, head, variant, dtype):
    """state_dtype="int32" (frac_bits 16): bit-exact rebuild at 12 layers, the same loss as the cached backward
    through the same fixed-point forward, gradients equal to summation order."""
    model = exact_model(model_type, head, variant, 12, dtype, state_dtype="int32", frac_bits=16)
    forward_inputs, rebuilt = record_reconstructions(monkeypatch)
    loss_v, vanilla = embedding_grad_step(model, make_batch(model), "vanilla")
    forward_inputs.clear()
    loss_r, reversible = embedding_grad_step(model, make_batch(model), "reversible")
    assert torch.equal(loss_v, loss_r)
    states = [x for pair in forward_inputs.values() for x in pair]
    assert len(forward_inputs) == 12 and all(x.dtype == torch.int32 for x in states)
    assert all(torch.equal(rebuilt[k][0], v[0]) and torch.equal(rebuilt[k][1], v[1]) for k, v in forward_inputs.items())
    errors = {name: rel_err(reversible[name], ref) for name, ref in vanilla.items() if ref is not None}
    assert max(errors.values()) < (3e-6 if dtype == torch.float32 else 5e-2), max(errors.items(), key=lambda kv: kv[1])


def test_int32_states_poison_what_they_cannot_hold():
    from meft_ds.coupling import ExactCoupling, representable_magnitude

    coupling = ExactCoupling(torch.float32, 16, torch.int32)
    limit = representable_magnitude(16, torch.int32)
    assert limit == 2.0 ** 13
    x = coupling.encode(torch.full((4,), 0.9 * limit))
    assert x.state.dtype == torch.int32 and torch.isfinite(x.value).all()
    within, _ = coupling.combine(x, torch.full((4,), 0.9 * limit), 1.0)
    assert torch.equal(within.value, torch.full((4,), 1.8 * limit))
    beyond, _ = coupling.combine(within, torch.full((4,), 0.9 * limit), 1.0)  # would wrap an int32
    assert torch.isnan(beyond.value).all()
    assert torch.isnan(coupling.encode(torch.full((2,), 1.01 * limit)).value).all()


def test_int32_states_need_few_fractional_bits():
    with pytest.raises(ValueError, match="state_dtype='int32' holds"):
        MEFTConfig(state_dtype="int32")  # frac_bits 32 by default
    MEFTConfig(state_dtype="int32", frac_bits=21)


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_reversible_forward_keeps_two_integer_streams_alive(variant):
    """The reversible forward keeps nothing of a layer but its remainders, so each layer makes its output states
    in its input states' storage (ExactCoupling.combine's `consume`): at no point of the forward are more than two
    stream-sized integer states alive (four without it: both inputs beside both outputs)."""
    from meft_ds.memory import PeakTensorTracker

    class IntegerStreams(PeakTensorTracker):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.most = max(self.most, self._by_kind.get(kind, 0))
            return out

    model = exact_model("opt", tf.OPTForCausalLM, variant, 4, torch.float32)
    batch = make_batch(model)
    model.train()
    stream_bytes = batch["input_ids"].numel() * model.config.hidden_size * 8
    kind = "x".join(map(str, (*batch["input_ids"].shape, model.config.hidden_size))) + " int64"
    with IntegerStreams() as tracker:
        model(**batch)
    assert tracker.most == 2 * stream_bytes, (tracker.most, stream_bytes)
