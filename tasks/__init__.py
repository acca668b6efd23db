"""Tasks: the task contract and automatic discovery of ``tasks/*.py``.

A task module exposes ``TASKS``, a list of ``Task`` objects. A task names its data twice,
a Hub dataset (used online) and the file layout of the original release under a local data
directory (used offline), and both paths yield the same ``datasets.Dataset`` columns and
label encoding, so preprocessing is identical either way.

Data source: ``data_source=hub`` or ``local``; ``auto`` means local when a data directory is
given (``data_dir``, or the ``LORABENCH_DATA`` environment variable), else the Hub.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import importlib.metadata
import inspect
import json
import operator
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets

from lorabench.registry import lookup, public_modules

KINDS = ("classification", "regression", "generation", "language_modeling")
CAUSAL_KINDS = ("generation", "language_modeling")  # trained as a decoder's next-token loss
TRUNCATIONS = ("head", "head_tail")
DATA_SOURCES = ("auto", "hub", "local")


class DataError(ValueError):
    """Missing or malformed data; the message names the file, the line and the fix."""


_NOT_UTF8_FIX = "the file must be UTF-8 text; re-download it"


class _NumberedLines:
    """A text file's lines, counted as they are read, so that an error met while parsing one can name its line."""

    def __init__(self, handle):
        self.handle, self.number = handle, 0

    def __iter__(self) -> _NumberedLines:
        return self

    def __next__(self) -> str:
        line = next(self.handle)
        self.number += 1
        return line


@contextlib.contextmanager
def text_lines(path: Path) -> Iterator[_NumberedLines]:
    """The lines of a local UTF-8 file (gzip-compressed when its name ends in ``.gz``), a byte-order
    mark dropped and line ends kept, as csv wants them. The local readers read through here (or
    ``read_text``) so that bytes that are not UTF-8, a corrupt or truncated gzip stream, or a line
    csv cannot parse, met anywhere while the lines are read, end the run as a DataError naming the
    file, the line where it is known, and the fix, rather than as a traceback."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8-sig", newline="") as handle:
        lines = _NumberedLines(handle)
        try:
            yield lines
        except UnicodeDecodeError as error:
            raise DataError(_where_not_utf8(path, error)) from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise DataError(f"{path}: not a valid, complete gzip file ({error}); re-download it") from None
        except csv.Error as error:
            raise DataError(f"{path}:{lines.number}: not a well-formed table ({error}); re-download it") from None


def read_text(path: Path) -> str:
    """A whole local UTF-8 text file, newlines translated; bytes that are not UTF-8 raise a DataError
    naming the file, the line and the fix."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(_where_not_utf8(path, error)) from None


