"""Reading data files into `datasets.Dataset`s: the official GLUE TSV layouts, the user's CSV/TSV/JSON(L)
files (text columns and labels inferred or named) and causal-LM prompt/answer JSON lines."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any

import datasets

from .tasks import TaskSpec


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
