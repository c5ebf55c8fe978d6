"""Evaluation metrics for the tasks in `meft_ds.training.data`, in plain numpy (no scipy/sklearn/evaluate).

    metrics = compute_metrics(spec, predictions, labels)   # {"accuracy": 0.91, ...}

Classification `predictions` may be logits / probabilities of shape (N, num_labels), which are
argmax-ed, or predicted class ids of shape (N,). Regression predictions are scores of shape (N,) or
(N, 1). Causal-LM predictions are logits (N, T, V) with the unshifted labels (N, T) that
`tokenize_dataset` produced (-100 = not scored); for evaluation over many batches accumulate
`lm_loss_sums` per batch (on the device) and call `lm_metrics` once, which is what `compute_metrics` does
for one batch.

Conventions (those of scikit-learn / scipy, so numbers compare with published GLUE results):
* f1 is the binary F1 of class 1 (MRPC "equivalent", QQP "duplicate"); 0 when it has no true or
  predicted positives.
* matthews_correlation is the multi-class MCC (Gorodkin's R_K); 0 when a marginal is constant.
* pearson / spearmanr are NaN when predictions or labels are constant (correlation is undefined);
  spearmanr ranks ties by their average rank.
* When a task has several metrics `combined_score` is their mean (the usual model-selection number).
* `constant_predictions: True` is added when every prediction is the same (a collapsed model).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import LABEL_PAD_ID, TaskSpec


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted == labels))


def f1_binary(predicted: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) of the positive class."""
    true_positive = np.sum((predicted == positive) & (labels == positive))
    false_positive = np.sum((predicted == positive) & (labels != positive))
    false_negative = np.sum((predicted != positive) & (labels == positive))
    denominator = 2 * true_positive + false_positive + false_negative
    return float(2 * true_positive / denominator) if denominator else 0.0


def matthews_corrcoef(predicted: np.ndarray, labels: np.ndarray) -> float:
    """MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) from the confusion matrix: c correct, s samples,
    t_k true and p_k predicted counts of class k (equals (TP TN - FP FN)/sqrt(...) for two classes)."""
    classes, encoded = np.unique(np.concatenate([labels, predicted]), return_inverse=True)
    true_ids, predicted_ids = encoded[: len(labels)], encoded[len(labels):]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_ids, predicted_ids), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, samples = np.trace(confusion), confusion.sum()
    numerator = correct * samples - true_counts @ predicted_counts
    denominator = math.sqrt((samples**2 - predicted_counts @ predicted_counts) * (samples**2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denominator) if denominator else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    run_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_ends = np.r_[run_starts[1:], len(values)]
    run_of_position = np.repeat(np.arange(len(run_starts)), run_ends - run_starts)
    mean_rank = (run_starts + run_ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run_of_position]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    return pearson(_average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64)))


def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[sum of token cross-entropies, number of scored tokens, number predicted right] for next-token
    prediction, as a float64 tensor of 3 on the logits' device (sum it over batches there; read it once).

    Position t's logits predict labels[t + 1] (the shift HF causal-LM models apply); labels equal to
    -100 (prompt, padding) are not scored. Only the scored positions' logits are upcast to fp32, so a
    batch of 16-bit full-vocabulary logits costs no fp32 copy of itself; nothing moves to the CPU.
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).to(logits.device)
    shifted_labels = labels[:, 1:].reshape(-1).long()
    scored = shifted_labels != LABEL_PAD_ID
    scored_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])[scored].float()
    targets = shifted_labels[scored]
    loss_sum = F.cross_entropy(scored_logits, targets, reduction="sum")
    correct = (scored_logits.argmax(dim=-1) == targets).sum()
    return torch.stack([loss_sum.double(), scored.sum().double(), correct.double()])


def lm_metrics(loss_sum: float, num_tokens: int, num_correct: int | None = None) -> dict[str, float]:
    """Mean token loss, perplexity = exp(loss) and (given num_correct) token accuracy from sums
    accumulated over batches (and ranks)."""
    if num_tokens <= 0:
        raise ValueError("no scored tokens: every label is -100, so loss and perplexity are undefined")
    loss = loss_sum / num_tokens
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "num_tokens": num_tokens}
    if num_correct is not None:
        metrics["token_accuracy"] = num_correct / num_tokens
    return metrics


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The metrics named in `spec.metrics` (plus `combined_score` when there are several).

    predictions: classification logits (N, C) or class ids (N,); regression scores (N,) or (N, 1);
    causal_lm logits (N, T, V). labels: class ids / scores (N,), or token labels (N, T) for causal_lm.
    Raises ValueError when shapes disagree or a metric name is unknown.
    """
    if spec.is_causal_lm:
        loss_sum, num_tokens, num_correct = lm_loss_sums(predictions, labels).tolist()
        return lm_metrics(loss_sum, int(num_tokens), int(num_correct))
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if spec.is_regression:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"{spec.task_name}: predictions of shape {predictions.shape} do not match labels of shape "
            f"{labels.shape}; expected (N, num_labels) logits or (N,) predictions for N labels"
        )
    functions = {
        "accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_corrcoef,
        "pearson": pearson, "spearmanr": spearman,
    }
    unknown = [name for name in spec.metrics if name not in functions]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(functions)}")
    results = {name: functions[name](predictions, labels) for name in spec.metrics}
    if len(results) > 1:
        results["combined_score"] = float(np.mean(list(results.values())))
    if len(predictions) > 1 and np.all(predictions == predictions[0]):
        # A collapsed model (one class for every example, or one score: pearson is NaN) must not pass for
        # a bad-but-working one: the flag goes into results.json and the trainer warns.
        results["constant_predictions"] = True
    return results
