"""GLUE (Wang et al. 2018, arXiv:1804.07461): SST-2.

Hub: ``nyu-mll/glue`` (config per task). Local: the TSV files of GLUE's own
``download_glue_data.py`` under ``<data_dir>/glue/<TASK>/``, read with quoting off (quotes
inside sentences are literal). Scores are reported on the dev set (GLUE's test labels are
hidden); a validation set for selection is carved out of train by the engine.
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
from sklearn.metrics import accuracy_score

from tasks import DataError, Task


def accuracy(predictions, labels) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, predictions))}


def read_tsv(path: Path, columns: dict[str, str], labels: dict[str, int]) -> datasets.Dataset:
    """Read a GLUE TSV with a header row; ``columns`` maps output column -> header name.

    Every row must have as many fields as the header and a known label, else the error names
    the file and the line.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found; point data_dir (or LORABENCH_DATA) at a folder holding glue/")
    out: dict[str, list] = {column: [] for column in columns}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file")
        missing = [name for name in columns.values() if name not in header]
        if missing:
            raise DataError(f"{path}:1: header {header} lacks columns {missing}")
        index = {column: header.index(name) for column, name in columns.items()}
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} tab-separated fields {header}, got {len(row)}")
            for column, position in index.items():
                value = row[position]
                if column == "label":
                    if value not in labels:
                        raise DataError(f"{path}:{line}: label {value!r} is not one of {sorted(labels)}")
                    value = labels[value]
                out[column].append(value)
    return datasets.Dataset.from_dict(out)


def sst2_local(data_dir: Path) -> dict[str, datasets.Dataset]:
    folder = data_dir / "glue" / "SST-2"
    columns = {"sentence": "sentence", "label": "label"}
    labels = {"0": 0, "1": 1}
    return {split: read_tsv(folder / f"{name}.tsv", columns, labels) for split, name in (("train", "train"), ("eval", "dev"))}


def sst2_hub() -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset("nyu-mll/glue", "sst2")
    return {split: loaded[name].select_columns(["sentence", "label"]) for split, name in (("train", "train"), ("eval", "validation"))}


TASKS = [
    Task(
        name="sst2",
        kind="classification",
        family="encoder",
        text_columns=("sentence",),
        label_column="label",
        num_labels=2,
        metrics=accuracy,
        primary="accuracy",
        load_hub=sst2_hub,
        load_local=sst2_local,
        local_layout="glue/SST-2/{train,dev}.tsv (header: sentence, label)",
        eval_split_name="dev",
    ),
]
