"""Datasets for fine-tuning: GLUE tasks, user CSV/JSON files and causal-LM prompt/answer data.

Everything is loaded with the `datasets` library and ends up in one shape, whatever the source:

    dsdict, spec = load_task_datasets(task_name="sst2", data_dir="data/sst2")
    tokenized = tokenize_dataset(dsdict, tokenizer, spec, max_seq_length=128)
    loader = DataLoader(tokenized["train"], batch_size=16, collate_fn=collate_fn(tokenizer))

* `load_task_datasets` returns a `DatasetDict` with a "train" split and one split per name in
  `spec.eval_splits`, using the Hugging Face hub's GLUE column names (sentence / sentence1,sentence2 /
  premise,hypothesis / question,sentence / question1,question2, plus `label` and `idx`) and integer labels
  in the hub's order (`spec.label_names`); regression labels are floats, causal-LM data has prompt/answer.
* `tokenize_dataset` keeps only the model inputs (`input_ids`, `attention_mask`, and `token_type_ids`
  when the tokenizer produces them) and `labels`. By default sequences are NOT padded: `collate_fn`
  pads each batch to its longest sequence (dynamic padding). With `pad_to_max_length=True` every
  sequence is padded to `max_seq_length` already and the collator only stacks.
* Every check raises ValueError / FileNotFoundError saying what was found, what was expected, and
  how to fix it; docs/data.md lists the accepted formats.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import datasets
import torch

logger = logging.getLogger(__name__)

TASK_KINDS = ("classification", "regression", "causal_lm")
LABEL_PAD_ID = -100  # ignored by torch.nn.CrossEntropyLoss (its default ignore_index)


@dataclass(frozen=True)
class TaskSpec:
    """What a task's data looks like and how it is scored.

    `label_names[i]` is the name of integer label i (None when labels are plain integers or floats).
    `num_labels` is 1 for regression and 0 for causal_lm. `eval_splits` names the DatasetDict splits
    evaluated during training (MNLI has two). `metrics` are names understood by
    `meft_ds.metrics.compute_metrics`.
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


# ---------------------------------------------------------------------------------------------------
# Local GLUE TSV layout (the files written by the GLUE benchmark's download script)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GlueTsvLayout:
    """Where a GLUE task's fields sit in its TSV files.

    `columns` maps the hub column name to the file's column name; `label_values` maps a label as written
    in the file to the hub's integer id (None for STS-B, whose score is a float).
    """

    files: dict[str, str]
    columns: dict[str, str]
    label_column: str
    label_values: dict[str, int] | None
    headerless_names: tuple[str, ...] | None = None  # CoLA's train/dev files have no header line


def _ids(*values):
    return {value: i for i, value in enumerate(values)}


