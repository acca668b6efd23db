"""One training run, one process, one record.

    python -m lorabench.run --task sst2 --variant lora --seed 0 --set rank=16 lr=1e-3

Hyper-parameters form one flat namespace: engine settings (below), the training loop's
(``TrainConfig``) and the variant's config. Defaults are layered: engine < task < variant's
``TRAIN_DEFAULTS`` < ``--set``. An unknown key, a value of the wrong type or out of range is
rejected before anything loads; a bad data file or a rank too large for a layer before
training starts. Such input errors exit with status 2 and write no record. A run that fails
while training (a diverging loss, out of memory, ...) writes a record with ``status: failed``.
With ``checkpoint_every``, a run killed part-way leaves a checkpoint beside its record, and
the same command resumes from it (lorabench/checkpoint.py); one written under another
config hash is refused, with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import importlib.metadata
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml

import tasks
import variants
from tasks import files, lm
from lorabench import adapters, checkpoint, extract, library, measure, models, quantize, rates, records, sizing, sweep
from lorabench.registry import UnknownNameError
from lorabench.train import PRECISIONS, DivergedError, TrainConfig, autocast, collate, evaluate, predict, resolve_precision, task_loss, train

ENGINE_DEFAULTS: dict[str, Any] = {
    "model": None,
    "model_source": "auto",
    "data_dir": None,
    "data_source": "auto",
    "data_seed": 0,
    "train_size": 0,
    "val_size": 0,
    "val_min_words": 0,
    "eval_size": 0,
    "max_length": 128,
    "truncation": "head",
    "targets": "all-linear",
    "quantize_base": "none",
    "extract": None,
    "forgetting_tokens": 8192,
    "forgetting_reference": "shakespeare",
    "save_adapter": True,
    "score_split": "eval",
    "device": "auto",
    "threads": 0,
    "memory_limit_mb": 0.0,
}
ENGINE_HELP = {
    "model": "a named model (lorabench.models.MODELS), a Hub id or a checkpoint folder; default per task family",
    "model_source": "auto | hub | package: where a named model's weights come from",
    "data_dir": "folder with local data copies; default: $LORABENCH_DATA",
    "data_source": "auto | hub | local (auto: local when a data folder is given)",
    "data_seed": "seed of the train/validation/eval subsampling",
    "train_size": "training examples used (0: all left after val_size)",
    "val_size": "examples carved out of train for periodic evaluation (eval_every)",
    "val_min_words": "carve validation only from training rows with at least this many words (SST-2: full sentences, as dev, "
                     "not the parse-tree phrases most of train is); those left over still train",
    "eval_size": "examples of the reported split scored (0: all); E2E takes whole meaning representations up to this many references",
    "truncation": "head | head_tail: what of a text longer than max_length is kept",
    "targets": "all-linear, or a list of layer-name suffixes such as [query, value]",
    "quantize_base": "none | nf4 | int8: the frozen base in bitsandbytes 4-bit NF4 (QLoRA) or 8-bit layers",
    "extract": "full runs: parasitic extraction settings, e.g. {interval: 50, threshold: 0.9} (lorabench/extract.py)",
    "forgetting_tokens": "decoder runs: tokens of the reference text (forgetting_reference) scored before and after (0: skip)",
    "forgetting_reference": "decoder runs: the text whose loss rises when a fine-tune forgets: a language-modelling task "
                            "(its eval split) or a plain-text file; when its data is absent, forgetting is recorded as not measured",
    "score_split": "eval | val: what the record's scores are on (val: the validation split carved from train, for sweeps)",
    "device": "auto | cpu | cuda | cuda:N",
    "threads": "torch CPU threads (0: torch's default)",
    "memory_limit_mb": "refuse a run whose estimated memory floor exceeds this (0: the device's memory; lorabench/sizing.py)",
    "eval_every": "steps between validation evaluations (0: none)",
    "max_steps": "optimizer steps (0: score the untrained model, the base-model reference)",
    "epochs": "passes over the training examples; when > 0 it sets max_steps (rounded up)",
    "timing_warmup_steps": "first steps left out of tokens/s",
    "bucket_batches": "batches per length-sorted bucket (0: no length bucketing)",
    "precision": "auto | fp32 | bf16: bf16 runs forward passes (training and evaluation) under autocast, weights stay float32; "
                 "auto: bf16 on a CUDA device that supports it, else fp32",
    "gradient_checkpointing": "recompute each transformer layer's activations in the backward pass instead of keeping them: "
                              "less activation memory for about one more forward pass of time",
    "checkpoint_every": "optimizer steps between checkpoints beside the record (seedS.ckpt.safetensors), "
                        "from which a killed run resumes (0: none)",
    "divergence_factor": "a failed run when the median of the last 5 step losses exceeds this many times the first step's "
                         "(floored at 1 nat); 0: fail only on a non-finite loss",
}
DEFAULT_MODEL = {"encoder": "minilm", "decoder": "smollm2"}
# Left out of the config hash: a run's results do not depend on them (a checkpoint resumes across them).
MACHINE_LOCAL = ("data_dir", "device", "threads", "save_adapter", "checkpoint_every", "memory_limit_mb")
POSITIVE = ("lr", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every")
NON_NEGATIVE = ("weight_decay", "max_grad_norm", "eval_every", "timing_warmup_steps", "bucket_batches",
                "train_size", "val_size", "val_min_words", "eval_size", "threads", "data_seed", "forgetting_tokens", "max_steps", "epochs",
                "checkpoint_every", "divergence_factor", "memory_limit_mb")
SCORE_SPLITS = ("eval", "val")
PACKAGES = ("lorabench", "torch", "transformers", "datasets", "safetensors", "numpy", "scikit-learn", "peft", "snakemake")


class ConfigError(ValueError):
    """A hyper-parameter that does not exist or has a bad value."""


def defaults(task: tasks.Task, variant) -> dict[str, Any]:
    train_defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    layered = {**ENGINE_DEFAULTS, **train_defaults, **variants.config_fields(variant)}
    layered["model"] = DEFAULT_MODEL.get(task.family)
    for source, extra in (("task " + task.name, task.defaults), (f"variants/{variant.name}.py TRAIN_DEFAULTS", getattr(variant, "TRAIN_DEFAULTS", {}))):
        unknown = sorted(set(extra) - set(layered))
        if unknown:
            raise ConfigError(f"{source} sets unknown keys {unknown}")
        layered.update(extra)
    return layered


def parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or lists: 1e-3, 8, true, null, [query, value]."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            return value
    return value


def _check_type(key: str, value: Any, default: Any) -> Any:
    if default is None or key == "targets":
        if key == "targets" and not (value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
            raise ConfigError(f"targets={value!r}: use 'all-linear' or a list of layer-name suffixes such as [query, value]")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if not isinstance(value, type(default)):
        raise ConfigError(f"{key}={value!r} must be a {type(default).__name__}")
    return value


def resolve_hparams(task_name: str, variant_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every hyper-parameter of a run, checked; raises naming the offending key."""
    task, variant = tasks.get(task_name), variants.get(variant_name)
    hparams = defaults(task, variant)
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ConfigError(f"unknown hyper-parameter(s) {unknown} for variant {variant_name!r}; known: {', '.join(sorted(hparams))}")
    for key, value in overrides.items():
        hparams[key] = _check_type(key, value, hparams[key])
    for key in POSITIVE:
        if hparams[key] <= 0:
            raise ConfigError(f"{key}={hparams[key]} must be > 0")
    for key in NON_NEGATIVE:
        if hparams[key] < 0:
            raise ConfigError(f"{key}={hparams[key]} must be >= 0")
    if hparams["quantize_base"] not in quantize.FORMATS:
        raise ConfigError(f"quantize_base={hparams['quantize_base']!r}: use one of {', '.join(quantize.FORMATS)}")
    if hparams["quantize_base"] != "none" and not getattr(variant, "QUANTIZABLE_BASE", True):
        raise ConfigError(f"quantize_base={hparams['quantize_base']} does not compose with variant {variant_name}: "
                          f"it reads or writes the base weights (variants/{variant_name}.py); set quantize_base=none")
    if hparams["truncation"] not in tasks.TRUNCATIONS or (hparams["truncation"] == "head_tail" and (len(task.text_columns) > 1 or task.causal)):
        raise ConfigError(f"truncation={hparams['truncation']!r}: use one of {', '.join(tasks.TRUNCATIONS)} "
                          f"(head_tail for single-text classification only; {task_name} is {task.kind} with {len(task.text_columns)} text column(s))")
    if hparams["extract"] is not None:
        if not getattr(variant, "TRAINS_BASE", False):
            raise ConfigError(f"extract is for full fine-tuning (it extracts adapters from the trained weights); "
                              f"variant {variant_name} trains an adapter already: drop extract or use variant full")
        try:
            extract.ExtractConfig.from_dict(hparams["extract"])
        except (extract.ExtractConfigError, TypeError) as error:
            raise ConfigError(str(error)) from error
    reference = hparams["forgetting_reference"]
    if reference in tasks.REGISTRY and not tasks.get(reference).causal:
        raise ConfigError(f"forgetting_reference={reference!r} is a {tasks.get(reference).kind} task, and forgetting is a language "
                          "model's loss on a text: name a language-modelling task or a plain-text file")
    if reference not in tasks.REGISTRY and Path(reference).suffix == "" and os.sep not in reference:
        raise ConfigError(f"forgetting_reference={reference!r} is neither a task ({', '.join(tasks.REGISTRY)}) "
                          "nor a file path: name a language-modelling task or a plain-text file (e.g. data/reference.txt)")
    if hparams["score_split"] not in SCORE_SPLITS:
        raise ConfigError(f"score_split={hparams['score_split']!r}: use one of {', '.join(SCORE_SPLITS)}")
    if hparams["score_split"] == "val" and hparams["val_size"] == 0 and not task.has_validation:
        raise ConfigError("score_split=val scores the validation split carved from train, and val_size=0 carves none: set val_size")
    if not 0 <= hparams["warmup_ratio"] < 1:
        raise ConfigError(f"warmup_ratio={hparams['warmup_ratio']} must be in [0, 1)")
    if hparams["precision"] not in PRECISIONS:
        raise ConfigError(f"precision={hparams['precision']!r}: use one of {', '.join(PRECISIONS)}")
    try:
        variant_cfg = variants.make_config(variant, hparams)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"variant {variant_name}: {error}") from error
    try:
        sizing.check_shapes(task, variant, variant_cfg, hparams)
    except adapters.AdapterError as error:
        raise ConfigError(f"variant {variant_name} on model {hparams['model']}: {error}") from error
    return hparams


