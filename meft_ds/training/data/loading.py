"""The public loading API: one task from the hub, a GLUE directory, user files or LM files, checked."""

from __future__ import annotations

import dataclasses
import os

import datasets

from .files import (_GLUE_TSV_LAYOUTS, _convert_user_labels, _load_glue_tsv_split, _load_lm_files, _load_user_file,
                    _require_columns, _user_spec)
from .tasks import GLUE_TASKS, HUB_GLUE_DATASET, TaskSpec, get_task_spec


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
