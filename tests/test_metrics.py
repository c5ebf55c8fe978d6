"""meft_ds.training.metrics against values worked out by hand or by an independent formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meft_ds.training.data import GLUE_TASKS, TaskSpec
from meft_ds.training.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    lm_loss_sums,
    lm_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
)

LABELS = np.array([1, 1, 1, 0, 0, 0, 1, 0])
PREDICTED = np.array([1, 1, 0, 0, 0, 1, 1, 0])
# By hand: TP = 3 (rows 0, 1, 6), FN = 1 (row 2), TN = 3 (rows 3, 4, 7), FP = 1 (row 5).


def test_accuracy_f1_mcc_binary_by_hand():
    assert accuracy(PREDICTED, LABELS) == 6 / 8
    assert f1_binary(PREDICTED, LABELS) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4^4) = 0.5
    assert matthews_corrcoef(PREDICTED, LABELS) == pytest.approx(0.5)


def test_f1_and_mcc_degenerate_cases():
    assert f1_binary(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no positives anywhere
    assert matthews_corrcoef(np.ones(4, int), np.array([0, 1, 0, 1])) == 0.0  # constant prediction
    assert matthews_corrcoef(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1])) == pytest.approx(1.0)
    assert matthews_corrcoef(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1])) == pytest.approx(-1.0)


def test_mcc_multiclass_equals_one_hot_covariance_ratio():
    """R_K = sum_k cov(X_k, Y_k) / sqrt(sum_k cov(X_k, X_k) * sum_k cov(Y_k, Y_k)) over one-hot columns."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=50)
    predicted = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 3, size=50))
    x, y = np.eye(3)[predicted], np.eye(3)[labels]
    cov = lambda a, b: float(((a - a.mean(0)) * (b - b.mean(0))).sum())  # noqa: E731
    expected = cov(x, y) / math.sqrt(cov(x, x) * cov(y, y))
    assert matthews_corrcoef(predicted, labels) == pytest.approx(expected)


def test_pearson_by_hand():
    # x - mean = (-1, 0, 1), y - mean = (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert pearson(np.array([1, 2, 3]), np.array([1, 2, 4])) == pytest.approx(9 / math.sqrt(84))
    assert math.isnan(pearson(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))


def test_spearman_without_ties_matches_rank_difference_formula():
    x = np.array([0.3, 1.2, -0.5, 2.0, 0.9, 1.1])
    y = np.array([10.0, 30.0, 20.0, 60.0, 50.0, 40.0])
    rank_x = np.array([2, 5, 1, 6, 3, 4])  # by hand: -0.5 < 0.3 < 0.9 < 1.1 < 1.2 < 2.0
    rank_y = np.array([1, 3, 2, 6, 5, 4])
    n = len(x)
    expected = 1 - 6 * np.sum((rank_x - rank_y) ** 2) / (n * (n**2 - 1))
    assert spearman(x, y) == pytest.approx(expected)


def test_spearman_with_ties_uses_average_ranks():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 4])) == pytest.approx(4.5 / math.sqrt(22.5))


def test_compute_metrics_per_task():
    logits = np.zeros((8, 2))
    logits[np.arange(8), PREDICTED] = 1.0
    assert compute_metrics(GLUE_TASKS["sst2"], logits, LABELS) == {"accuracy": 0.75}
    assert compute_metrics(GLUE_TASKS["sst2"], PREDICTED, LABELS) == {"accuracy": 0.75}
    mrpc = compute_metrics(GLUE_TASKS["mrpc"], logits, LABELS)
    assert mrpc["accuracy"] == 0.75 and mrpc["f1"] == pytest.approx(0.75)
    assert mrpc["combined_score"] == pytest.approx((0.75 + 0.75) / 2)
    assert compute_metrics(GLUE_TASKS["cola"], logits, LABELS) == {"matthews_correlation": pytest.approx(0.5)}
    stsb = compute_metrics(GLUE_TASKS["stsb"], np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert stsb["pearson"] == pytest.approx(9 / math.sqrt(84)) and stsb["spearmanr"] == pytest.approx(1.0)
    mnli_logits = np.array([[0.1, 0.7, 0.2], [0.9, 0.0, 0.1], [0.0, 0.2, 0.8]])
    assert compute_metrics(GLUE_TASKS["mnli"], mnli_logits, np.array([1, 0, 0])) == {"accuracy": 2 / 3}


def test_constant_predictions_are_flagged():
    """A collapsed model says so instead of a bare NaN (regression) or a plausible accuracy (one class)."""
    stsb = compute_metrics(GLUE_TASKS["stsb"], np.full((4, 1), 2.5), np.array([1.0, 2.0, 4.0, 5.0]))
    assert math.isnan(stsb["pearson"]) and stsb["constant_predictions"] is True
    sst2 = compute_metrics(GLUE_TASKS["sst2"], np.ones(8, int), LABELS)
    assert sst2 == {"accuracy": 0.5, "constant_predictions": True}
    assert "constant_predictions" not in compute_metrics(GLUE_TASKS["sst2"], PREDICTED, LABELS)


def test_compute_metrics_shape_mismatch():
    with pytest.raises(ValueError, match="do not match labels"):
        compute_metrics(GLUE_TASKS["sst2"], np.zeros((3, 2)), np.zeros(4, int))


LM_SPEC = TaskSpec("lm", "causal_lm", ("prompt", "answer"), "answer", None, 0, ("validation",), ("loss", "perplexity"))


def test_lm_uniform_logits_give_vocab_perplexity():
    vocab = 11
    labels = torch.tensor([[-100, -100, 4, 5, -100], [-100, 1, 2, 3, 9]])  # labels[:, 1:] scores 2 + 4 targets
    result = compute_metrics(LM_SPEC, torch.zeros(2, 5, vocab), labels)
    assert result["num_tokens"] == 6
    assert result["loss"] == pytest.approx(math.log(vocab))
    assert result["perplexity"] == pytest.approx(vocab)


def test_lm_loss_is_shifted_and_masked():
    # Two classes; position 0 predicts token 1 with p = 3/4, position 1 predicts token 0 with p = 1/2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    loss_sum, count, _ = lm_loss_sums(logits, labels).tolist()
    assert count == 2
    assert loss_sum == pytest.approx(-math.log(0.75) - math.log(0.5))
    assert lm_metrics(loss_sum, count)["perplexity"] == pytest.approx(math.exp(loss_sum / 2))
    with pytest.raises(ValueError, match="no scored tokens"):
        lm_metrics(0.0, 0)


def test_lm_token_accuracy_from_16_bit_logits():
    """Token accuracy counts scored positions whose argmax is the next token; bf16 logits are reduced
    without a full fp32 copy and give the fp32 result up to bf16 rounding of the logits."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 2, 2]])  # position 0 predicts 0 (right), 1 predicts 1 (wrong), 2 predicts 2 (right)
    sums = lm_loss_sums(logits, labels)
    assert sums.dtype == torch.float64 and sums[1:].tolist() == [3, 2]
    metrics = lm_metrics(*sums.tolist())
    assert metrics["token_accuracy"] == pytest.approx(2 / 3)
    assert torch.allclose(lm_loss_sums(logits.bfloat16(), labels), sums, rtol=1e-2)
