"""Language modelling on a plain text: Tiny Shakespeare by default (Karpathy 2015, the
char-rnn corpus, 1,115,394 characters of Shakespeare's plays).

Hub: ``karpathy/tiny_shakespeare`` (one row per split, column ``text``). Local:
``<data_dir>/tinyshakespeare/input.txt``, split as that dataset does: the first 90% of the
characters train, the next 5% validation, the last 5% test. Each split is cut into rows of
``CHUNK_CHARS`` characters at line ends, so the engine can subsample and carve a validation
set out of train; ``encode`` tokenizes the rows, concatenates them and cuts blocks of
``max_length`` tokens (labels = inputs: every token is predicted). Metric: perplexity of the
test split (exp of the mean token cross-entropy), lower is better.

The test split is also the reference text of the forgetting measurement of decoder runs
(lorabench/run.py): how much a fine-tune on another task raises the cross-entropy there.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from tasks import DataError, Task, column, read_text

CHUNK_CHARS = 2000
SPLITS = (("train", 0.0, 0.9), ("validation", 0.9, 0.95), ("test", 0.95, 1.0))


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Rows of about ``size`` characters, cut after a newline where one is near."""
    rows, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        newline = text.rfind("\n", start + size // 2, end)
        if end < len(text) and newline != -1:
            end = newline + 1
        rows.append(text[start:end])
        start = end
    return rows


def split_text(text: str) -> dict[str, str]:
    n = len(text)
    return {name: text[int(n * lo) : int(n * hi)] for name, lo, hi in SPLITS}


def as_rows(parts: dict[str, str]) -> dict[str, datasets.Dataset]:
    return {"train": datasets.Dataset.from_dict({"text": chunks(parts["train"])}),
            "eval": datasets.Dataset.from_dict({"text": chunks(parts["test"])})}


def shakespeare_local(data_dir: Path) -> dict[str, datasets.Dataset]:
    path = data_dir / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise DataError(f"{path}: file not found; point data_dir (or LORABENCH_DATA) at a folder holding tinyshakespeare/input.txt")
    return as_rows(split_text(read_text(path)))


def shakespeare_hub() -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset("karpathy/tiny_shakespeare")
    return as_rows({split: "".join(loaded[split]["text"]) for split in ("train", "validation", "test")})


def encode(tokenizer, dataset: datasets.Dataset, max_length: int) -> list[dict]:
    """Blocks of ``max_length`` tokens from the concatenated rows; the last partial block is kept."""
    ids = [token for row in tokenizer(column(dataset, "text"), add_special_tokens=False)["input_ids"] for token in row]
    return [{"input_ids": ids[i : i + max_length], "labels": ids[i : i + max_length]} for i in range(0, len(ids), max_length)
            if len(ids[i : i + max_length]) > 1]


TASKS = [
    Task(
        name="shakespeare",
        kind="language_modeling",
        family="decoder",
        text_columns=("text",),
        label_column="text",
        num_labels=0,
        metrics=None,
        primary="perplexity",
        load_hub=shakespeare_hub,
        load_local=shakespeare_local,
        local_layout="tinyshakespeare/input.txt",
        eval_split_name="test (last 5%)",
        defaults={"max_length": 256, "eval_batch_size": 8},
        make_examples=encode,
    ),
]
