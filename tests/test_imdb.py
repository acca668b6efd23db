"""IMDB: both local layouts and the Hub give the same examples; head+tail truncation."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

import tasks
from lorabench.run import ConfigError, resolve_hparams
from tests.helpers import minilm_tokenizer, shared_data

REVIEWS = [("A moving film.<br /><br />See it.", 1, 9), ("Dull, \"boring\" and long.", 0, 2), ("Great cast!", 1, 8), ("Awful.", 0, 1)]


def write_jsonl(root, rows=REVIEWS):
    folder = root / "imdb"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for i, (text, label, rating) in enumerate(rows):
                handle.write(json.dumps({"text": text, "label": label, "id": i, "rating": rating}) + "\n")
    return root


def write_folders(root):
    for split in ("train", "test"):
        for i, (text, label, rating) in enumerate(REVIEWS):
            folder = root / "aclImdb" / split / ("pos" if label else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    return root


def hub_like():
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    split = datasets.Dataset.from_dict({"text": [r[0] for r in REVIEWS[::-1]], "label": [r[1] for r in REVIEWS[::-1]]}, features=features)
    return {"train": split, "test": split, "unsupervised": split}


def test_both_layouts_and_the_hub_give_the_same_examples(tmp_path, monkeypatch):
    task, tokenizer = tasks.get("imdb"), minilm_tokenizer()
    from_jsonl = task.load(str(write_jsonl(tmp_path / "a")), "local")
    from_folders = task.load(str(write_folders(tmp_path / "b")), "local")
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub_like())
    from_hub = task.load(data_source="hub")
    for split in ("train", "eval"):
        encoded = [task.encode(tokenizer, source[split], 32) for source in (from_jsonl, from_folders, from_hub)]
        assert encoded[0] == encoded[1] == encoded[2]
        assert from_jsonl[split].column_names == from_hub[split].column_names == ["text", "label"]
    assert from_jsonl["train"]["label"] == [0, 0, 1, 1]


def test_a_bad_line_names_the_file_and_line(tmp_path):
    root = write_jsonl(tmp_path)
    with gzip.open(root / "imdb" / "train.jsonl.gz", "at", encoding="utf-8") as handle:
        handle.write('{"text": "x", "label": 3}\n')
    with pytest.raises(tasks.DataError, match=r"train.jsonl.gz:5: label 3 must be 0 or 1"):
        tasks.get("imdb").load(str(root), "local")


def test_missing_data_names_both_layouts(tmp_path):
    with pytest.raises(tasks.DataError, match=r"imdb/\{train,test\}.jsonl.gz nor aclImdb"):
        tasks.get("imdb").load(str(tmp_path), "local")


def test_head_tail_keeps_the_start_and_the_end(tmp_path):
    task, tokenizer = tasks.get("imdb"), minilm_tokenizer()
    words = [f"w{i}" for i in range(200)]
    dataset = datasets.Dataset.from_dict({"text": [" ".join(words)], "label": [1]})
    full = task.encode(tokenizer, dataset, 10_000)[0]["input_ids"]
    head = task.encode(tokenizer, dataset, 42)[0]["input_ids"]
    both = task.encode(tokenizer, dataset, 42, "head_tail")[0]["input_ids"]
    assert len(head) == len(both) == 42
    assert head == full[:41] + full[-1:]
    body = full[1:-1]  # [CLS] ... [SEP]
    assert both == full[:1] + body[:10] + body[-30:] + full[-1:]  # budget 40: a quarter head, the rest tail
    short = datasets.Dataset.from_dict({"text": ["short review"], "label": [0]})
    assert task.encode(tokenizer, short, 42, "head_tail") == task.encode(tokenizer, short, 42)


def test_head_tail_is_refused_for_sentence_pairs():
    with pytest.raises(ConfigError, match="head_tail for single-text classification only; rte is classification with 2"):
        resolve_hparams("rte", "lora", {"truncation": "head_tail"})
    assert resolve_hparams("imdb", "lora", {"truncation": "head_tail"})["max_length"] == 256


@pytest.mark.skipif(shared_data() is None, reason="no offline data: set LORABENCH_DATA")
def test_shared_copy_has_the_official_sizes():
    splits = tasks.get("imdb").load(str(shared_data()), "local")
    assert (len(splits["train"]), len(splits["eval"])) == (25000, 25000)
    assert sum(splits["eval"]["label"]) == 12500
