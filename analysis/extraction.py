"""Parasitic extraction, from the run records' ``extraction`` sections: tidy tables, which
``analysis.aggregate`` writes with the others and ``analysis.plots`` draws (how low-rank the
update is, what an extracted adapter keeps, what it costs). It imports no other analysis module.

Tables, under ``RESULTS_DIR/tables``:
- ``extraction_layers.csv``: one row per extraction x matrix: step, triggers, layer type, the
  rank chosen at the run's threshold and the variance it explains, ||dW||_F;
- ``extraction_spectrum.csv``: one row per extraction x matrix x rank: the variance explained
  at that rank, relative to ||dW||_F^2;
- ``extraction_scores.csv``: one row per extracted adapter scored (by rank or by threshold):
  score, trainable parameters, mean rank;
- ``extraction_overhead.csv``: one row per run: interval, number of extractions, seconds and
  FLOPs against training's, the snapshot's memory.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from lorabench import records

# Matrix name -> layer type, first match wins (BERT and Llama names).
LAYER_TYPES = (
    ("query", r"(query|q_proj)$"),
    ("key", r"(key|k_proj)$"),
    ("value", r"(value|v_proj)$"),
    ("attention out", r"(attention\.output\.dense|o_proj)$"),
    ("MLP in", r"(intermediate\.dense|gate_proj|up_proj)$"),
    ("MLP out", r"(output\.dense|down_proj)$"),
    ("pooler", r"pooler\.dense$"),
    ("embedding", r"embed"),
)
KEY = ["task", "variant", "setting", "seed"]
TABLES = ("extraction_layers", "extraction_spectrum", "extraction_scores", "extraction_overhead")


def layer_type(matrix: str) -> str:
    name = matrix.removesuffix(".weight")
    return next((kind for kind, pattern in LAYER_TYPES if re.search(pattern, name)), "other")


def tables(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The four extraction tables from every successful record that has an extraction."""
    layers, spectrum, scores, overhead = [], [], [], []
    for record in records.read_all(results_dir):
        section = record.get("extraction")
        if record["status"] != "ok" or not section:
            continue
        key = {name: record["run"][name] for name in KEY}
        config = section["config"]
        for entry in section["extractions"]:
            for matrix, found in entry["layers"].items():
                where = {**key, "step": entry["step"], "triggers": "+".join(entry["triggers"]), "layer": matrix.removesuffix(".weight"),
                         "layer_type": layer_type(matrix)}
                layers.append({**where, "threshold": config["threshold"], "rank": found["rank"], "explained": found["explained"],
                               "norm": found["norm"]})
                spectrum += [{**where, "rank": int(rank), "explained": value} for rank, value in found["explained_at"].items()]
        for evaluation in section.get("evaluations", []):
            scores.append({**key, "kind": evaluation["kind"], "value": evaluation["value"], "primary_metric": record["eval"]["primary"],
                           "score": evaluation["primary_value"], "full_score": record["eval"]["primary_value"],
                           "trainable": evaluation["trainable"], "mean_rank": evaluation["mean_rank"]})
        cost, snapshot = section["overhead"], section["snapshot"]
        count = len(section["extractions"])
        overhead.append({**key, "interval": config["interval"], "extractions": count, "seconds": cost["seconds"],
                         "seconds_per_extraction": cost["seconds"] / count if count else math.nan,
                         "train_seconds": cost["train_seconds"], "percent_time": cost["percent_time"], "flops": cost["flops"],
                         "train_flops": cost["train_flops"], "percent_flops": cost["percent_flops"], "snapshot": snapshot["kind"],
                         "snapshot_copied_mb": snapshot["copied_mb"], "snapshot_mapped_mb": snapshot["mapped_mb"]})
    columns = {
        "extraction_layers": [*KEY, "step", "triggers", "layer", "layer_type", "threshold", "rank", "explained", "norm"],
        "extraction_spectrum": [*KEY, "step", "triggers", "layer", "layer_type", "rank", "explained"],
        "extraction_scores": [*KEY, "kind", "value", "primary_metric", "score", "full_score", "trainable", "mean_rank"],
        "extraction_overhead": [*KEY, "interval", "extractions", "seconds", "seconds_per_extraction", "train_seconds", "percent_time",
                                "flops", "train_flops", "percent_flops", "snapshot", "snapshot_copied_mb", "snapshot_mapped_mb"],
    }
    rows = dict(zip(TABLES, (layers, spectrum, scores, overhead)))
    return {name: pd.DataFrame(rows[name], columns=columns[name]) for name in TABLES}


def read_tables(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    folder = Path(results_dir, "tables")
    return {name: pd.read_csv(folder / f"{name}.csv") for name in TABLES}


def retained(scores: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per task and threshold: the extracted adapter's score as a share of full fine-tuning's,
    beside LoRA trained with the nearest number of trainable parameters (log distance)."""
    rows = []
    lora = summary[(summary["variant"] == "lora") & summary["score_mean"].notna() & (summary["setting"] != "base")]
    for (task, threshold), group in scores[scores["kind"] == "threshold"].groupby(["task", "value"], sort=True):
        score, full, trainable = group["score"].mean(), group["full_score"].mean(), group["trainable"].mean()
        row = {"task": task, "threshold": threshold, "mean rank": group["mean_rank"].mean(), "trainable params": round(trainable),
               "extracted score": score, "full score": full, "retained %": 100 * score / full if full else math.nan}
        candidates = lora[lora["task"] == task]
        if len(candidates):
            nearest = candidates.iloc[(candidates["trainable"].map(math.log) - math.log(trainable)).abs().argsort().iloc[0]]
            row.update({"LoRA (nearest size)": f"{nearest['setting']}: {nearest['trainable']:,.0f} params",
                        "LoRA score": nearest["score_mean"]})
        rows.append(row)
    return pd.DataFrame(rows)


def overhead_summary(overhead: pd.DataFrame) -> pd.DataFrame:
    """Per task and interval, means over runs: the figures the overhead claim rests on."""
    if overhead.empty:
        return pd.DataFrame(columns=["task", "interval", "runs", "extractions", "s per extraction", "% of training time",
                                     "% of training FLOPs", "snapshot", "snapshot MB copied"])
    grouped = overhead.groupby(["task", "interval"], sort=True)
    return pd.DataFrame({
        "runs": grouped.size(),
        "extractions": grouped["extractions"].mean(),
        "s per extraction": grouped["seconds_per_extraction"].mean(),
        "% of training time": grouped["percent_time"].mean(),
        "% of training FLOPs": grouped["percent_flops"].mean(),
        "snapshot": grouped["snapshot"].agg(lambda kinds: ", ".join(sorted(set(kinds)))),
        "snapshot MB copied": grouped["snapshot_copied_mb"].mean(),
    }).reset_index()


# --- figures -------------------------------------------------------------------------------------