_SINGLE_DEV = {"train": "train.tsv", "validation": "dev.tsv"}
_GLUE_TSV_LAYOUTS: dict[str, _GlueTsvLayout] = {
    # CoLA: source code, acceptability 0/1, the author's original mark ("*" or empty), sentence.
    "cola": _GlueTsvLayout(
        _SINGLE_DEV, {"sentence": "sentence"}, "label", _ids("0", "1"),
        headerless_names=("source", "label", "original_label", "sentence"),
    ),
    "sst2": _GlueTsvLayout(_SINGLE_DEV, {"sentence": "sentence"}, "label", _ids("0", "1")),
    # MRPC header: Quality, #1 ID, #2 ID, #1 String, #2 String.
    "mrpc": _GlueTsvLayout(
        _SINGLE_DEV, {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", _ids("0", "1")
    ),
    # QQP header: id, qid1, qid2, question1, question2, is_duplicate.
    "qqp": _GlueTsvLayout(
        _SINGLE_DEV, {"question1": "question1", "question2": "question2"}, "is_duplicate", _ids("0", "1")
    ),
    # STS-B header: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score.
    "stsb": _GlueTsvLayout(_SINGLE_DEV, {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", None),
    # MNLI header: index, promptID, pairID, genre, sentence{1,2}_binary_parse, sentence{1,2}_parse,
    # sentence1, sentence2, label1, [label2..label5 in dev files,] gold_label.
    "mnli": _GlueTsvLayout(
        {
            "train": "train.tsv",
            "validation_matched": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
        },
        {"premise": "sentence1", "hypothesis": "sentence2"},
        "gold_label",
        _ids("entailment", "neutral", "contradiction"),
    ),
    # QNLI header: index, question, sentence, label.
    "qnli": _GlueTsvLayout(
        _SINGLE_DEV, {"question": "question", "sentence": "sentence"}, "label", _ids("entailment", "not_entailment")
    ),
    # RTE and WNLI header: index, sentence1, sentence2, label. WNLI writes 1 for entailment.
    "rte": _GlueTsvLayout(
        _SINGLE_DEV, {"sentence1": "sentence1", "sentence2": "sentence2"}, "label",
        _ids("entailment", "not_entailment"),
    ),
    "wnli": _GlueTsvLayout(
        _SINGLE_DEV, {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", _ids("0", "1")
    ),
}


def _read_header(path: str, delimiter: str, quoting: int) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: MRPC's header may start with a BOM
        row = next(csv.reader(handle, delimiter=delimiter, quoting=quoting), None)
    if not row:
        raise ValueError(f"{path} is empty; expected a header line naming its columns")
    return [name.strip() for name in row]


def _read_delimited(
    path: str, delimiter: str, quoting: int, column_names: tuple[str, ...] | None = None, cache_dir=None
) -> datasets.Dataset:
    """One delimited file as a Dataset whose every column is a string, exactly as written.

    Every column is declared a string (pandas then reads it as object, unparsed) and NA detection is
    off, so a sentence like "null" or "007" stays text and a label keeps its spelling; labels are
    converted (and checked) afterwards.
    """
    names = list(column_names) if column_names is not None else _read_header(path, delimiter, quoting)
    return datasets.load_dataset(
        "csv",
        data_files={"train": path},
        split="train",
        delimiter=delimiter,
        quoting=quoting,
        header=None if column_names is not None else 0,
        column_names=names,
        index_col=False,  # a row with a field too many must not shift every column into a pandas index
        on_bad_lines="error",
        keep_default_na=False,
        na_filter=False,
        encoding="utf-8-sig",
        features=datasets.Features({name: datasets.Value("string") for name in names}),
        cache_dir=cache_dir,
    )


def _load_glue_tsv_split(path: str, spec: TaskSpec, layout: _GlueTsvLayout, cache_dir=None) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{spec.task_name}: missing {path}; a GLUE data_dir holds {', '.join(layout.files.values())} "
            "as written by the GLUE download script (or omit data_dir to download the task from the hub)."
        )
    if layout.headerless_names is not None:
        with open(path, encoding="utf-8") as handle:
            first_fields = handle.readline().rstrip("\n").split("\t")
        if len(first_fields) != len(layout.headerless_names):
            raise ValueError(
                f"{path}: found {len(first_fields)} tab-separated fields in the first line, expected the "
                f"{len(layout.headerless_names)} headerless {spec.task_name} columns "
                f"{list(layout.headerless_names)} (the official GLUE layout)."
            )
        raw = _read_delimited(path, "\t", csv.QUOTE_NONE, layout.headerless_names, cache_dir)
    else:
        raw = _read_delimited(path, "\t", csv.QUOTE_NONE, cache_dir=cache_dir)
    needed = [*layout.columns.values(), layout.label_column]
    missing = [name for name in needed if name not in raw.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; found {raw.column_names}, expected the official GLUE "
            f"{spec.task_name} header with {needed}."
        )

    def convert(batch, indices):
        out = {hub: batch[source] for hub, source in layout.columns.items()}
        out["label"] = [_parse_glue_label(v, layout, spec, path, i) for v, i in zip(batch[layout.label_column], indices)]
        out["idx"] = indices
        return out

    features = datasets.Features(
        {name: datasets.Value("string") for name in layout.columns}
        | {"label": _label_feature(spec), "idx": datasets.Value("int32")}
    )
    return raw.map(
        convert, batched=True, with_indices=True, remove_columns=raw.column_names, features=features,
        desc=f"{spec.task_name}: GLUE columns",
    )


def _parse_glue_label(value: str, layout: _GlueTsvLayout, spec: TaskSpec, path: str, row: int):
    value = value.strip()
    if layout.label_values is None:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{path}, data row {row}: label {value!r} is not a number ({spec.task_name} scores are floats)") from None
    if value not in layout.label_values:
        raise ValueError(
            f"{path}, data row {row}: label {value!r} is not one of the {spec.task_name} labels "
            f"{list(layout.label_values)}"
        )
    return layout.label_values[value]


def _label_feature(spec: TaskSpec):
    if spec.is_regression:
        return datasets.Value("float32")
    if spec.label_names is not None:
        return datasets.ClassLabel(names=list(spec.label_names))
    return datasets.Value("int64")


# ---------------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------------

# Tried in order when the caller names no text columns: the GLUE pair names, then single columns.
_TEXT_COLUMN_CANDIDATES = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)
_USER_FILE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")


def _load_user_file(path: str, split: str, cache_dir=None) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{split} file {path} does not exist; pass an existing .csv, .tsv, .json or .jsonl file")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        return _read_delimited(path, ",", csv.QUOTE_MINIMAL, cache_dir=cache_dir)
    if extension == ".tsv":
        return _read_delimited(path, "\t", csv.QUOTE_NONE, cache_dir=cache_dir)
    if extension in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files={"train": path}, split="train", cache_dir=cache_dir)
    raise ValueError(f"{path}: unsupported file type {extension!r}; use one of {', '.join(_USER_FILE_EXTENSIONS)}")


def _require_columns(ds: datasets.Dataset, columns, where: str, hint: str = ""):
    missing = [name for name in columns if name not in ds.column_names]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; found {ds.column_names}, expected {list(columns)}.{hint}"
        )


