"""benchmarks/glue_quality.py end to end on a tiny random BERT: real launcher runs (2 steps, one process),
results.json read back, saved bytes counted, table + JSON written; plus the aggregation maths."""

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
         "trainable_parameters": 3, "saved_bytes": 7},
    ]
    table = gq.aggregate(recs)
    assert table["sst2"]["full"]["mean"] == pytest.approx(0.82)
    assert table["sst2"]["full"]["std"] == pytest.approx(0.0282842712, rel=1e-6)
    assert table["sst2"]["meft1"]["std"] == 0.0 and table["sst2"]["meft1"]["saved_bytes"] == 7
    assert gq.within_one_point(table, "meft1", "full", "sst2") is True
    assert gq.within_one_point(table, "meft1", "lora", "sst2") is None
    recs[2]["value"] = 0.80
    assert gq.within_one_point(gq.aggregate(recs), "meft1", "full", "sst2") is False


def test_lr_overrides_per_task_and_errors():
    assert gq.parse_lr_overrides(["full=5e-5", "rte:meft2=1e-3"]) == ({"full": [5e-5]}, {("rte", "meft2"): [1e-3]})
    assert gq.parse_lr_overrides(["meft1=1e-3,3e-3"], "--grid") == ({"meft1": [1e-3, 3e-3]}, {})
    for bad in ("fulll=1e-3", "mnli:full=1e-3", "full=fast", "full", "full=1e-3,2e-3"):
        with pytest.raises(SystemExit, match=r"--lr .*\[task:\]method=rate"):
            gq.parse_lr_overrides([bad])
    with pytest.raises(SystemExit, match=r"--grid .*rate\[,rate"):
        gq.parse_lr_overrides(["lora=1e-3,x"], "--grid")


def test_find_metric_nested():
    assert gq._find_metric({"eval": {"validation": {"accuracy": 0.5, "loss": 1}}}, "accuracy") == 0.5


def test_tiny_end_to_end(tmp_path):
    model = save_tiny_bert(tmp_path / "model", dropout=0.1)
    data = write_tiny_sst2(tmp_path / "sst2", train_lines=64, dev_lines=16)
    md, js = tmp_path / "q.md", tmp_path / "q.json"
    argv = ["--methods", "full", "lora", "meft1", "--tasks", "sst2", "--seeds", "1", "--max_steps", "2",
            "--ranks", "1", "--no_bf16", "--per_device_train_batch_size", "4", "--model_name_or_path", str(model),
            "--data_dir", f"sst2={data}", "--work_dir", str(tmp_path / "runs"), "--out_md", str(md),
            "--out_json", str(js), "--port", str(free_port()), "--lr", "sst2:full=2e-4"]
    assert gq.main(argv) == 0
    out = json.loads(js.read_text())
    cells = out["table"]["sst2"]
    assert set(cells) == {"full", "lora", "meft1"}
    assert cells["full"]["learning_rates"] == [2e-4] and cells["lora"]["learning_rates"] == [gq.LEARNING_RATES["lora"]]
    for cell in cells.values():
        assert 0.0 <= cell["mean"] <= 1.0 and cell["n"] == 1 and cell["saved_bytes"] > 0
    # full trains every weight; MEFT and LoRA far fewer
    assert cells["meft1"]["trainable_parameters"] < cells["full"]["trainable_parameters"]
    assert cells["lora"]["trainable_parameters"] < cells["full"]["trainable_parameters"]
    text = md.read_text()
    assert f"| meft1 | sst2 (accuracy) | {gq.LEARNING_RATES['meft1']:g} |" in text and "vs full" in text
    # second call reuses the finished runs (no training) and gives the same table
    assert gq.main(argv + ["--no_train"]) == 0
    assert json.loads(js.read_text())["table"]["sst2"]["meft1"]["mean"] == cells["meft1"]["mean"]
    # a finished run is not reused for a different budget: clear error naming the fix, nothing overwritten
    results = gq.run_dir(tmp_path / "runs", "meft1", "sst2", 1, gq.LEARNING_RATES["meft1"]) / "results.json"
    before = results.read_text()
    with pytest.raises(SystemExit, match="other flags.*--rerun"):
        gq.main([*argv[:argv.index("--max_steps")], "--max_steps", "3", *argv[argv.index("--max_steps") + 2:],
                 "--no_train"])
    assert results.read_text() == before


def test_search_picks_the_best_rate_on_the_selection_split(tmp_path):
    model = save_tiny_bert(tmp_path / "model", dropout=0.0)
    data = write_tiny_sst2(tmp_path / "sst2", train_lines=32, dev_lines=8)
    source = write_tiny_sst2(tmp_path / "source", train_lines=96, dev_lines=1) / "train.tsv"
    md, js = tmp_path / "q.md", tmp_path / "q.json"
    argv = ["--methods", "meft1", "--tasks", "sst2", "--seeds", "1", "--max_steps", "3", "--ranks", "1",
            "--no_bf16", "--per_device_train_batch_size", "8", "--model_name_or_path", str(model),
            "--data_dir", f"sst2={data}", "--work_dir", str(tmp_path / "runs"), "--out_md", str(md),
            "--out_json", str(js), "--port", str(free_port()), "--no_saved_bytes", "--search",
            "--grid", "meft1=1e-06,0.05", "--select_from", str(source)]
    with pytest.raises(SystemExit, match="only .* sentences outside"):  # 96 - 32 < 872 by default
        gq.main(argv)
    assert gq.main(argv + ["--select_size", "40"]) == 0
    out = json.loads(js.read_text())
    scores = out["search"]["meft1"]["scores"]
    assert set(scores) == {"1e-06", "0.05"}
    best = max(scores, key=scores.get)
    assert out["search"]["meft1"]["best"] == float(best) == out["budget"]["learning_rates"]["meft1"]
    # the table's run used the chosen rate; the search's runs trained on the held-out split, not on dev
    assert gq.run_dir(tmp_path / "runs", "meft1", "sst2", 1, float(best)).exists()
    dev = (tmp_path / "runs" / "sst2-select" / "dev.tsv").read_text().splitlines()
    train = set((data / "train.tsv").read_text().splitlines()[1:])
    assert len(dev) == 41 and not train & set(dev[1:])
    assert not set((data / "dev.tsv").read_text().splitlines()[1:]) & set(dev[1:])
    assert "Learning-rate search" in md.read_text() and "on 40 sentences" in md.read_text()
    # a rate fixed with --lr is not searched (nothing trains: --no_train)
    assert gq.main(argv + ["--select_size", "40", "--lr", "meft1=0.05", "--no_train"]) == 0
    out = json.loads(js.read_text())
    assert out["search"] == {} and out["budget"]["learning_rates"]["meft1"] == 0.05


def test_training_flags_ignore_interpreter_port_and_run_dir():
    a = ["/x/deepspeed", "--num_gpus", "2", "--master_port", "1", "/r/launch/train.py", "--seed", "1",
         "--output_dir", "/a"]
    b = ["/y/deepspeed", "--num_gpus", "2", "--master_port", "7", "/q/launch/train.py", "--seed", "1"]
    one = ["/y/python", "/r/launch/train.py", "--master_port", "2", "--seed", "1"]
    assert gq.training_flags(a) == gq.training_flags(b) == ["--num_gpus", "2", "--seed", "1"]
    assert gq.training_flags(one) == ["--seed", "1"]  # one rank vs two: a different run
    assert gq.training_flags(b) != gq.training_flags(b[:-1] + ["2"])  # another seed
