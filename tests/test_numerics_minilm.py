"""On the real MiniLM layers stacked to 24: exact-arithmetic reversible gradients match float cached
backprop to 1e-4, where the float reversible backward has lost them (docs/numerics.md has the full table)."""

from __future__ import annotations

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "numerics_table.py")


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("numerics_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, batch = module.load_minilm_and_batch(batch_size=4, seq_len=64)
    return module, model, batch


def test_exact_matches_float_cached_backprop_at_depth_24(table):
    module, model, batch = table
    row = module.measure(model, batch, "meft3", 24, "exact")
    assert row["max"] <= 1e-4 and row["input_embeddings"] <= 1e-4, row


def test_float_reversible_has_lost_the_gradients_at_depth_12(table):
    """The contrast that motivates the exact arithmetic (the same measurement, float streams)."""
    module, model, batch = table
    row = module.measure(model, batch, "meft3", 12, "float")
    assert row["median"] > 1e-2, row
