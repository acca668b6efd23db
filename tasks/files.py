"""Tasks declared in a study config: your own CSV, TSV, JSON-lines or plain-text files, or a
Hub dataset, benchmarked with no Python (the way lm-evaluation-harness declares tasks in YAML).

    datasets:                        # in a study config; then list the name under tasks:
      reviews:
        kind: classification         # classification | regression | generation | language_modeling
        train: data/reviews/train.csv   # absolute, or relative to where the study runs
        eval: data/reviews/test.csv     # the split scores are reported on
        validation: data/reviews/dev.csv  # optional: used instead of carving val_size out of train
        format: csv                  # csv | tsv | jsonl | text; default: the train file's suffix
        text: [review]               # one or two text columns (generation: one, the input)
        label: sentiment             # classification/regression: the label; generation: the reference
        labels: [negative, positive] # classification: the labels in id order; default: sorted
                                     # distinct training labels
        metric: accuracy             # accuracy | f1 | matthews (classification), pearson | spearman
                                     # (regression), bleu | rouge_l (generation), perplexity (language_modeling)
        prompt: "{input} =>"         # generation: what the decoder reads, {input} the text column

    hub: owner/name and splits: {train: train, eval: test} instead of the files load from the Hub.

Encoder kinds (classification, regression) train MiniLM with a head, decoder kinds
(generation, language modelling) SmolLM2; a ``text`` file is one document, cut into rows like
Tiny Shakespeare (tasks/lm.py). Rows are checked as they are read: a malformed one raises
``DataError`` naming the file, the line and the fix. :func:`declare` registers the task, so
the engine, the DAG and the analysis treat it as a built-in one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import datasets

import tasks
from tasks import DataError, Task, column, read_text, text_lines
from tasks.e2e import PromptedGeneration
from tasks.glue import accuracy, correlations, matthews

FORMATS = ("csv", "tsv", "jsonl", "text")
METRICS = {  # metric -> (kind, primary score's key)
    "accuracy": ("classification", "accuracy"),
    "f1": ("classification", "f1"),
    "matthews": ("classification", "matthews_corr"),
    "pearson": ("regression", "pearson"),
    "spearman": ("regression", "spearman"),
    "bleu": ("generation", "bleu"),
    "rouge_l": ("generation", "rouge_l"),
    "perplexity": ("language_modeling", "perplexity"),
}
FAMILY = {"classification": "encoder", "regression": "encoder", "generation": "decoder", "language_modeling": "decoder"}
DEFAULT_PROMPT = "{input}\n"
SPLIT_KEYS = {"train": "train", "eval": "eval", "validation": "validation"}


class DeclarationError(ValueError):
    """A declared task whose entry cannot work; the message names the entry, the field and the fix."""


def accuracy_and_macro_f1(predictions, labels) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {**accuracy(predictions, labels), "f1": float(f1_score(labels, predictions, average="macro", zero_division=0.0))}


def declare(name: str, spec: dict[str, Any], where: str = "datasets") -> Task:
    """The task ``spec`` declares, registered under ``name``; the same declaration again is a no-op."""
    known = tasks.REGISTRY.get(name)
    if known is not None:
        if known.declared == dict(spec):
            return known
        taken = "another declaration" if known.declared is not None else "a built-in task"
        raise DeclarationError(f"{where}.{name}: the name is taken by {taken}; give this data set another name")
    task = task_from(name, spec, f"{where}.{name}")
    tasks.REGISTRY[name] = task
    return task


def task_from(name: str, spec: dict[str, Any], where: str) -> Task:
    kind, metric = spec.get("kind"), spec.get("metric")
    if kind not in FAMILY:
        raise DeclarationError(f"{where}.kind: {kind!r}; use one of {', '.join(FAMILY)}")
    if metric is None:
        metric = next(m for m, (k, _) in METRICS.items() if k == kind)
    if metric not in METRICS or METRICS[metric][0] != kind:
        fits = [m for m, (k, _) in METRICS.items() if k == kind]
        raise DeclarationError(f"{where}.metric: {metric!r} does not score a {kind} task; use one of {', '.join(fits)}")
    text = spec.get("text", [])
    text = [text] if isinstance(text, str) else list(text)
    label = spec.get("label")
    if kind == "language_modeling":
        text, label = ["text"], "text"
    elif not text or label is None:
        raise DeclarationError(f"{where}: a {kind} task needs text (its input column or columns) and label")
    if kind == "generation" and len(text) != 1:
        raise DeclarationError(f"{where}.text: generation reads one input column, not {text}")
    if len(text) > 2:
        raise DeclarationError(f"{where}.text: one or two text columns (a pair is fed together), not {len(text)}")
    if ("hub" in spec) == ("train" in spec):
        raise DeclarationError(f"{where}: give either files (train and eval) or hub (a dataset id, with splits)")
    if "train" in spec and "eval" not in spec:
        raise DeclarationError(f"{where}: eval is missing; name the file scores are reported on")
    source = Source(where, spec, kind, text, label)
    labels = source.label_names() if kind == "classification" else []
    prompt = spec.get("prompt", DEFAULT_PROMPT)
    if kind == "generation" and "{input}" not in prompt:
        raise DeclarationError(f"{where}.prompt: {prompt!r} has no {{input}} for the text column")
    generation = PromptedGeneration(prompt, text[0], label) if kind == "generation" else None
    metrics: Callable | None = {"accuracy": accuracy, "f1": accuracy_and_macro_f1, "matthews": matthews}.get(metric)
    if kind == "regression":
        metrics = correlations
    from tasks import lm

    return Task(
        name=name,
        kind=kind,
        family=FAMILY[kind],
        text_columns=tuple(text),
        label_column=label,
        num_labels={"classification": len(labels), "regression": 1}.get(kind, 0),
        metrics=metrics,
        primary=METRICS[metric][1],
        load_hub=source.hub,
        load_local=source.local,
        local_layout=source.layout(),
        eval_split_name=f"eval ({Path(spec['eval']).name})" if "eval" in spec else f"eval ({spec.get('splits', {}).get('eval', 'test')})",
        make_examples=generation.encode if generation else (lm.encode if kind == "language_modeling" else None),
        generation_metrics=generation.metrics if generation else None,
        sample_by=text[0] if generation else None,
        declared=dict(spec),
    )


class Source:
    """Where a declared task's rows come from, read into the columns the task names."""

    def __init__(self, where: str, spec: dict[str, Any], kind: str, text: list[str], label: str | None):
        self.where, self.spec, self.kind, self.text, self.label = where, spec, kind, text, label
        self.labels = [str(value) for value in spec["labels"]] if spec.get("labels") else None
        if kind == "classification" and self.labels is not None and len(set(self.labels)) < 2:
            raise DeclarationError(f"{where}.labels: {spec['labels']}; a classification task needs two or more distinct labels")
        if "train" in spec:
            self.format = spec.get("format") or self._format_of(spec["train"])
            if self.format not in FORMATS:
                raise DeclarationError(f"{where}.format: {self.format!r}; use one of {', '.join(FORMATS)}")
            if (self.format == "text") != (kind == "language_modeling"):
                raise DeclarationError(f"{where}.format: {self.format!r} for a {kind} task; plain text is for "
                                       "language_modeling, which reads nothing else")

    def _format_of(self, path: str) -> str:
        suffixes = [part.lstrip(".") for part in Path(path).suffixes if part != ".gz"]
        found = {"txt": "text", "json": "jsonl", "jsonl": "jsonl", "csv": "csv", "tsv": "tsv"}.get(suffixes[-1] if suffixes else "")
        if found is None:
            raise DeclarationError(f"{self.where}.format: cannot tell it from {path!r}; set format to one of {', '.join(FORMATS)}")
        return found

    def layout(self) -> str:
        if "hub" in self.spec:
            return f"the Hub dataset {self.spec['hub']}"
        return ", ".join(f"{key}: {self.spec[key]}" for key in SPLIT_KEYS if key in self.spec)

    def label_names(self) -> list[str]:
        """Classification labels in id order: declared, or the sorted distinct training labels
        (numerically when they are all integers)."""
        if self.labels is not None:
            return self.labels
        if "hub" in self.spec:
            raise DeclarationError(f"{self.where}.labels: a Hub classification task must list its labels in id order")
        values = set(self._raw_rows("train")[self.label])
        names = sorted(values, key=lambda value: (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value))
        if len(names) < 2:
            raise DeclarationError(f"{self.where}: {self.spec['train']} has one label value ({names}); "
                                   "a classification task needs two or more")
        self.labels = names
        return names

    def local(self, data_dir: Path | None = None) -> dict[str, datasets.Dataset]:
        return {SPLIT_KEYS[key]: self._dataset(key) for key in SPLIT_KEYS if key in self.spec}

    def hub(self) -> dict[str, datasets.Dataset]:
        splits = self.spec.get("splits", {"train": "train", "eval": "test"})
        loaded = datasets.load_dataset(self.spec["hub"], self.spec.get("config"))
        text = self.spec.get("text", "text")
        document = text if isinstance(text, str) else text[0]  # language modelling: the column holding the text
        columns = [*self.text, self.label] if self.kind != "language_modeling" else [document]
        out = {}
        for key, split in splits.items():
            rows = loaded[split].select_columns(list(dict.fromkeys(columns)))
            if self.kind == "language_modeling" and document != "text":
                rows = rows.rename_column(document, "text")
            out[SPLIT_KEYS[key]] = self._typed(rows.to_dict(), f"{self.spec['hub']}[{split}]", lines=None)
        return out

    def _dataset(self, key: str) -> datasets.Dataset:
        path = Path(self.spec[key]).expanduser()
        if self.format == "text":
            if not path.is_file():
                raise DataError(f"{path}: file not found ({self.where}.{key}); fix the path (absolute, or relative to "
                                "where the study runs)")
            from tasks import lm

            return datasets.Dataset.from_dict({"text": lm.chunks(read_text(path))})
        raw = self._raw_rows(key)
        return self._typed(raw, str(path), lines=raw.pop("_line"))

    def _raw_rows(self, key: str) -> dict[str, list]:
        """The declared columns of a local file as read, with each row's line number."""
        path = Path(self.spec[key]).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: file not found ({self.where}.{key}); fix the path (absolute, or relative to "
                            "where the study runs)")
        wanted = list(dict.fromkeys([*self.text, self.label]))
        rows: dict[str, list] = {name: [] for name in [*wanted, "_line"]}
        with text_lines(path) as lines:
            if self.format == "jsonl":
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}:{lines.number}: not a JSON object ({error.msg}); one object per line") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{lines.number}: a JSON {type(row).__name__}, not an object; one object per line")
                    self._append(rows, row, wanted, path, lines.number)
            else:
                reader = csv.DictReader(lines, delimiter="\t" if self.format == "tsv" else ",")
                missing = [name for name in wanted if name not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(f"{path}:1: the header {reader.fieldnames} lacks {missing}; name the columns "
                                    f"in {self.where}.text and .label as the header does")
                for row in reader:
                    self._append(rows, row, wanted, path, lines.number)
        if not rows["_line"]:
            raise DataError(f"{path}: no rows; {self.where}.{key} needs at least one")
        return rows

    def _append(self, rows: dict[str, list], row: dict, wanted: list[str], path: Path, line: int) -> None:
        for name in wanted:
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{path}:{line}: {name} is empty or missing; every row needs {', '.join(wanted)}")
            rows[name].append(value if name in self.text or self.kind != "classification" else str(value))
        rows["_line"].append(line)

    def _typed(self, raw: dict[str, list], origin: str, lines: list[int] | None) -> datasets.Dataset:
        """Texts as strings, labels as the kind needs them: class ids, floats, or reference strings."""
        where = (lambda i: f"{origin}:{lines[i]}") if lines else (lambda i: f"{origin} row {i}")
        columns = {name: [str(value) for value in raw[name]] for name in self.text}
        if self.kind == "language_modeling":
            return datasets.Dataset.from_dict(columns)
        values = raw[self.label]
        if self.kind == "classification":
            ids = {name: i for i, name in enumerate(self.label_names())}
            labels = []
            for i, value in enumerate(values):
                if str(value) in ids:
                    labels.append(ids[str(value)])
                elif lines is None and isinstance(value, int) and 0 <= value < len(ids):  # a Hub ClassLabel holds ids
                    labels.append(value)
                else:
                    raise DataError(f"{where(i)}: label {value!r} is not one of {list(ids)}; fix the row or {self.where}.labels")
            columns[self.label] = labels
        elif self.kind == "regression":
            numbers = []
            for i, value in enumerate(values):
                try:
                    numbers.append(float(value))
                except (TypeError, ValueError):
                    raise DataError(f"{where(i)}: label {value!r} is not a number; a regression label must be one") from None
            columns[self.label] = numbers
        else:
            columns[self.label] = [str(value) for value in values]
        return datasets.Dataset.from_dict(columns)


TASKS: list[Task] = []  # declared ones are registered by lorabench.study and lorabench.run, not discovered
