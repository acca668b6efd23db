"""GLUE (Wang et al. 2018, arXiv:1804.07461): all nine tasks.

Hub: ``nyu-mll/glue`` (one config per task). Local: the TSV files of GLUE's own
``download_glue_data.py`` under ``<data_dir>/glue/<FOLDER>/``, read with quoting off (quotes
inside sentences are literal) and a byte-order mark tolerated (MRPC's files start with one).
Both give the Hub's column names and label encoding. Scores are reported on the dev set
(GLUE's test labels are hidden); a validation set for selection is carved out of train by
the engine. MNLI is scored on matched and mismatched dev separately (its eval split holds
both, told apart by a ``group`` column).

Metrics, as GLUE defines them: CoLA Matthews correlation; MRPC and QQP accuracy and F1 of
the positive class; STS-B Pearson and Spearman correlation (a regression head); the others
accuracy.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets

from tasks import DataError, Task, text_lines


# scipy and sklearn are imported where a metric needs them: together they add two seconds to
# the start of every run, and SST-2's and IMDB's accuracy needs neither.
def accuracy(predictions, labels) -> dict[str, float]:
    return {"accuracy": sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)}


def accuracy_and_f1(predictions, labels) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {**accuracy(predictions, labels), "f1": float(f1_score(labels, predictions, pos_label=1, zero_division=0.0))}


def matthews(predictions, labels) -> dict[str, float]:
    from sklearn.metrics import matthews_corrcoef

    return {"matthews_corr": float(matthews_corrcoef(labels, predictions))}


def correlations(predictions, labels) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}


def read_tsv(path: Path, columns: dict[str, str | int], parse_label: Callable[[str], object], header: bool = True) -> datasets.Dataset:
    """Read a GLUE TSV; ``columns`` maps output column -> header name (or field index when the
    file has no header, as CoLA's). Every row must have as many fields as the first one and
    a parseable label, else the error names the file and the line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; point data_dir (or LORABENCH_DATA) at a folder holding glue/")
    out: dict[str, list] = {column: [] for column in columns}
    with text_lines(path) as lines:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            raise DataError(f"{path}: empty file")
        if header:
            missing = [name for name in columns.values() if name not in first]
            if missing:
                raise DataError(f"{path}:1: header {first} lacks columns {missing}")
            index = {column: first.index(name) for column, name in columns.items()}
            rows = reader
        else:
            index = dict(columns)
            rows = _chain_first(first, reader)
        width = len(first)
        for row in rows:
            line = reader.line_num
            if len(row) != width:
                raise DataError(f"{path}:{line}: expected {width} tab-separated fields, got {len(row)}")
            for column, position in index.items():
                value = row[position]
                if column == "label":
                    try:
                        value = parse_label(value)
                    except (KeyError, ValueError):
                        raise DataError(f"{path}:{line}: label {value!r} is not valid here ({parse_label.__doc__})") from None
                out[column].append(value)
    return datasets.Dataset.from_dict(out)


def _chain_first(first: list[str], reader):
    yield first
    yield from reader


def class_labels(names: dict[str, int]) -> Callable[[str], int]:
    def parse(value: str) -> int:
        return names[value]

    parse.__doc__ = f"one of {sorted(names)}"
    return parse


def score(value: str) -> float:
    """a number from 0 to 5"""
    number = float(value)
    if not 0.0 <= number <= 5.0:
        raise ValueError(value)
    return number


@dataclass(frozen=True)
class Glue:
    """One GLUE task: its Hub config and columns, and how its local files map onto them."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    local_columns: dict[str, str | int]  # Hub column (and "label") -> local header name or index
    parse_label: Callable[[str], object]
    num_labels: int
    metrics: Callable
    primary: str
    eval_splits: dict[str, tuple[str, str]]  # group -> (local file, Hub split); "" = no groups
    header: bool = True
    layout: str = ""

    def local(self, data_dir: Path) -> dict[str, datasets.Dataset]:
        folder = data_dir / "glue" / self.folder
        read = lambda file: read_tsv(folder / file, self.local_columns, self.parse_label, self.header)  # noqa: E731
        splits = {"train": read("train.tsv"), "eval": self._eval({group: read(file) for group, (file, _) in self.eval_splits.items()})}
        if self.num_labels == 1:  # the Hub stores STS-B scores as float32: round the same way
            splits = {name: split.cast_column("label", datasets.Value("float32")) for name, split in splits.items()}
        return splits

    def hub(self) -> dict[str, datasets.Dataset]:
        loaded = datasets.load_dataset("nyu-mll/glue", self.name)
        columns = [*self.text_columns, "label"]
        train = loaded["train"].select_columns(columns)
        splits = {group: loaded[split].select_columns(columns) for group, (_, split) in self.eval_splits.items()}
        return {"train": _plain_labels(train), "eval": self._eval({g: _plain_labels(s) for g, s in splits.items()})}

    def _eval(self, parts: dict[str, datasets.Dataset]) -> datasets.Dataset:
        if list(parts) == [""]:
            return parts[""]
        tagged = [part.add_column("group", [group] * len(part)) for group, part in parts.items()]
        return datasets.concatenate_datasets(tagged)

    def task(self) -> Task:
        return Task(
            name=self.name,
            kind="regression" if self.num_labels == 1 else "classification",
            family="encoder",
            text_columns=self.text_columns,
            label_column="label",
            num_labels=self.num_labels,
            metrics=self.metrics,
            primary=self.primary,
            load_hub=self.hub,
            load_local=self.local,
            local_layout=self.layout,
            eval_split_name="dev" if list(self.eval_splits) == [""] else "dev (" + ", ".join(self.eval_splits) + ")",
            group_column=None if list(self.eval_splits) == [""] else "group",
        )


def _plain_labels(dataset: datasets.Dataset) -> datasets.Dataset:
    """The Hub's ClassLabel feature as plain integers, as the local files give them."""
    return dataset.cast_column("label", datasets.Value("int64")) if isinstance(dataset.features["label"], datasets.ClassLabel) else dataset


DEV = {"": ("dev.tsv", "validation")}
NLI = {"entailment": 0, "not_entailment": 1}  # RTE and QNLI, as nyu-mll/glue encodes them
BINARY = {"0": 0, "1": 1}

GLUE = [
    Glue("cola", "CoLA", ("sentence",), {"sentence": 3, "label": 1}, class_labels(BINARY), 2, matthews, "matthews_corr", DEV,
         header=False, layout="glue/CoLA/{train,dev}.tsv (no header: source, label, original label, sentence)"),
    Glue("sst2", "SST-2", ("sentence",), {"sentence": "sentence", "label": "label"}, class_labels(BINARY), 2, accuracy, "accuracy",
         DEV, layout="glue/SST-2/{train,dev}.tsv (header: sentence, label)"),
    Glue("mrpc", "MRPC", ("sentence1", "sentence2"), {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
         class_labels(BINARY), 2, accuracy_and_f1, "accuracy", DEV,
         layout="glue/MRPC/{train,dev}.tsv (header: Quality, #1 ID, #2 ID, #1 String, #2 String)"),
    Glue("qqp", "QQP", ("question1", "question2"), {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
         class_labels(BINARY), 2, accuracy_and_f1, "accuracy", DEV,
         layout="glue/QQP/{train,dev}.tsv (header: id, qid1, qid2, question1, question2, is_duplicate)"),
    Glue("stsb", "STS-B", ("sentence1", "sentence2"), {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
         score, 1, correlations, "pearson", DEV, layout="glue/STS-B/{train,dev}.tsv (header: ..., sentence1, sentence2, score)"),
    Glue("mnli", "MNLI", ("premise", "hypothesis"), {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
         class_labels({"entailment": 0, "neutral": 1, "contradiction": 2}), 3, accuracy, "accuracy_matched",
         {"matched": ("dev_matched.tsv", "validation_matched"), "mismatched": ("dev_mismatched.tsv", "validation_mismatched")},
         layout="glue/MNLI/{train,dev_matched,dev_mismatched}.tsv (header: ..., sentence1, sentence2, ..., gold_label)"),
    Glue("qnli", "QNLI", ("question", "sentence"), {"question": "question", "sentence": "sentence", "label": "label"},
         class_labels(NLI), 2, accuracy, "accuracy", DEV, layout="glue/QNLI/{train,dev}.tsv (header: index, question, sentence, label)"),
    Glue("rte", "RTE", ("sentence1", "sentence2"), {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
         class_labels(NLI), 2, accuracy, "accuracy", DEV, layout="glue/RTE/{train,dev}.tsv (header: index, sentence1, sentence2, label)"),
    Glue("wnli", "WNLI", ("sentence1", "sentence2"), {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
         class_labels(BINARY), 2, accuracy, "accuracy", DEV, layout="glue/WNLI/{train,dev}.tsv (header: index, sentence1, sentence2, label)"),
]

TASKS = [glue.task() for glue in GLUE]
