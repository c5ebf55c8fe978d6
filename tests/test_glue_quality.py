"""benchmarks/glue_quality.py end to end on a tiny random BERT: real launcher runs (2 steps, one process),
results.json read back, activation bytes counted, table + JSON written; plus the aggregation maths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import glue_quality as gq  # noqa: E402
from tests.train_helpers import free_port, save_tiny_bert, write_tiny_sst2  # noqa: E402


def test_aggregate_mean_std_and_within_one_point():
    recs = [
        {"method": "full", "task": "sst2", "seed": 1, "metric": "accuracy", "value": 0.80, "trainable_parameters": 10},
        {"method": "full", "task": "sst2", "seed": 2, "metric": "accuracy", "value": 0.84, "trainable_parameters": 10},
        {"method": "meft1", "task": "sst2", "seed": 1, "metric": "accuracy", "value": 0.815,
         "trainable_parameters": 3, "activation_bytes": 7},
    ]
    table = gq.aggregate(recs)
    assert table["sst2"]["full"]["mean"] == pytest.approx(0.82)
    assert table["sst2"]["full"]["std"] == pytest.approx(0.0282842712, rel=1e-6)
    assert table["sst2"]["meft1"]["std"] == 0.0 and table["sst2"]["meft1"]["activation_bytes"] == 7
    assert gq.within_one_point(table, "meft1", "full", "sst2") is True
    assert gq.within_one_point(table, "meft1", "lora", "sst2") is None
    recs[2]["value"] = 0.80
    assert gq.within_one_point(gq.aggregate(recs), "meft1", "full", "sst2") is False


def test_find_metric_nested():
    assert gq._find_metric({"eval": {"validation": {"accuracy": 0.5, "loss": 1}}}, "accuracy") == 0.5


def test_tiny_end_to_end(tmp_path):
    model = save_tiny_bert(tmp_path / "model", dropout=0.1)
    data = write_tiny_sst2(tmp_path / "sst2", train_lines=64, dev_lines=16)
    md, js = tmp_path / "q.md", tmp_path / "q.json"
    argv = ["--methods", "full", "lora", "meft1", "--tasks", "sst2", "--seeds", "1", "--max_steps", "2",
            "--ranks", "1", "--no_bf16", "--per_device_train_batch_size", "4", "--model_name_or_path", str(model),
            "--data_dir", f"sst2={data}", "--work_dir", str(tmp_path / "runs"), "--out_md", str(md),
            "--out_json", str(js), "--port", str(free_port())]
    assert gq.main(argv) == 0
    out = json.loads(js.read_text())
    cells = out["table"]["sst2"]
    assert set(cells) == {"full", "lora", "meft1"}
    for cell in cells.values():
        assert 0.0 <= cell["mean"] <= 1.0 and cell["n"] == 1 and cell["activation_bytes"] > 0
    # full trains every weight; MEFT and LoRA far fewer
    assert cells["meft1"]["trainable_parameters"] < cells["full"]["trainable_parameters"]
    assert cells["lora"]["trainable_parameters"] < cells["full"]["trainable_parameters"]
    text = md.read_text()
    assert "| meft1 | sst2 (accuracy) |" in text and "vs full" in text
    # second call reuses the finished runs (no training) and gives the same table
    assert gq.main(argv + ["--no_train"]) == 0
    assert json.loads(js.read_text())["table"]["sst2"]["meft1"]["mean"] == cells["meft1"]["mean"]