def _where_not_utf8(path: Path, error: UnicodeDecodeError) -> str:
    """The message for ``path``'s first byte that is not UTF-8, with its line and offset. A text
    stream decodes in chunks, so ``error`` knows neither; decoding the raw lines one by one finds
    both (a UTF-8 character never spans a newline). A gzip stream that breaks off before that line
    leaves ``error``'s reason alone."""
    compressed = path.suffix == ".gz"
    offset = 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as raw:
            for number, line in enumerate(raw, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as found:
                    where = f"byte {offset + found.start}" + (" of the uncompressed text" if compressed else "")
                    return f"{path}:{number}: not UTF-8 ({found.reason} at {where}); {_NOT_UTF8_FIX}"
                offset += len(line)
    except (OSError, EOFError, zlib.error):
        pass
    return f"{path}: not UTF-8 ({error.reason}); {_NOT_UTF8_FIX}"


@dataclass
class Task:
    """What the engine needs to know about a task; loaders and metrics are plain functions.

    ``load_local(folder)`` and ``load_hub()`` return ``{"train": Dataset, "eval": Dataset}``
    with the Hub's column names; ``eval`` is the split scores are reported on (GLUE: dev).
    A task scored on several sets at once (MNLI: matched and mismatched) names the eval
    column telling them apart in ``group_column``; each metric is then reported per group,
    as ``<metric>_<group>``, and ``primary`` names one of those (``accuracy_matched``). A
    validation set carved out of train has no groups and is scored plainly (``val_metric``).
    A task scored against several references per input names the input column in
    ``sample_by``: an ``eval_size`` subset then keeps whole inputs with all their references.
    """

    name: str
    kind: str
    family: str
    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int
    metrics: Callable[[Any, Any], dict[str, float]] | None  # None for decoder tasks (perplexity)
    primary: str
    load_hub: Callable[[], dict[str, datasets.Dataset]]
    load_local: Callable[[Path], dict[str, datasets.Dataset]]
    local_layout: str
    eval_split_name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    group_column: str | None = None
    sample_by: str | None = None
    make_examples: Callable[..., list[dict]] | None = None
    # (model, tokenizer, eval rows, device, batch_size) -> metrics, or (metrics, per-example
    # statistics: name -> one list entry per scored input), which the record keeps in
    # eval.examples for the analysis's bootstrap (E2E: BLEU's n-gram counts).
    generation_metrics: Callable[..., dict[str, float] | tuple[dict[str, float], dict[str, list]]] | None = None
    local_note: str = ""
    declared: dict[str, Any] | None = None  # a task declared in a study config: its entry (tasks/files.py)

    @property
    def has_validation(self) -> bool:
        """A validation split of its own (a declared task's), used instead of carving one out of train."""
        declared = self.declared or {}
        return "validation" in declared or "validation" in declared.get("splits", {})

    @property
    def causal(self) -> bool:
        return self.kind in CAUSAL_KINDS
    def resolve_source(self, data_dir: str | None = None, data_source: str = "auto") -> str:
        """``hub`` or ``local``: ``auto`` is local when a data folder is given."""
        if data_source not in DATA_SOURCES:
            raise DataError(f"data_source={data_source!r}; choose one of {', '.join(DATA_SOURCES)}")
        if self.declared is not None:  # its entry says where its rows are
            return "hub" if "hub" in self.declared else "local"
        if data_source == "auto":
            return "local" if (data_dir or os.environ.get("LORABENCH_DATA")) else "hub"
        return data_source

    def load(self, data_dir: str | None = None, data_source: str = "auto") -> dict[str, datasets.Dataset]:
        source = self.resolve_source(data_dir, data_source)
        data_dir = data_dir or os.environ.get("LORABENCH_DATA") or None
        if source == "hub":
            try:
                return self.load_hub()
            except ConnectionError as error:
                raise DataError(
                    f"task {self.name}: the Hub is unreachable ({error}); offline, set data_dir or LORABENCH_DATA "
                    f"to a folder with local copies laid out as {self.local_layout}"
                ) from error
        if self.declared is not None:
            return self.load_local(None)
        if data_dir is None:
            raise DataError("data_source=local needs data_dir (or the LORABENCH_DATA environment variable)")
        return self.load_local(Path(data_dir).expanduser())

    def encode(self, tokenizer, dataset: datasets.Dataset, max_length: int, truncation: str = "head") -> list[dict]:
        """Token ids (sentence pairs fed together) and labels; padding is left to the batcher.

        ``truncation``: ``head`` keeps the first ``max_length`` tokens; ``head_tail`` (single
        texts only) keeps the first quarter and the last three quarters of the budget, which
        Sun et al. (2019, arXiv:1905.05583) found best for long reviews.
        """
        if truncation not in TRUNCATIONS:
            raise DataError(f"truncation={truncation!r}: use one of {', '.join(TRUNCATIONS)}")
        if truncation == "head_tail" and len(self.text_columns) > 1:
            raise DataError(f"truncation=head_tail needs single texts; task {self.name} feeds pairs, use truncation=head")
        if len(dataset) == 0:
            return []
        if self.make_examples is not None:
            return self.make_examples(tokenizer, dataset, max_length)
        texts = [column(dataset, name) for name in self.text_columns]
        if truncation == "head_tail":
            encoded = tokenizer(*texts, truncation=False, return_special_tokens_mask=True)
            encoded = {key: values for key, values in encoded.items() if key in ("input_ids", "token_type_ids", "special_tokens_mask")}
            encoded = keep_head_and_tail(encoded, max_length)
        else:
            encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        labels = column(dataset, self.label_column)
        examples = [{**{key: encoded[key][i] for key in keys}, "labels": labels[i]} for i in range(len(dataset))]
        if self.group_column and self.group_column in dataset.column_names:
            for example, group in zip(examples, column(dataset, self.group_column)):
                example["group"] = group
        return examples

    @property
    def val_metric(self) -> str:
        """The metric of periodic validation: the primary one on examples without groups
        (carved from train), or perplexity for decoder tasks (generating is too slow)."""
        if self.causal:
            return "perplexity"
        return self.primary.rsplit("_", 1)[0] if self.group_column else self.primary

    def score(self, predictions: list, labels: list, groups: list | None = None) -> dict[str, float]:
        """The task's metrics; per group (``<metric>_<group>``) when it has a group column."""
        if not self.group_column or groups is None or not any(groups):
            return self.metrics(predictions, labels)
        scores = {}
        for group in sorted(set(groups)):
            members = [i for i, g in enumerate(groups) if g == group]
            part = self.metrics([predictions[i] for i in members], [labels[i] for i in members])
            scores.update({f"{metric}_{group}": value for metric, value in part.items()})
        return scores


def keep_head_and_tail(encoded: dict[str, list[list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """Cut each sequence longer than ``max_length`` to its leading and trailing special tokens,
    the first quarter of the remaining budget from the text's head and the rest from its tail."""
    out: dict[str, list[list[int]]] = {key: [] for key in encoded if key != "special_tokens_mask"}
    for row, special in enumerate(encoded["special_tokens_mask"]):
        if len(special) <= max_length:
            for key in out:
                out[key].append(encoded[key][row])
            continue
        body = [i for i, is_special in enumerate(special) if not is_special]
        lead, trail = body[0], len(special) - 1 - body[-1]
        budget = max_length - lead - trail
        head = budget // 4
        keep = operator.itemgetter(*range(lead), *body[:head], *body[len(body) - (budget - head):],
                                   *range(len(special) - trail, len(special)))
        for key in out:
            out[key].append(list(keep(encoded[key][row])))
    return out


def column(dataset: datasets.Dataset, name: str) -> list:
    """A column as a list, read in one go: iterating datasets' lazy ``Column`` formats one row
    at a time (2 s for SST-2's 67,349 sentences, against 0.1 s)."""
    return dataset[name][:]


def encode_cached(task: Task, tokenizer, dataset: datasets.Dataset, max_length: int, truncation: str, cache: Path) -> list[dict]:
    """``task.encode``, kept as JSON in the folder ``cache`` under a hash of everything the
    examples depend on (``encoding_key``). Every run of a study tokenizes the same training
    set in full, since length bucketing needs every example's length (IMDB's 25,000 reviews
    take 20 s, for the 800 that 50 steps draw); later runs read the examples back in half a
    second. A tokenizer without a serialized form is not cached. The file is written to a
    temporary name and renamed, so concurrent runs share the folder; an unwritable one leaves
    the run uncached."""
    key = encoding_key(task, tokenizer, dataset, max_length, truncation) if len(dataset) else None
    if key is None:
        return task.encode(tokenizer, dataset, max_length, truncation)
    path = cache / f"{task.name}-{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    examples = task.encode(tokenizer, dataset, max_length, truncation)
    partial = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cache, prefix=f".{path.name}-", delete=False) as handle:
            partial = Path(handle.name)
            json.dump(examples, handle)
        partial.replace(path)
    except OSError:
        if partial is not None:
            partial.unlink(missing_ok=True)
    return examples


def encoding_key(task: Task, tokenizer, dataset: datasets.Dataset, max_length: int, truncation: str) -> str | None:
    """A hash of what ``task.encode`` reads: the split's every column, the task's columns and
    settings, the encoding code (this file and the task's ``make_examples``), the tokenizer's
    whole pipeline (its serialized form, less the truncation and padding its wrapper sets on
    every call), its wrapper's settings and special tokens, and the transformers and tokenizers
    versions. None for a tokenizer without a serialized form (a slow one)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    code = [Path(__file__)] + ([Path(inspect.getfile(task.make_examples))] if task.make_examples else [])
    settings = [task.name, task.text_columns, task.label_column, task.group_column, max_length, truncation,
                type(tokenizer).__qualname__, sorted(tokenizer.init_kwargs.items()), tokenizer.special_tokens_map,
                tokenizer.model_input_names, tokenizer.truncation_side, importlib.metadata.version("transformers"),
                importlib.metadata.version("tokenizers")]
    digest = hashlib.sha256(repr(settings).encode())
    digest.update(_pipeline(tokenizer.backend_tokenizer).encode())
    for path in code:
        digest.update(path.read_bytes())
    for name in dataset.column_names:
        digest.update(json.dumps([name, column(dataset, name)]).encode())
    return digest.hexdigest()[:32]


def _pipeline(backend) -> str:
    """A fast tokenizer's serialized form less its truncation and padding (what its wrapper
    sets anew on every call), which are put back as they were."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**padding)


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
