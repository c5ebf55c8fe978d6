"""Regression runs: the head starts at the mean training label, and a run whose predictions are constant says
so in its log and results.json (docs/quality.md, "Regression")."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, OPTConfig, OPTForSequenceClassification,
                          RobertaConfig)

from meft_ds.training.modeling import ModelRecipe, build_model, init_regression_bias, regression_start
from meft_ds.training.args import DEFAULT_LEARNING_RATE, RunArgs
from train_helpers import REPO, SST2_SAMPLE, free_port, launcher_command, run, save_tiny_bert

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=100,
            max_position_embeddings=64)


def _head_biases(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias") and
            any(h in n.split(".") for h in ("classifier", "score"))}


@pytest.mark.parametrize("config", [BertConfig(**TINY), RobertaConfig(**TINY, pad_token_id=1)], ids=["bert", "roberta"])
def test_the_one_output_head_bias_starts_at_the_label_mean(config):
    config.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = init_regression_bias(model, 2.75)
    expected = {"bert": ["classifier.bias"], "roberta": ["classifier.out_proj.bias"]}[config.model_type]
    assert names == expected
    after = dict(model.named_parameters())
    assert torch.equal(after[expected[0]], torch.full((1,), 2.75))
    # nothing else moves (RoBERTa's dense layer inside the head has 16 outputs: not the output layer)
    assert all(torch.equal(before[n], after[n]) for n in before if n != expected[0])
    ids = torch.randint(5, 100, (3, 6))
    with torch.no_grad():
        model.eval()
        shifted = model(input_ids=ids).logits
        after[expected[0]].data.zero_()
        assert torch.allclose(shifted - model(input_ids=ids).logits, torch.full((3, 1), 2.75))


def test_lora_sets_the_trained_copy_of_the_head_and_classification_heads_are_untouched(tmp_path):
    base = save_tiny_bert(tmp_path / "base", dropout=0.0)
    lora = build_model(ModelRecipe("lora", str(base), "regression", 1, lora_rank=4))
    names = init_regression_bias(lora, -1.5)
    # PEFT trains a copy of the head (modules_to_save); the frozen original is not the one that is used
    assert names == ["base_model.model.classifier.modules_to_save.default.bias"]
    assert lora(input_ids=torch.tensor([[101, 2000, 102]])).logits.shape == (1, 1)
    classification = build_model(ModelRecipe("full", str(base), "classification", 2))
    before = _head_biases(classification)
    assert init_regression_bias(classification, 3.0) == []
    assert all(torch.equal(before[n], p) for n, p in _head_biases(classification).items())


def test_a_head_without_bias_is_reported_not_guessed():
    config = OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=100,
                       max_position_embeddings=64, word_embed_proj_dim=16, num_labels=1)
    assert init_regression_bias(OPTForSequenceClassification(config), 2.0) == []  # OPT's score has no bias


def test_the_documented_default_learning_rates_are_the_code_s():
    """docs/training.md's table of defaults names the rates of the one table in the code, per method."""
    row = next(line for line in (REPO / "docs" / "training.md").read_text().splitlines()
               if line.startswith("| `optimizer.params.lr`"))
    expected = ", ".join(f"{method} {rate:.0e}".replace("e-0", "e-") for method, rate in DEFAULT_LEARNING_RATE.items())
    assert expected in row
    for method, rate in DEFAULT_LEARNING_RATE.items():
        assert RunArgs(method=method, model_name_or_path="x").learning_rate_default() == rate


def _write_regression_data(path):
    """SST-2 sentences with 0-5 float scores (mean far from 0, like STS-B); the dev set repeats one sentence,
    so any model predicts one value for all of it."""
    path.mkdir()
    lines = [line.rsplit("\t", 1) for line in (SST2_SAMPLE / "train.tsv").read_text().splitlines()[1:65]]
    scores = [0.5 + 4.0 * int(label) for _, label in lines]
    (path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s.strip()}\t{y:.1f}\n" for (s, _), y in
                                                                  zip(lines, scores)))
    (path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"a fine film\t{y:.1f}\n" for y in range(6)))
    return regression_start(scores)


@pytest.mark.slow
def test_regression_run_starts_at_the_label_mean_and_flags_constant_predictions(tmp_path):
    """A real (one-rank) launcher run: with learning rate 0 the exported head bias is exactly where the trainer
    put it, the mean training label; the dev set's constant predictions are flagged in results.json and the
    log, and the undefined Pearson is not the only thing there."""
    from meft_ds.training import load_adapter_model

    base = save_tiny_bert(tmp_path / "base", dropout=0.0)
    label_mean = _write_regression_data(tmp_path / "data")
    out = tmp_path / "out"
    result = run(launcher_command("python", free_port()) + [
        "--model_name_or_path", base, "--train_file", tmp_path / "data" / "train.tsv",
        "--validation_file", tmp_path / "data" / "dev.tsv", "--method", "lora", "--deepspeed", "cpu",
        "--max_seq_length", 32, "--per_device_train_batch_size", 8, "--max_steps", 2, "--learning_rate", 0,
        "--output_dir", out], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert f"starts at the mean training label (the central 80%) {label_mean:.4g}" in log
    assert "predicts the same value for every example" in log
    metrics = json.loads((out / "results.json").read_text().replace("NaN", "null"))["eval"]["validation"]
    assert metrics["constant_predictions"] is True and metrics["pearson"] is None
    model = load_adapter_model(str(out))
    bias = model.base_model.model.classifier.modules_to_save["default"].bias
    assert bias.item() == pytest.approx(label_mean, rel=1e-6)


def test_the_pair_regression_task_is_scored_0_to_5_and_loads_as_regression(tmp_path):
    if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
        sys.path.insert(0, str(REPO))
    from benchmarks.sst2_pair_regression import write
    from meft_ds.training.data import load_task_datasets

    write(SST2_SAMPLE, tmp_path, train_pairs=40, dev_pairs=10)
    data, spec = load_task_datasets(train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "dev.tsv"))
    assert spec.is_regression and spec.text_columns == ("sentence1", "sentence2")
    assert set(data["train"]["label"]) <= {0.0, 2.5, 5.0} and len(set(data["train"]["label"])) == 3
    dev_sentences = {s for name in ("sentence1", "sentence2") for s in data["validation"][name]}
    assert not dev_sentences & {s for name in ("sentence1", "sentence2") for s in data["train"][name]}


def test_the_regression_start_is_the_central_mean():
    """The mean of the central 80%: the mean for clean labels, unmoved by one stray label among 32 (a 1e30 typo
    would otherwise put every prediction where MSE overflows), and between the values of two-valued labels."""
    clean = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0]
    assert regression_start(clean) == pytest.approx(sum(sorted(clean)[1:-1]) / 8)
    assert regression_start([2.0] * 31 + [1e30]) == 2.0
    assert 0.5 < regression_start([0.5] * 20 + [4.5] * 44) < 4.5
