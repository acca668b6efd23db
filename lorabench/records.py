"""The run record: one JSON file per training run, the only thing analysis reads.

A record is written once, atomically (temporary file + rename in the same folder), so an
interrupted run leaves either no record or a whole one, and Snakemake reruns the missing
ones. A failed run still writes its record, with ``status: failed`` and the error, so the
report can show it.

Layout (``SCHEMA_VERSION`` 1)::

    schema_version  int
    status          "ok" | "failed"
    error           null | {type, message, step}
    run             {task, variant, setting, model, seed, hparams{...}, config_hash}
    params          {trainable, total, adapter_bytes, adapter_path,
                     memory_estimate (null, or lorabench.sizing's floor from before the model
                     loaded: parameters_mb, optimizer_mb, activation_mb, total_mb, batch),
                     variant_report (optional: what the variant reports, e.g. AdaLoRA's ranks)}
    train           {steps, samples, tokens, wall_s, timed_s, timed_steps,
                     tokens_per_s, samples_per_s (null when no step was timed),
                     peak_memory_mb, peak_memory_kind,
                     activation_mb (autograd's saved tensors for the longest batch),
                     precision ("fp32" | "bf16": what ran, precision=auto resolved),
                     checkpoint_every, resumed_from_step (null, or the step of the
                     checkpoint a killed run resumed from; wall_s, timed_s and peak
                     memory then span both processes), resumed_threads (the CPU threads
                     of the process that wrote that checkpoint),
                     loss_curve[[step, loss]], val_curve[[step, value]]}
    eval            {split, n, metrics{name: value}, primary, primary_value,
                     examples (the reported split only, optional): per example, in the
                     split's order, what the analysis bootstraps significance from:
                     prediction, label (and group) for classifiers; bleu_stats
                     [hyp_len, ref_len, 4 n-gram matches, 4 n-gram totals] and input
                     (a hash of each MR) for E2E}
    extraction      null | {...}   (parasitic extraction, full fine-tuning only)
    meta            {lorabench_version, python, platform, hostname, device, threads,
                     packages{name: version}, git_commit, git_dirty, started_at, finished_at}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lorabench import files

SCHEMA_VERSION = 1

# Metrics where smaller is better (a best score is a minimum): analysis and sweeps read this.
LOWER_IS_BETTER = frozenset({"loss", "eval_loss", "perplexity", "ppl", "wer", "cer", "ter", "forgetting"})

SECTIONS = ("schema_version", "status", "error", "run", "params", "train", "eval", "extraction", "meta")

REQUIRED_RUN_KEYS = ("task", "variant", "setting", "model", "seed", "hparams", "config_hash")


def config_hash(hparams: dict[str, Any]) -> str:
    """A short, stable hash of the resolved hyper-parameters (key order does not matter)."""
    canonical = json.dumps(hparams, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def record_path(results_dir: str | os.PathLike, task: str, variant: str, setting: str, seed: int) -> Path:
    return Path(results_dir) / "runs" / task / variant / setting / f"seed{seed}.json"


def new_record(run: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """An empty record for a run that has not trained yet; filled in as the run goes."""
    missing = [key for key in REQUIRED_RUN_KEYS if key not in run]
    if missing:
        raise ValueError(f"run section lacks {missing}; it needs {list(REQUIRED_RUN_KEYS)}")
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "error": None,
        "run": run,
        "params": None,
        "train": None,
        "eval": None,
        "extraction": None,
        "meta": meta,
    }


def validate(record: dict[str, Any], source: str = "<record>") -> dict[str, Any]:
    """Check the parts of a record that analysis relies on; raise naming the file and field."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: a run record must be a JSON object")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{source}: schema_version is {version!r}, this lorabench reads {SCHEMA_VERSION}; "
            "rerun the training job or use the lorabench version that wrote it"
        )
    missing = [key for key in SECTIONS if key not in record]
    if missing:
        raise ValueError(f"{source}: missing sections {missing}")
    if record["status"] not in ("ok", "failed"):
        raise ValueError(f"{source}: status is {record['status']!r}, expected 'ok' or 'failed'")
    missing = [key for key in REQUIRED_RUN_KEYS if key not in record["run"]]
    if missing:
        raise ValueError(f"{source}: run section lacks {missing}")
    if record["status"] == "ok":
        for section in ("params", "train", "eval"):
            if not isinstance(record[section], dict):
                raise ValueError(f"{source}: status is 'ok' but section {section!r} is empty")
    elif not isinstance(record["error"], dict):
        raise ValueError(f"{source}: status is 'failed' but 'error' is empty")
    return record


def write_atomic(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write JSON so that readers see the old file, or the whole new one, never a part; the
    record is serialized before the file is touched, so a value JSON cannot hold changes nothing."""
    validate(record, str(path))
    return files.write_text_atomic(path, json.dumps(record, indent=1, default=_json_default) + "\n")


def read(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it and rerun its training job") from error
    return validate(record, str(path))


def read_all(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record under ``results_dir/runs``, sorted by path so tables are stable."""
    return [read(path) for path in sorted(Path(results_dir, "runs").rglob("*.json"))]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a run record")
