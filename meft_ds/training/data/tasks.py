"""What a task's data looks like and how it is scored: TaskSpec, and the GLUE tasks with the hub's columns
and label order."""

from __future__ import annotations

from dataclasses import dataclass

TASK_KINDS = ("classification", "regression", "causal_lm")
LABEL_PAD_ID = -100  # ignored by torch.nn.CrossEntropyLoss (its default ignore_index)


@dataclass(frozen=True)
class TaskSpec:
    """What a task's data looks like and how it is scored.

    `label_names[i]` is the name of integer label i (None when labels are plain integers or floats).
    `num_labels` is 1 for regression and 0 for causal_lm. `eval_splits` names the DatasetDict splits
    evaluated during training (MNLI has two). `metrics` are names understood by
    `meft_ds.training.metrics.compute_metrics`.
    """

    task_name: str
    kind: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    num_labels: int
    eval_splits: tuple[str, ...]
    metrics: tuple[str, ...]

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"TaskSpec.text_columns must name one or two columns, got {self.text_columns!r}")
        expected = {"regression": 1, "causal_lm": 0}.get(self.kind)
        if expected is not None and self.num_labels != expected:
            raise ValueError(f"a {self.kind} TaskSpec has num_labels={expected}, got {self.num_labels}")
        if self.kind == "classification" and self.num_labels < 2:
            raise ValueError(f"a classification TaskSpec needs num_labels >= 2, got {self.num_labels}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(f"label_names {self.label_names!r} do not match num_labels={self.num_labels}")

    @property
    def is_regression(self) -> bool:
        return self.kind == "regression"

    @property
    def is_causal_lm(self) -> bool:
        return self.kind == "causal_lm"


def _glue(name, text_columns, label_names, metrics, eval_splits=("validation",)):
    kind = "regression" if label_names is None else "classification"
    num_labels = 1 if label_names is None else len(label_names)
    return TaskSpec(name, kind, text_columns, "label", label_names, num_labels, eval_splits, metrics)


# Column names and label order are those of the hub's nyu-mll/glue configs.
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "sst2": _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    "qqp": _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr")),
    "mnli": _glue(
        "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}

HUB_GLUE_DATASET = "nyu-mll/glue"


def get_task_spec(task_name: str) -> TaskSpec:
    """The GLUE spec for a task name; case, '-' and '_' are ignored ("SST-2", "sts_b", "MNLI").

    Raises ValueError listing the known tasks when the name is not one of them.
    """
    key = task_name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(
            f"unknown task {task_name!r}; known GLUE tasks: {', '.join(GLUE_TASKS)}. "
            "For other data pass train_file/validation_file (CSV/JSON/JSONL) instead of a task name."
        )
    return GLUE_TASKS[key]
