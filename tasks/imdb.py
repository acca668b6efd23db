"""IMDB movie-review sentiment (Maas et al. 2011, "Learning Word Vectors for Sentiment
Analysis", ACL; the Large Movie Review Dataset v1.0): 25,000 training and 25,000 test reviews,
half positive; accuracy on test.

Hub: ``stanfordnlp/imdb`` (``text``, ``label``: 0 negative, 1 positive). Local, two layouts
under ``<data_dir>/``: ``imdb/{train,test}.jsonl.gz`` (JSON lines with ``text`` and ``label``)
or the original release's ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``. Every source
is put in one canonical order (label, then text), so that the engine's seeded subsampling
picks the same reviews whichever source the data came from.

Reviews average about 300 tokens: they are cut at ``max_length`` (default 256 here), keeping
the head, or with ``truncation: head_tail`` the first quarter and the last three quarters
of the budget (Sun et al. 2019, arXiv:1905.05583, found head+tail best for IMDB).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from tasks import DataError, Task, column, read_text, text_lines
from tasks.glue import accuracy

LABELS = {"neg": 0, "pos": 1}


def canonical(dataset: datasets.Dataset) -> datasets.Dataset:
    """Sorted by (label, text): the same order from every source."""
    keys = list(zip(column(dataset, "label"), column(dataset, "text")))
    return dataset.select(sorted(range(len(keys)), key=keys.__getitem__))


def read_jsonl(path: Path) -> datasets.Dataset:
    texts, labels = [], []
    with text_lines(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(f"{path}:{line_number}: expected a JSON object with text and label ({error})") from None
            if label not in (0, 1) or not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: label {label!r} must be 0 or 1 and text a string")
            texts.append(text)
            labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def read_folders(split_dir: Path) -> datasets.Dataset:
    texts, labels = [], []
    for name, label in LABELS.items():
        folder = split_dir / name
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; the aclImdb layout needs {split_dir}/{{pos,neg}}/*.txt")
        for path in sorted(folder.glob("*.txt")):
            texts.append(read_text(path))
            labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def imdb_local(data_dir: Path) -> dict[str, datasets.Dataset]:
    if (data_dir / "imdb" / "train.jsonl.gz").is_file():
        splits = {split: read_jsonl(data_dir / "imdb" / f"{split}.jsonl.gz") for split in ("train", "test")}
    elif (data_dir / "aclImdb" / "train").is_dir():
        splits = {split: read_folders(data_dir / "aclImdb" / split) for split in ("train", "test")}
    else:
        raise DataError(f"{data_dir}: neither imdb/{{train,test}}.jsonl.gz nor aclImdb/{{train,test}}/{{pos,neg}}/ found; "
                        "point data_dir (or LORABENCH_DATA) at a folder holding one of them")
    return {"train": canonical(splits["train"]), "eval": canonical(splits["test"])}


def imdb_hub() -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset("stanfordnlp/imdb")
    plain = {split: loaded[split].select_columns(["text", "label"]).cast_column("label", datasets.Value("int64")) for split in ("train", "test")}
    return {"train": canonical(plain["train"]), "eval": canonical(plain["test"])}


TASKS = [
    Task(
        name="imdb",
        kind="classification",
        family="encoder",
        text_columns=("text",),
        label_column="label",
        num_labels=2,
        metrics=accuracy,
        primary="accuracy",
        load_hub=imdb_hub,
        load_local=imdb_local,
        local_layout="imdb/{train,test}.jsonl.gz or aclImdb/{train,test}/{pos,neg}/*.txt",
        eval_split_name="test",
        defaults={"max_length": 256},
    ),
]
