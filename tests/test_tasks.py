"""The task contract: local files and the Hub give the same examples; bad rows name file:line."""

import datasets
import pytest

import tasks
from lorabench.registry import UnknownNameError
from tasks import DataError
from tests.helpers import minilm_tokenizer, shared_data, write_sst2


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownNameError, match="known tasks: .*sst2"):
        tasks.get("sst3")


def test_sst2_local_matches_hub_columns_and_tokens(tmp_path, monkeypatch):
    tokenizer = minilm_tokenizer()
    rows = ['it \'s a "charming" journey \t1', "hide new secretions \t0"]
    folder = write_sst2(tmp_path, rows, rows[:1])
    task = tasks.get("sst2")
    local = task.load(str(folder), "local")
    # What nyu-mll/glue serves: columns sentence/label/idx, label a ClassLabel.
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    hub_train = datasets.Dataset.from_dict({"sentence": [r.split("\t")[0] for r in rows], "label": [1, 0], "idx": [0, 1]}, features=features)
    hub = {"train": hub_train, "validation": hub_train.select([0])}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    from_hub = task.load(data_source="hub")
    assert local["train"].column_names == from_hub["train"].column_names == ["sentence", "label"]
    assert task.encode(tokenizer, local["train"], 32) == task.encode(tokenizer, from_hub["train"], 32)
    assert local["train"]["sentence"][0] == 'it \'s a "charming" journey '  # quotes are literal
    assert task.encode(tokenizer, local["eval"], 32)[0]["labels"] == 1


def test_auto_source_uses_local_when_data_dir_set(tmp_path, monkeypatch):
    folder = write_sst2(tmp_path, ["good\t1"], ["bad\t0"])
    monkeypatch.setenv("LORABENCH_DATA", str(folder))
    assert tasks.get("sst2").load()["eval"]["label"][0] == 0


@pytest.mark.parametrize(
    "row, message",
    [("only one field", r"train.tsv:3: expected 2 tab-separated fields"),
     ("sentence\t7", r"train.tsv:3: label '7' is not valid here \(one of"),
     ("a\tb\tc", r"train.tsv:3: expected 2")],
)
def test_malformed_row_names_file_and_line(tmp_path, row, message):
    folder = write_sst2(tmp_path, ["fine\t1", row], ["ok\t1"])
    with pytest.raises(DataError, match=message):
        tasks.get("sst2").load(str(folder), "local")


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="LORABENCH_DATA"):
        tasks.get("sst2").load(str(tmp_path), "local")


@pytest.mark.skipif(shared_data() is None, reason="no offline data: set LORABENCH_DATA")
def test_shared_sst2_has_official_sizes():
    splits = tasks.get("sst2").load(str(shared_data()), "local")
    assert (len(splits["train"]), len(splits["eval"])) == (67349, 872)
    assert set(splits["eval"]["label"]) == {0, 1}


def test_encoded_examples_are_cached_under_what_they_depend_on(tmp_path, monkeypatch):
    task, tokenizer = tasks.get("sst2"), minilm_tokenizer()
    split = datasets.Dataset.from_dict({"sentence": ["a charming journey", "dull and long"], "label": [1, 0]})
    fresh = task.encode(tokenizer, split, 16, "head")
    assert tasks.encode_cached(task, tokenizer, split, 16, "head", tmp_path) == fresh
    assert len(list(tmp_path.glob("sst2-*.json"))) == 1

    def no_encoding(*args):
        raise AssertionError("encoded again, not read from the cache")

    monkeypatch.setattr(task, "encode", no_encoding)
    assert tasks.encode_cached(task, tokenizer, split, 16, "head", tmp_path) == fresh  # read back
    monkeypatch.undo()
    shorter = tasks.encode_cached(task, tokenizer, split, 3, "head", tmp_path)  # another max_length: another entry
    other = tasks.encode_cached(task, tokenizer, split.map(lambda row: {"label": 1 - row["label"]}), 16, "head", tmp_path)
    assert len(list(tmp_path.glob("sst2-*.json"))) == 3
    assert all(len(example["input_ids"]) <= 3 for example in shorter) and [e["labels"] for e in other] == [0, 1]
