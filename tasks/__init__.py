"""Tasks: the task contract and automatic discovery of ``tasks/*.py``.

A task module exposes ``TASKS``, a list of ``Task`` objects. A task names its data twice,
a Hub dataset (used online) and the file layout of the original release under a local data
directory (used offline), and both paths yield the same ``datasets.Dataset`` columns and
label encoding, so preprocessing is identical either way.

Data source: ``data_source=hub`` or ``local``; ``auto`` means local when a data directory is
given (``data_dir``, or the ``LORABENCH_DATA`` environment variable), else the Hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets

from lorabench.registry import lookup, public_modules

KINDS = ("classification", "regression", "generation", "language_modeling")
DATA_SOURCES = ("auto", "hub", "local")


class DataError(ValueError):
    """Missing or malformed data; the message names the file, the line and the fix."""


@dataclass
class Task:
    """What the engine needs to know about a task; loaders and metrics are plain functions.

    ``load_local(folder)`` and ``load_hub()`` return ``{"train": Dataset, "eval": Dataset}``
    with the Hub's column names; ``eval`` is the split scores are reported on (GLUE: dev).
    """

    name: str
    kind: str
    family: str
    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int
    metrics: Callable[[Any, Any], dict[str, float]]
    primary: str
    load_hub: Callable[[], dict[str, datasets.Dataset]]
    load_local: Callable[[Path], dict[str, datasets.Dataset]]
    local_layout: str
    eval_split_name: str
    defaults: dict[str, Any] = field(default_factory=dict)

    def load(self, data_dir: str | None = None, data_source: str = "auto") -> dict[str, datasets.Dataset]:
        if data_source not in DATA_SOURCES:
            raise DataError(f"data_source={data_source!r}; choose one of {', '.join(DATA_SOURCES)}")
        data_dir = data_dir or os.environ.get("LORABENCH_DATA") or None
        if data_source == "hub" or (data_source == "auto" and data_dir is None):
            try:
                return self.load_hub()
            except ConnectionError as error:
                raise DataError(
                    f"task {self.name}: the Hub is unreachable ({error}); offline, set data_dir or LORABENCH_DATA "
                    f"to a folder with local copies laid out as {self.local_layout}"
                ) from error
        if data_dir is None:
            raise DataError("data_source=local needs data_dir (or the LORABENCH_DATA environment variable)")
        return self.load_local(Path(data_dir).expanduser())

    def encode(self, tokenizer, dataset: datasets.Dataset, max_length: int) -> list[dict]:
        """Token ids (sentence pairs fed together) and labels; padding is left to the batcher."""
        if len(dataset) == 0:
            return []
        texts = [list(dataset[column]) for column in self.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        labels = list(dataset[self.label_column])
        return [{**{key: encoded[key][i] for key in keys}, "labels": labels[i]} for i in range(len(dataset))]


def _discover() -> dict[str, Task]:
    found = {}
    for stem, module in public_modules(__name__, __path__):
        for task in getattr(module, "TASKS", []):
            if task.name in found:
                raise TypeError(f"tasks/{stem}.py: task name {task.name!r} is taken already")
            if task.kind not in KINDS:
                raise TypeError(f"tasks/{stem}.py: task {task.name!r} has kind {task.kind!r}, not one of {KINDS}")
            found[task.name] = task
    return dict(sorted(found.items()))


REGISTRY: dict[str, Task] = _discover()


def get(name: str) -> Task:
    return lookup(REGISTRY, name, "task")