def _infer_text_columns(ds: datasets.Dataset, where: str) -> tuple[str, ...]:
    for candidate in _TEXT_COLUMN_CANDIDATES:
        if all(name in ds.column_names for name in candidate):
            return candidate
    raise ValueError(
        f"{where}: no text column found among {ds.column_names}; expected one of "
        f"{[list(c) for c in _TEXT_COLUMN_CANDIDATES]} or pass text_columns=(...) naming one or two columns."
    )


def _as_number(value: Any):
    """int, float, or None when `value` is not a number (a JSON number, or a CSV string spelling one)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    return None


def _label_kind(values: list, where: str) -> str:
    """"int", "float" or "str": floats (3.5, or 1.0 written as a float) mean regression."""
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        row = next(i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip()))
        raise ValueError(f"{where}: row {row} has no label; every row needs a value in the label column")
    numbers = [_as_number(v) for v in values]
    if all(n is not None for n in numbers):
        return "int" if all(isinstance(n, int) for n in numbers) else "float"
    return "str"


def _user_spec(dsdict: datasets.DatasetDict, task_name: str, text_columns, label_column: str) -> TaskSpec:
    train = dsdict["train"]
    where = f"train file ({task_name})"
    if text_columns is None:
        text_columns = _infer_text_columns(train, where)
    text_columns = tuple(text_columns)
    for split, ds in dsdict.items():
        _require_columns(ds, (*text_columns, label_column), f"{split} file")
    kinds = {split: _label_kind(ds[label_column], f"{split} file") for split, ds in dsdict.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"label types differ between files: {kinds}; write labels the same way in every file")
    kind = kinds["train"]
    eval_splits = tuple(split for split in dsdict if split != "train")
    if kind == "float":
        return TaskSpec(task_name, "regression", text_columns, label_column, None, 1, eval_splits, ("pearson", "spearmanr"))
    if kind == "str":
        label_names = tuple(sorted({str(v).strip() for v in train[label_column]}))
        num_labels = len(label_names)
    else:
        values = [_as_number(v) for ds in dsdict.values() for v in ds[label_column]]
        if min(values) < 0:
            raise ValueError(f"integer labels must be 0..num_labels-1; found {min(values)} in column {label_column!r}")
        label_names = None
        num_labels = max(values) + 1
    if num_labels < 2:
        raise ValueError(
            f"classification needs at least two labels; column {label_column!r} only holds {label_names or [0]}"
        )
    metrics = ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    return TaskSpec(task_name, "classification", text_columns, label_column, label_names, num_labels, eval_splits, metrics)


def _convert_user_labels(ds: datasets.Dataset, spec: TaskSpec, split: str, path: str, accept_ids: bool) -> datasets.Dataset:
    """Keep the text columns (as strings) and a `label` column of the spec's type: float for regression,
    class ids for classification (label names map through spec.label_names; with `accept_ids` integer ids
    0..num_labels-1 are accepted as well)."""
    name_to_id = {name: i for i, name in enumerate(spec.label_names or ())}
    allowed = list(spec.label_names or []) + ([f"0..{spec.num_labels - 1}"] if accept_ids or not name_to_id else [])

    def to_label(value, row):
        if spec.is_regression:
            number = _as_number(value)
            if number is None or not math.isfinite(number):
                raise ValueError(f"{split} file {path}, row {row}: label {value!r} is not a finite number (regression)")
            return float(number)
        if isinstance(value, str) and value.strip() in name_to_id:
            return name_to_id[value.strip()]
        number = _as_number(value)
        if (accept_ids or not name_to_id) and isinstance(number, int) and 0 <= number < spec.num_labels:
            return number
        raise ValueError(f"{split} file {path}, row {row}: label {value!r} is not one of the task's labels {allowed}")

    def convert(batch, indices):
        out = {}
        for name in spec.text_columns:
            missing = next((i for v, i in zip(batch[name], indices) if v is None), None)
            if missing is not None:
                raise ValueError(f"{split} file {path}, row {missing}: no text in column {name!r}")
            out[name] = [str(v) for v in batch[name]]
        out["label"] = [to_label(v, i) for v, i in zip(batch[spec.label_column], indices)]
        return out

    features = datasets.Features(
        {name: datasets.Value("string") for name in spec.text_columns} | {"label": _label_feature(spec)}
    )
    return ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                  desc=f"{split}: labels")


def _load_lm_files(files: dict[str, str], task_name: str, cache_dir=None) -> tuple[datasets.DatasetDict, TaskSpec]:
    dsdict = datasets.DatasetDict()
    for split, path in files.items():
        ds = _load_user_file(path, split, cache_dir)
        _require_columns(ds, ("prompt", "answer"), f"{split} file {path}",
                         " Causal-LM data is JSON lines like {\"prompt\": \"...\", \"answer\": \"...\"}.")
        for column in ("prompt", "answer"):
            values = ds[column]
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"{split} file {path}, row {bad}: {column!r} must be a string, got {values[bad]!r}")
        empty = next((i for i, v in enumerate(ds["answer"]) if not v.strip()), None)
        if empty is not None:
            raise ValueError(f"{split} file {path}, row {empty}: empty answer; the loss is computed on answer tokens only")
        dsdict[split] = ds.select_columns(["prompt", "answer"])
    eval_splits = tuple(split for split in dsdict if split != "train")
    spec = TaskSpec(task_name, "causal_lm", ("prompt", "answer"), "answer", None, 0, eval_splits, ("loss", "perplexity"))
    return dsdict, spec


# ---------------------------------------------------------------------------------------------------
# Public loading API
# ---------------------------------------------------------------------------------------------------


def load_task_datasets(
    task_name: str | None = None,
    data_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    lm: bool = False,
    text_columns: tuple[str, ...] | None = None,
    label_column: str = "label",
    cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, TaskSpec]:
    """Load a task's splits and describe them. Exactly one source is used:

    * `task_name` alone: the GLUE task from the hub (`datasets.load_dataset("nyu-mll/glue", task)`);
      the unlabelled test splits are dropped.
    * `task_name` + `data_dir`: the task's files in the official GLUE TSV layout (train.tsv, dev.tsv;
      MNLI dev_matched.tsv + dev_mismatched.tsv; CoLA without header), mapped to the hub's columns/labels.
    * `train_file` (+ optional `validation_file`): the user's .csv/.tsv/.json/.jsonl files. Text columns
      are `text_columns` or the first found of sentence1+sentence2, premise+hypothesis, question1+question2,
      question+sentence, sentence, text; labels in `label_column` are integers 0..K-1, names (ids follow
      sorted order) or floats (regression). A GLUE `task_name` here means "use that task's spec"; any
      other name is just the run's label ("custom" when None). Without a validation file
      `spec.eval_splits` is empty.
    * `lm=True` + `train_file` (+ `validation_file`): causal-LM data, JSON lines with string fields
      `prompt` and `answer`.

    Returns (DatasetDict with "train" and each of spec.eval_splits, TaskSpec). Raises FileNotFoundError
    for missing files/directories and ValueError for unknown tasks, missing columns or bad labels.
    """
    if data_dir is not None and train_file is not None:
        raise ValueError("pass either data_dir (GLUE TSV layout) or train_file/validation_file, not both")
    if validation_file is not None and train_file is None:
        raise ValueError("validation_file needs a train_file as well")

    if lm:
        if train_file is None:
            raise ValueError("lm=True reads JSON lines with prompt/answer fields: pass train_file (and validation_file)")
        files = {"train": train_file} | ({"validation": validation_file} if validation_file else {})
        return _load_lm_files(files, task_name or "lm", cache_dir)

    if train_file is not None:
        files = {"train": train_file} | ({"validation": validation_file} if validation_file else {})
        raw = datasets.DatasetDict({split: _load_user_file(path, split, cache_dir) for split, path in files.items()})
        glue_key = task_name.lower().replace("-", "").replace("_", "") if task_name else None
        if glue_key in GLUE_TASKS:
            spec = dataclasses.replace(GLUE_TASKS[glue_key], eval_splits=tuple(s for s in raw if s != "train"))
            for split, ds in raw.items():
                _require_columns(ds, (*spec.text_columns, spec.label_column), f"{split} file {files[split]}",
                                 f" With task_name={task_name!r} user files use the hub's GLUE column names.")
        else:
            spec = _user_spec(raw, task_name or "custom", text_columns, label_column)
        dsdict = datasets.DatasetDict(
            {split: _convert_user_labels(ds, spec, split, files[split], accept_ids=glue_key in GLUE_TASKS)
             for split, ds in raw.items()}
        )
        spec = dataclasses.replace(spec, label_column="label")
        validate_dataset(dsdict, spec)
        return dsdict, spec

    if task_name is None and data_dir is not None:
        raise ValueError(f"data_dir {data_dir} needs task_name: the GLUE TSV layout differs per task "
                         f"({', '.join(GLUE_TASKS)})")
    if task_name is None:
        raise ValueError("nothing to load: pass task_name (GLUE, from the hub or with data_dir), or train_file, "
                         "or lm=True with train_file")
    spec = get_task_spec(task_name)
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data_dir {data_dir} is not a directory; it should hold the GLUE {spec.task_name} TSV files")
        layout = _GLUE_TSV_LAYOUTS[spec.task_name]
        dsdict = datasets.DatasetDict(
            {split: _load_glue_tsv_split(os.path.join(data_dir, name), spec, layout, cache_dir)
             for split, name in layout.files.items()}
        )
    else:
        try:
            hub = datasets.load_dataset(HUB_GLUE_DATASET, spec.task_name, cache_dir=cache_dir)
        except OSError as error:  # ConnectionError offline (HF_HUB_OFFLINE=1 too), requests' network errors
            if isinstance(error, FileNotFoundError):
                raise
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"task {spec.task_name!r} alone means the GLUE data from the hub ({HUB_GLUE_DATASET}), which could "
                f"not be fetched ({first_line}); offline, pass --data_dir with the task's GLUE TSV files "
                "(or --train_file).") from None
        dsdict = datasets.DatasetDict({split: hub[split] for split in ("train", *spec.eval_splits)})
    validate_dataset(dsdict, spec)
    return dsdict, spec


def validate_dataset(dsdict: datasets.DatasetDict, spec: TaskSpec) -> None:
    """Check that every split `tokenize_dataset` will read has the spec's columns and valid labels.

    Raises ValueError naming the split, the columns found and expected, or the first bad label.
    """
    for split in ("train", *spec.eval_splits):
        if split not in dsdict:
            raise ValueError(f"split {split!r} missing; found splits {list(dsdict)}, the {spec.task_name} spec needs {['train', *spec.eval_splits]}")
    for split, ds in dsdict.items():
        columns = spec.text_columns if spec.is_causal_lm else (*spec.text_columns, spec.label_column)
        _require_columns(ds, columns, f"{spec.task_name} split {split!r}")
        if spec.kind != "classification":
            continue
        labels = ds[spec.label_column]
        bad = next((i for i, v in enumerate(labels) if not isinstance(v, int) or not 0 <= v < spec.num_labels), None)
        if bad is not None:
            raise ValueError(
                f"{spec.task_name} split {split!r}, row {bad}: label {labels[bad]!r} is outside the task's label ids "
                f"0..{spec.num_labels - 1}" + (f" ({list(spec.label_names)})" if spec.label_names else "")
            )


# ---------------------------------------------------------------------------------------------------
# Tokenization and batching
# ---------------------------------------------------------------------------------------------------


def _model_input_names(tokenizer) -> list[str]:
    names = getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in names or n == "input_ids"]


def tokenize_dataset(
    dsdict: datasets.DatasetDict,
    tokenizer,
    spec: TaskSpec,
    max_seq_length: int,
    pad_to_max_length: bool = False,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize every split into `input_ids`, `attention_mask` (+ `token_type_ids` when the tokenizer
    makes them, e.g. BERT) and `labels`; all other columns are removed.

    * classification: `labels` is the int class id; regression: float32.
    * causal_lm: the text is prompt + answer (joined by one space unless the prompt ends with, or the
      answer starts with, whitespace) + EOS. `labels` copies `input_ids` with -100 on prompt and special
      tokens, so the loss covers only the answer and EOS (padding gets -100 in `collate_fn`). The whole
      text is tokenized once (the tokens the model will see) and answer tokens, those covering any
      character after the prompt, are found from character offsets, so a fast tokenizer is required. Sequences longer than
      `max_seq_length` are cut at the right; examples left with no answer token are dropped (logged).

    Sequences are truncated to `max_seq_length` and left unpadded (use `collate_fn`) unless
    `pad_to_max_length=True`. Raises ValueError on a bad max_seq_length, a tokenizer without EOS (LM),
    without a pad token when padding classification inputs here, or data that fails `validate_dataset`.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    validate_dataset(dsdict, spec)
    if pad_to_max_length and tokenizer.pad_token is None and not spec.is_causal_lm:
        raise ValueError("pad_to_max_length=True needs tokenizer.pad_token (e.g. tokenizer.pad_token = "
                         "tokenizer.eos_token), or leave padding to collate_fn, which falls back to EOS")
    input_names = _model_input_names(tokenizer)

    if spec.is_causal_lm:
        return _tokenize_lm(dsdict, tokenizer, max_seq_length, pad_to_max_length, num_proc, input_names)

    def encode(batch):
        texts = [batch[name] for name in spec.text_columns]
        enc = tokenizer(
            *texts, truncation=True, max_length=max_seq_length,
            padding="max_length" if pad_to_max_length else False,
        )
        out = {name: enc[name] for name in input_names if name in enc}
        out["labels"] = batch[spec.label_column]
        return out

    label_type = datasets.Value("float32") if spec.is_regression else datasets.Value("int64")
    tokenized = datasets.DatasetDict()
    for split, ds in dsdict.items():
        mapped = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                        desc=f"tokenizing {split}")
        features = mapped.features.copy()
        features["labels"] = label_type
        tokenized[split] = mapped.cast(features)
    return tokenized


def _tokenize_lm(dsdict, tokenizer, max_seq_length, pad_to_max_length, num_proc, input_names):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("causal-LM tokenization finds answer tokens by character offsets and needs a fast "
                         "tokenizer: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token, which ends every answer; set tokenizer.eos_token first")
    pad_id = _pad_token_id(tokenizer)
    names = [n for n in input_names if n != "token_type_ids"]  # one segment: decoder LMs take no token types

    def encode_one(prompt: str, answer: str):
        joiner = "" if (not prompt or prompt[-1].isspace() or answer[:1].isspace()) else " "
        enc = tokenizer(prompt + joiner + answer, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        # A token is supervised when it covers any character after the prompt. Byte-level BPE (GPT-2,
        # OPT) and SentencePiece (LLaMA) fold the joining space into the first answer token, whose
        # offsets then start inside the joiner, so "starts at the answer" would miss it.
        labels = [
            token if not special and end > len(prompt) else LABEL_PAD_ID
            for token, (_, end), special in zip(ids, enc["offset_mapping"], enc["special_tokens_mask"])
        ]
        if ids[-1] == eos_id:  # the tokenizer already ends with EOS (e.g. add_eos_token): learn it
            labels[-1] = eos_id
        else:
            ids.append(eos_id)
            labels.append(eos_id)
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        mask = [1] * len(ids)
        if pad_to_max_length:
            pad = max_seq_length - len(ids)
            ids, mask, labels = ids + [pad_id] * pad, mask + [0] * pad, labels + [LABEL_PAD_ID] * pad
        return ids, mask, labels

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, answer in zip(batch["prompt"], batch["answer"]):
            ids, mask, labels = encode_one(prompt, answer)
            out["input_ids"].append(ids)
            out["attention_mask"].append(mask)
            out["labels"].append(labels)
        return {name: out[name] for name in (*names, "labels")}

    tokenized = datasets.DatasetDict()
    for split, ds in dsdict.items():
        mapped = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                        desc=f"tokenizing {split}")
        kept = mapped.filter(lambda labels: any(t != LABEL_PAD_ID for t in labels), input_columns="labels")
        if len(kept) < len(mapped):
            logger.warning("%s: dropped %d of %d examples whose answer does not fit in max_seq_length=%d",
                           split, len(mapped) - len(kept), len(mapped), max_seq_length)
        tokenized[split] = kept
    return tokenized


def _pad_token_id(tokenizer) -> int:
    """The pad id; decoder tokenizers without one (LLaMA) pad with EOS, which the attention mask hides."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token first")