def split_sizes(splits: dict, hparams: dict[str, Any], sample_by: str | None = None,
                text_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Seeded subsets: validation carved out of train (disjoint) unless the task has a validation
    split of its own (then ``val_size`` rows of it, 0: all), train and eval subsampled.

    With ``val_min_words``, validation takes only rows of ``text_columns`` that long, so that
    a rate is selected on what the reported split looks like (SST-2's train is mostly short
    phrases, its dev whole sentences). With ``sample_by`` (a column of the eval split), the
    eval subset takes whole groups of rows sharing that column's value, in a seeded order,
    until it holds at least ``eval_size`` rows: E2E keeps every reference of each meaning
    representation it scores, so multi-reference BLEU sees all of them."""
    rng = np.random.default_rng(hparams["data_seed"])
    train_order = rng.permutation(len(splits["train"]))
    val_size = hparams["val_size"]
    if val_size >= len(train_order):
        raise ConfigError(f"val_size={val_size} leaves no training data ({len(train_order)} rows)")
    val_rows, rest = train_order[:val_size], train_order[val_size:]
    validation = splits["train"]
    if "validation" in splits:  # a split of its own (a task declared with one): train keeps every row
        validation, rest = splits["validation"], train_order
        val_rows = np.arange(len(validation))
        if val_size and val_size < len(validation):
            val_rows = rng.permutation(len(validation))[:val_size]
    elif hparams.get("val_min_words", 0) and val_size:
        val_rows, rest = long_rows_first(splits["train"], train_order, val_size, hparams["val_min_words"], text_columns)
    train_rows = rest[: hparams["train_size"]] if hparams["train_size"] else rest
    eval_rows = np.arange(len(splits["eval"]))
    if hparams["eval_size"] and hparams["eval_size"] < len(eval_rows):
        if sample_by is None:
            eval_rows = np.sort(rng.permutation(len(eval_rows))[: hparams["eval_size"]])
        else:
            groups: dict[Any, list[int]] = {}
            for row, key in enumerate(tasks.column(splits["eval"], sample_by)):
                groups.setdefault(key, []).append(row)
            members = list(groups.values())
            chosen: list[int] = []
            for group in rng.permutation(len(members)):
                if len(chosen) >= hparams["eval_size"]:
                    break
                chosen += members[group]
            eval_rows = np.sort(chosen)
    return {
        "train": splits["train"].select(np.sort(train_rows)),
        "val": validation.select(np.sort(val_rows)),
        "eval": splits["eval"].select(eval_rows),
    }


def long_rows_first(train, order: np.ndarray, val_size: int, min_words: int, text_columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The first ``val_size`` rows of ``order`` with at least ``min_words`` words, and the rest in order."""
    if not text_columns:
        raise ConfigError(f"val_min_words={min_words} counts the words of a task's text columns, and this task has none: set val_min_words=0")
    texts = [tasks.column(train, name) for name in text_columns]
    words = np.array([sum(len(str(part).split()) for part in row) for row in zip(*texts)])
    long_enough = order[words[order] >= min_words]
    if len(long_enough) < val_size:
        raise ConfigError(f"val_min_words={min_words}: only {len(long_enough)} training rows are that long, "
                          f"fewer than val_size={val_size}; lower one of them")
    chosen = long_enough[:val_size]
    return chosen, order[~np.isin(order, chosen)]


def pick_device(name: str) -> torch.device:
    """``auto``: a GPU of its own when there is one (see :func:`claim_gpu`), else the CPU."""
    if name == "auto":
        return claim_gpu() if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


GPU_LOCKS = Path(tempfile.gettempdir()) / "lorabench-gpu-locks"
GPU_WAIT_S = 5.0
_claimed_gpu: list = []  # (open lock file, index) of the GPU this process holds, until it exits


def claim_gpu() -> torch.device:
    """The first visible GPU no other lorabench run holds, waiting for one when all are taken,
    so that local jobs (``snakemake --cores all`` on a GPU machine) keep one run per GPU and
    their peak memory and throughput stay their own. A lock per physical GPU (its UUID, so that
    jobs of different SLURM allocations on one node, each seeing its own GPU as cuda:0, do not
    wait for each other); the operating system drops it when the process ends, however it ends.
    ``--set device=cuda:N`` skips this."""
    if _claimed_gpu:  # this process holds one already (a second run in the same process)
        return torch.device("cuda", _claimed_gpu[0][1])
    GPU_LOCKS.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(torch.cuda.device_count()):
            handle = open(GPU_LOCKS / f"{torch.cuda.get_device_properties(index).uuid}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _claimed_gpu.append((handle, index))
            torch.cuda.set_device(index)  # so that what asks for "the" CUDA device (bitsandbytes, bf16 support) gets this one
            return torch.device("cuda", index)
        if not waited:
            print(f"lorabench: every GPU is held by another run; waiting (locks in {GPU_LOCKS})", file=sys.stderr, flush=True)
            waited = True
        time.sleep(GPU_WAIT_S)


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    root = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "lorabench_version": versions["lorabench"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "packages": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS is deterministic only with a fixed workspace, read when its first handle is made.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def execute(task_name: str, variant_name: str, seed: int, setting: str, overrides: dict[str, Any], out: Path,
            selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run and write the record at ``out``; input errors raise before a record exists. A sweep's
    ``selection`` (``lorabench.sweep``) sets its hyper-parameters over ``overrides`` and is
    kept in the record."""
    if selection is not None:
        chosen_for = (selection.get("task", task_name), selection.get("variant", variant_name))
        if chosen_for != (task_name, variant_name):
            raise ConfigError(f"the selection file chose a rate for {'/'.join(chosen_for)}, not for {task_name}/{variant_name}: "
                              "pass that run's own selection file")
        overrides = {**overrides, **selection["hparams"]}
    task, variant = tasks.get(task_name), variants.get(variant_name)
    hparams = resolve_hparams(task_name, variant_name, overrides)
    device = pick_device(hparams["device"])
    if hparams["threads"]:
        torch.set_num_threads(hparams["threads"])
    seed_everything(seed)
    variant_cfg = variants.make_config(variant, hparams)
    train_cfg = TrainConfig(**{f.name: hparams[f.name] for f in dataclasses.fields(TrainConfig)})
    train_cfg.precision = resolve_precision(train_cfg.precision, device)
    hashed = {key: value for key, value in hparams.items() if key not in MACHINE_LOCAL}
    run_section = {"task": task_name, "variant": variant_name, "setting": setting, "model": hparams["model"],
                   "seed": seed, "hparams": hparams, "config_hash": records.config_hash(hashed)}
    if selection is not None:
        run_section["selection"] = selection
    if task.declared is not None:
        run_section["task_spec"] = task.declared
    record = records.new_record(run_section, environment(device))
    checkpointer = checkpoint.Checkpointer(out, run_section["config_hash"], train_cfg.checkpoint_every, device, train_cfg.precision)

    try:
        train_and_score(record, task, variant, variant_cfg, hparams, train_cfg, device, seed, out, checkpointer)
        record["status"] = "ok"
    except (DivergedError, torch.OutOfMemoryError) as error:
        # Out of memory anywhere (moving the model, training, scoring, extracting, saving) or a
        # diverging loss: a failed record with the reason, so the DAG goes on and the report shows it.
        record["status"] = "failed"
        record["error"] = {"type": type(error).__name__, "message": str(error), "step": getattr(error, "step", None)}
    record["meta"]["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records.write_atomic(out, record)
    checkpointer.remove()
    return record


def train_and_score(record: dict[str, Any], task: tasks.Task, variant, variant_cfg, hparams: dict[str, Any], train_cfg: TrainConfig,
                    device: torch.device, seed: int, out: Path, checkpointer: checkpoint.Checkpointer) -> None:
    """Load, train, score and save, filling in ``record``; input errors raise before training."""
    source = task.resolve_source(hparams["data_dir"], hparams["data_source"])
    splits = split_sizes(task.load(hparams["data_dir"], source), hparams, task.sample_by, task.text_columns)
    record["run"]["data_source"] = source
    if source == "local" and task.local_note:
        record["run"]["data_note"] = task.local_note
    tokenizer = models.load_tokenizer(hparams["model"], hparams["model_source"])
    encoded = {name: tasks.encode_cached(task, tokenizer, split, hparams["max_length"], hparams["truncation"], models.cache_dir() / "encoded")
               for name, split in splits.items()}
    longest = max((len(example["input_ids"]) for example in encoded["train"]), default=1)
    estimate = sizing.estimate(task, variant, variant_cfg, hparams, (train_cfg.batch_size, longest))
    sizing.guard(estimate, device, hparams["memory_limit_mb"], f"{task.name}/{variant.name}")
    reference, forgetting = forgetting_reference(task, tokenizer, hparams)
    model, tokenizer = load_model(task, hparams, tokenizer)
    if train_cfg.gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise ConfigError(f"gradient_checkpointing=true: {type(model).__name__} ({hparams['model']}) does not support it; "
                          "set gradient_checkpointing=false")
    model.to(device)
    if reference:
        with autocast(device, train_cfg.precision):
            forgetting_before = evaluate(model, reference, task, tokenizer.pad_token_id, train_cfg.eval_batch_size, device)["loss"]
    quantize.quantize_base(model, hparams["quantize_base"])
    adapters.attach(model, variant, variant_cfg, hparams["targets"])
    if train_cfg.epochs:
        train_cfg.max_steps = math.ceil(train_cfg.epochs * len(encoded["train"]) / (train_cfg.batch_size * train_cfg.grad_accum))
    record["params"] = {**measure.parameter_counts(model), "adapter_bytes": None, "adapter_path": None,
                        "memory_estimate": estimate.as_dict() if estimate else None}
    extractor = None
    if hparams["extract"] is not None:
        warmup = math.ceil(train_cfg.warmup_ratio * train_cfg.max_steps)
        extractor = extract.Extractor(model, extract.ExtractConfig.from_dict(hparams["extract"]),
                                      models.checkpoint_folder(hparams["model"], hparams["model_source"]), device, warmup, seed,
                                      higher_is_better=not task.causal)
    record["run"]["data"] = {name: len(rows) for name, rows in encoded.items()}

    print(f"lorabench: training {task.name}/{variant.name} seed {seed}: {len(encoded['train'])} examples, "
          f"{train_cfg.max_steps} steps, {record['params']['trainable']:,} trainable parameters", file=sys.stderr, flush=True)
    measure.reset_peak_memory(device)
    started = checkpointer.begin()  # resumed: moved back by the seconds the killed process ran
    record["train"] = train(model, variant, variant_cfg, task, encoded["train"], encoded["val"], train_cfg, tokenizer.pad_token_id,
                            device, seed, extractor, checkpointer)
    loop_seconds = time.perf_counter() - started
    with autocast(device, train_cfg.precision):
        if hparams["score_split"] == "val":
            metrics = evaluate(model, encoded["val"], task, tokenizer.pad_token_id, train_cfg.eval_batch_size, device)
        else:
            metrics, per_example = score_examples(model, tokenizer, task, splits["eval"], encoded["eval"], train_cfg.eval_batch_size, device)
        if reference:
            after = evaluate(model, reference, task, tokenizer.pad_token_id, train_cfg.eval_batch_size, device)["loss"]
    if reference:
        metrics["forgetting"] = after - forgetting_before
        forgetting.update(loss_before=forgetting_before, loss_after=after)
    record["train"]["wall_s"] = time.perf_counter() - started
    record["train"]["peak_memory_mb"], record["train"]["peak_memory_kind"] = checkpointer.peak_memory()
    if hasattr(variant, "report"):
        record["params"]["variant_report"] = variant.report(model)
    record["train"]["activation_mb"] = activation_mb(model, encoded["train"], train_cfg.batch_size, tokenizer.pad_token_id, device,
                                                     train_cfg.precision)
    if hparams["score_split"] == "val":
        record["eval"] = {"split": sweep.VALIDATION_SPLIT, "n": len(encoded["val"]), "metrics": metrics,
                          "primary": task.val_metric, "primary_value": metrics[task.val_metric]}
    else:
        record["eval"] = {"split": task.eval_split_name, "n": len(encoded["eval"]), "metrics": metrics,
                          "primary": task.primary, "primary_value": metrics[task.primary]}
        if per_example:
            record["eval"]["examples"] = per_example
    if task.sample_by and hparams["score_split"] == "eval":
        record["eval"]["inputs"] = len(set(tasks.column(splits["eval"], task.sample_by)))
    if forgetting:
        record["eval"]["forgetting"] = forgetting
    if extractor is not None:
        record["extraction"] = extraction_section(extractor, model, tokenizer, task, splits, encoded, hparams, train_cfg, device, out,
                                                  loop_seconds - extractor.total_seconds, record)
    if hparams["save_adapter"]:
        adapter_path = out.with_suffix(".safetensors")
        adapters.save(model, adapter_path, {"task": task.name, "model": hparams["model"], "seed": str(seed)})
        record["params"]["adapter_path"] = str(adapter_path)
        record["params"]["adapter_bytes"] = measure.file_bytes(adapter_path)


def load_model(task: tasks.Task, hparams: dict[str, Any], tokenizer=None):
    """The run's pretrained model and tokenizer (``tokenizer`` when loaded already): a causal LM
    for decoder tasks, else a classifier."""
    if task.causal:
        return models.load_causal_lm(hparams["model"], hparams["model_source"], tokenizer=tokenizer)
    return models.load_classifier(hparams["model"], task.num_labels, hparams["model_source"], tokenizer=tokenizer)


def score(model, tokenizer, task: tasks.Task, rows, examples: list[dict], batch_size: int, device: torch.device) -> dict[str, float]:
    """Every metric of the task on its eval split (decoders: perplexity, plus generation metrics)."""
    return score_examples(model, tokenizer, task, rows, examples, batch_size, device)[0]


def score_examples(model, tokenizer, task: tasks.Task, rows, examples: list[dict], batch_size: int,
                   device: torch.device) -> tuple[dict[str, float], dict[str, list]]:
    """:func:`score`, and what each example contributed, the record's ``eval.examples``, from
    which the analysis bootstraps significance over the evaluation examples: predictions and
    labels (and groups) of a classifier, the per-example statistics a generation task returns
    (E2E: BLEU's n-gram counts), nothing for perplexity alone."""
    if task.causal:
        metrics, per_example = evaluate(model, examples, task, tokenizer.pad_token_id, batch_size, device), {}
    else:
        predictions, labels = predict(model, examples, tokenizer.pad_token_id, batch_size, device)
        groups = [example.get("group") for example in examples]
        metrics = task.score(predictions, labels, groups)
        per_example = {"prediction": predictions, "label": labels, **({"group": groups} if any(groups) else {})}
    if task.generation_metrics is not None:
        generated = task.generation_metrics(model, tokenizer, rows, device, batch_size)
        generated, statistics = generated if isinstance(generated, tuple) else (generated, {})
        metrics.update(generated)
        per_example.update(statistics)
    return metrics, per_example


def extraction_section(extractor, tuned, tokenizer, task, splits, encoded, hparams, train_cfg, device, out: Path,
                       train_seconds: float, record: dict) -> dict[str, Any]:
    """The record's ``extraction``: what each extraction found and cost, then the base model
    plus the adapters extracted at the last step, scored at each rank and threshold asked for
    (with the fine-tuned task head, which a new head needs; on an NF4 base for ``base: nf4``, and
    with ``compare_bases`` also plain and quantization-aware extraction side by side), the adapter
    at the run's threshold saved beside the record, and the library scored."""
    section = extractor.summary(train_seconds, extract.training_flops(tuned, record["train"]["tokens"]))
    if not extractor.last:
        section["evaluations"] = []
        return section
    cfg = extractor.cfg
    bases = {kind: scoring_base(task, hparams, tuned, device, kind) for kind in ("fp32", "nf4")
             if kind == cfg.base or cfg.compare_bases}
    own = "plain" if cfg.base == "fp32" else "nf4-aware"
    plans = [(own, extractor.last, cfg.base)]
    if cfg.compare_bases:
        other, seconds = extractor.against_other_base()
        section["compare_bases"] = {"seconds": seconds}
        plans = [("plain", extractor.last if own == "plain" else other, "fp32"), ("plain", extractor.last if own == "plain" else other, "nf4"),
                 ("nf4-aware", other if own == "plain" else extractor.last, "nf4")]
    evaluations = []
    for extraction, spectra, base_kind in plans:
        base = bases[base_kind]
        for kind, value, ranks in extract.adapter_plan(spectra, cfg):
            extract.attach_extracted(base, spectra, ranks)
            with autocast(device, train_cfg.precision):
                metrics = score(base, tokenizer, task, splits["eval"], encoded["eval"], train_cfg.eval_batch_size, device)
            evaluations.append({"kind": kind, "value": value, "extraction": extraction, "base": base_kind, "metrics": metrics,
                                "primary_value": metrics[task.primary], "trainable": measure.parameter_counts(base)["trainable"],
                                "mean_rank": sum(ranks.values()) / len(ranks),
                                "ranks": {extract.layer_name(name): rank for name, rank in ranks.items()}})
            if (extraction, base_kind) == (own, cfg.base) and kind == "threshold" and value == cfg.threshold and hparams["save_adapter"]:
                about = {"task": task.name, "model": hparams["model"], "extracted_from": str(out), "threshold": str(value),
                         "extraction": own, "base": cfg.base}
                path = adapters.save(base, out.with_suffix(".extracted.safetensors"), about)
                section["adapter_path"], section["adapter_bytes"] = str(path), measure.file_bytes(path)
                if cfg.storage == "int8":
                    # What int8 storage costs: the same adapter saved as int8, loaded back and scored.
                    path = adapters.save(base, out.with_suffix(".extracted.int8.safetensors"), about, storage="int8")
                    section["int8_adapter_path"], section["int8_adapter_bytes"] = str(path), measure.file_bytes(path)
                    adapters.detach(base)
                    adapters.load(base, path)
                    with autocast(device, train_cfg.precision):
                        metrics = score(base, tokenizer, task, splits["eval"], encoded["eval"], train_cfg.eval_batch_size, device)
                    evaluations.append({**evaluations[-1], "kind": "threshold_int8", "metrics": metrics, "primary_value": metrics[task.primary]})
            adapters.detach(base)
    section["evaluations"] = evaluations
    if extractor.library is not None and extractor.library.entries:
        # The last extraction's adapter at the run's threshold, on the run's base, with the final head: scored above already.
        final = next((evaluation for evaluation in evaluations if (evaluation["extraction"], evaluation["base"], evaluation["kind"],
                      evaluation["value"]) == (own, cfg.base, "threshold", cfg.threshold)), None)
        section["library"] = library_section(extractor.library, bases[cfg.base], tokenizer, task, splits, encoded, hparams, train_cfg,
                                             device, out, (extractor.extractions[-1]["step"], final))
    return section


def scoring_base(task: tasks.Task, hparams: dict[str, Any], tuned, device: torch.device, kind: str):
    """The base model extracted adapters are scored on: full precision, or with its linear
    layers in NF4 (``quantize_base``); with the fine-tuned task head in either."""
    base, _ = load_model(task, hparams)
    base.to(device)  # then quantized where it runs, as the training path and nf4_roundtrip quantize
    if kind == "nf4":
        quantize.quantize_base(base, "nf4")
    for head in adapters.task_heads(base):
        getattr(base, head).load_state_dict(getattr(tuned, head).state_dict())
    return base


def library_section(kept: library.Library, base, tokenizer, task, splits, encoded, hparams, train_cfg, device, out: Path,
                    final: tuple[int, dict | None] = (-1, None)) -> dict[str, Any]:
    """Every adapter of the library scored on the validation split (at the threshold and at each
    fixed library rank) with the task head of its own step, the best by validation also on the
    reported split (unless it is the last step's, whose score ``final`` = (step, its evaluation)
    holds); then the library saved beside the record with those scores."""
    heads = adapters.head_tensors(base)
    for entry in kept.entries:
        with torch.no_grad():
            for key, tensor in entry.head.items():
                heads[key].copy_(tensor)
        for rank in (None, *kept.library_ranks):
            library.attach_factors(base, entry.factors, entry.ranks_at(rank))
            if encoded.get("val"):
                with autocast(device, train_cfg.precision):
                    value = evaluate(base, encoded["val"], task, tokenizer.pad_token_id, train_cfg.eval_batch_size, device)[task.val_metric]
                entry.scores["threshold" if rank is None else f"rank{rank}"] = value
            adapters.detach(base)
    section: dict[str, Any] = {"keep": kept.keep, "library_ranks": list(kept.library_ranks), "extractions": kept.extractions}
    if encoded.get("val"):
        best = library.choose(kept.entries, best=True, higher_is_better=kept.higher_is_better)
        final_step, scored = final
        if best.step == final_step and scored is not None:
            metrics, trainable = scored["metrics"], scored["trainable"]
        else:
            with torch.no_grad():
                for key, tensor in best.head.items():
                    heads[key].copy_(tensor)
            library.attach_factors(base, best.factors, best.ranks)
            with autocast(device, train_cfg.precision):
                metrics = score(base, tokenizer, task, splits["eval"], encoded["eval"], train_cfg.eval_batch_size, device)
            trainable = measure.parameter_counts(base)["trainable"]
            adapters.detach(base)
        section["best"] = {"step": best.step, "validation": best.scores["threshold"], "metrics": metrics, "primary_value": metrics[task.primary],
                           "mean_rank": sum(best.ranks.values()) / len(best.ranks), "trainable": trainable}
    path = kept.save(out.with_suffix(".library.safetensors"), {"task": task.name, "model": hparams["model"], "extracted_from": str(out),
                                                               "base": extract.ExtractConfig.from_dict(hparams["extract"]).base})
    section.update(path=str(path), bytes=measure.file_bytes(path), memory_bytes=kept.nbytes(), entries=[entry.about() for entry in kept.entries])
    return section


def forgetting_reference(task: tasks.Task, tokenizer, hparams: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """Blocks of the reference text whose cross-entropy, before and after fine-tuning, measures
    what a decoder run forgets (as PEFT's method comparison does), and the record's note on it;
    nothing for encoder tasks. Read before the model loads: a reference whose data is absent
    costs no minutes, the run goes on and its record says forgetting was not measured, and why."""
    if not task.causal or not hparams["forgetting_tokens"]:
        return [], {}
    name, count = hparams["forgetting_reference"], hparams["forgetting_tokens"]
    try:
        if name in tasks.REGISTRY:
            reference = tasks.get(name)
            text = reference.load(hparams["data_dir"], hparams["data_source"])["eval"]
            blocks = tasks.encode_cached(reference, tokenizer, text, hparams["max_length"], "head", models.cache_dir() / "encoded")
            described = f"{name} eval split, first {count} tokens"
        else:
            rows = datasets.Dataset.from_dict({"text": lm.chunks(tasks.read_text(Path(name)))})
            blocks, described = lm.encode(tokenizer, rows, hparams["max_length"]), f"{name}, first {count} tokens"
    except (tasks.DataError, OSError) as error:
        print(f"lorabench: forgetting not measured: {error}", file=sys.stderr, flush=True)
        return [], {"reference": name, "measured": False, "reason": str(error)}
    kept, budget = [], count
    for example in blocks:
        if budget <= 0:
            break
        kept.append({key: value[:budget] for key, value in example.items()})
        budget -= len(kept[-1]["input_ids"])
    return kept, {"reference": described, "measured": True}


def activation_mb(model, examples: list[dict], batch_size: int, pad_id: int, device: torch.device, precision: str) -> float:
    """Activation memory of a training step on the longest batch: what the variant itself
    costs, comparable across devices (CPU peak RSS is too coarse to separate variants), in
    the precision and with the gradient checkpointing the run trained with."""
    longest = sorted(examples, key=lambda example: len(example["input_ids"]))[-batch_size:]
    model.train()
    with autocast(device, precision):
        return measure.saved_activation_bytes(model, collate(longest, pad_id, device), task_loss) / 2**20


def hyper_parameter_help() -> str:
    """The --set keys and their defaults, as --help shows them."""
    train_defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    lines = ["hyper-parameters (--set KEY=VALUE) and their defaults:"]
    for key, value in {**ENGINE_DEFAULTS, **train_defaults}.items():
        lines.append(f"  {key}={value}".ljust(27) + " " + ENGINE_HELP.get(key, ""))
    for name, variant in variants.REGISTRY.items():
        fields = variants.config_fields(variant)
        if fields:
            lines.append(f"  variant {name}: " + " ".join(f"{key}={value}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-3")
        overrides[key.strip()] = parse_value(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.run", description=__doc__.split("\n\n")[0],
                                     epilog=hyper_parameter_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(tasks.REGISTRY)}, or a name --task-spec declares")
    parser.add_argument("--task-spec", help="declare --task from your own files: a study config's datasets entry, as JSON or a "
                                            "YAML file (tasks/files.py)")
    parser.add_argument("--variant", required=True, help=f"one of: {', '.join(variants.REGISTRY)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", default="default", help="name of the hyper-parameter setting (a folder of the record path)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override hyper-parameters (repeatable: --set a=1 --set b=2 sets both)")
    # Not the study's results folder: a hand-run record there would pass for the study's run of the
    # same path, and Snakemake would never train that one (`python -m analysis.report results/manual`).
    parser.add_argument("--results", default="results/manual", help="results folder (default: results/manual, away from the study's)")
    parser.add_argument("--out", help="record path (default: RESULTS/runs/TASK/VARIANT/SETTING/seedS.json)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--selection", help="a sweep's selection file (python -m lorabench.sweep): its hyper-parameters win over --set")
    chosen.add_argument("--rates", help="a tuned-rates file (python -m lorabench.rates, config/rates.yaml): train at the task and "
                                        "variant's tuned rate, which wins over --set")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else records.record_path(args.results, args.task, args.variant, args.setting, args.seed)
    try:
        if args.task_spec:
            spec_text = Path(args.task_spec).read_text() if Path(args.task_spec).suffix in (".yaml", ".yml") else args.task_spec
            files.declare(args.task, yaml.safe_load(spec_text), "--task-spec")
        if args.rates:
            selection = rates.selection_for(args.rates, args.task, args.variant, args.setting)
        else:
            selection = sweep.read_selection(args.selection) if args.selection else None
        record = execute(args.task, args.variant, args.seed, args.setting, parse_sets(args.set), out, selection)
    except (ConfigError, tasks.DataError, files.DeclarationError, adapters.AdapterError, quantize.QuantizeError, UnknownNameError, FileNotFoundError,
            sweep.SelectionError, checkpoint.CheckpointError, sizing.SizingError, rates.RatesError) as error:
        print(f"lorabench.run: error: {error}", file=sys.stderr)
        return 2
    summary = f"{record['status']}: {args.task}/{args.variant} seed {args.seed}"
    if record["status"] == "ok":
        summary += f" {record['eval']['primary']}={record['eval']['primary_value']:.4f} in {record['train']['wall_s']:.0f}s"
    else:
        summary += f" ({record['error']['message']})"
    print(f"{summary} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