@dataclass
class PaddingCollator:
    """Pads a list of tokenized examples into a batch of tensors.

    input_ids get the tokenizer's pad id (EOS when it has none), attention_mask and token_type_ids 0,
    per-token labels (causal LM) -100. Scalar labels become int64 (classification) or float32
    (regression) tensors. Padding goes on `padding_side` ("right" or "left"). A plain class rather than
    a closure, so DataLoader worker processes can pickle it.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": LABEL_PAD_ID}
        batch = {}
        for name in examples[0]:
            values = [example[name] for example in examples]
            if name == "labels" and not isinstance(values[0], (list, tuple)):
                is_float = isinstance(values[0], float)
                batch[name] = torch.tensor(values, dtype=torch.float32 if is_float else torch.long)
                continue
            if name not in pad_values:
                raise ValueError(f"cannot pad column {name!r}; tokenize_dataset keeps only {list(pad_values)}")
            rows = []
            for row in values:
                padding = [pad_values[name]] * (longest - len(row))
                rows.append(padding + list(row) if self.padding_side == "left" else list(row) + padding)
            batch[name] = torch.tensor(rows, dtype=torch.long)
        return batch


def collate_fn(tokenizer, pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """The batch collator for `tokenize_dataset` output: dynamic padding to the batch's longest sequence
    (a no-op on length when the data was tokenized with pad_to_max_length=True), on the tokenizer's
    padding side. Raises ValueError when the tokenizer has neither a pad nor an EOS token."""
    return PaddingCollator(_pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right",
                           pad_to_multiple_of)
