"""Parasitic extraction, from the run records' ``extraction`` sections: tidy tables, which
``analysis.aggregate`` writes with the others and ``analysis.plots`` draws (how low-rank the
update is, what an extracted adapter keeps, what it costs). It imports no other analysis module.

Tables, under ``RESULTS_DIR/tables``:
- ``extraction_layers.csv``: one row per extraction x matrix: step, triggers, layer type, the
  rank chosen at the run's threshold and the variance it explains, ||dW||_F;
- ``extraction_spectrum.csv``: one row per extraction x matrix x rank: the variance explained
  at that rank, relative to ||dW||_F^2;
- ``extraction_scores.csv``: one row per extracted adapter scored (by rank or by threshold; plain
  or NF4-aware extraction, on a full-precision or an NF4 base): score, trainable parameters, mean rank;
- ``extraction_overhead.csv``: one row per run: interval, number of extractions, seconds and
  FLOPs against training's (the SVDs and the library's U and V), the snapshot's memory;
- ``extraction_library.csv``: one row per step of a run with a library and per curve: the full
  fine-tune's validation score at that step (``full``) and its extracted adapter's, with the
  head of that step, at the threshold (``threshold``) and at each fixed library rank (``rank8``...);
- ``extraction_library_choice.csv``: one row per run: the library's best adapter by validation
  (its step and reported score) and its last one, beside full fine-tuning's score.
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
TABLES = ("extraction_layers", "extraction_spectrum", "extraction_scores", "extraction_overhead", "extraction_library",
          "extraction_library_choice")


def layer_type(matrix: str) -> str:
    name = matrix.removesuffix(".weight")
    return next((kind for kind, pattern in LAYER_TYPES if re.search(pattern, name)), "other")


def tables(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The extraction tables from every successful record that has an extraction."""
    layers, spectrum, scores, overhead, curves, choices = [], [], [], [], [], []
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
            scores.append({**key, "kind": evaluation["kind"], "value": evaluation["value"], "extraction": evaluation.get("extraction", "plain"),
                           "base": evaluation.get("base", "fp32"), "primary_metric": record["eval"]["primary"],
                           "score": evaluation["primary_value"], "full_score": record["eval"]["primary_value"],
                           "trainable": evaluation["trainable"], "mean_rank": evaluation["mean_rank"]})
        cost, snapshot = section["overhead"], section["snapshot"]
        count = len(section["extractions"])
        overhead.append({**key, "interval": config["interval"], "extractions": count, "seconds": cost["seconds"],
                         "seconds_per_extraction": cost["seconds"] / count if count else math.nan,
                         "train_seconds": cost["train_seconds"], "percent_time": cost["percent_time"], "flops": cost["flops"],
                         "train_flops": cost["train_flops"], "percent_flops": cost["percent_flops"], "snapshot": snapshot["kind"],
                         "snapshot_copied_mb": snapshot["copied_mb"], "snapshot_mapped_mb": snapshot["mapped_mb"],
                         "library_seconds": cost.get("library_seconds", 0.0), "library_flops": cost.get("library_flops", 0)})
        kept = section.get("library")
        if kept:
            metric = record["eval"]["primary"]
            curves += [{**key, "step": step, "curve": "full", "validation": value, "mean_rank": math.nan}
                       for step, value in record["train"].get("val_curve", [])]
            for entry in kept["entries"]:
                mean_rank = sum(entry["ranks"].values()) / len(entry["ranks"])
                for curve, value in entry["scores"].items():
                    rank = mean_rank if curve == "threshold" else float(curve.removeprefix("rank"))
                    curves.append({**key, "step": entry["step"], "curve": curve, "validation": value, "mean_rank": rank})
            last = kept["entries"][-1]
            own = ("plain" if config.get("base", "fp32") == "fp32" else "nf4-aware", config.get("base", "fp32"))
            final = next((e for e in section.get("evaluations", []) if e["kind"] == "threshold" and e["value"] == config["threshold"]
                          and (e.get("extraction", "plain"), e.get("base", "fp32")) == own), None)
            best = kept.get("best") or {}
            choices.append({**key, "primary_metric": metric, "full_score": record["eval"]["primary_value"],
                            "best_step": best.get("step", math.nan), "best_validation": best.get("validation", math.nan),
                            "best_score": best.get("primary_value", math.nan), "best_mean_rank": best.get("mean_rank", math.nan),
                            "last_step": last["step"], "last_validation": last["scores"].get("threshold", math.nan),
                            "last_score": final["primary_value"] if final else math.nan,
                            "last_mean_rank": sum(last["ranks"].values()) / len(last["ranks"]), "entries": len(kept["entries"]),
                            "library_mb": kept["bytes"] / 2**20})
    columns = {
        "extraction_layers": [*KEY, "step", "triggers", "layer", "layer_type", "threshold", "rank", "explained", "norm"],
        "extraction_spectrum": [*KEY, "step", "triggers", "layer", "layer_type", "rank", "explained"],
        "extraction_scores": [*KEY, "kind", "value", "extraction", "base", "primary_metric", "score", "full_score", "trainable", "mean_rank"],
        "extraction_overhead": [*KEY, "interval", "extractions", "seconds", "seconds_per_extraction", "train_seconds", "percent_time",
                                "flops", "train_flops", "percent_flops", "snapshot", "snapshot_copied_mb", "snapshot_mapped_mb",
                                "library_seconds", "library_flops"],
        "extraction_library": [*KEY, "step", "curve", "validation", "mean_rank"],
        "extraction_library_choice": [*KEY, "primary_metric", "full_score", "best_step", "best_validation", "best_score", "best_mean_rank",
                                      "last_step", "last_validation", "last_score", "last_mean_rank", "entries", "library_mb"],
    }
    rows = dict(zip(TABLES, (layers, spectrum, scores, overhead, curves, choices)))
    return {name: pd.DataFrame(rows[name], columns=columns[name]) for name in TABLES}


def read_tables(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    folder = Path(results_dir, "tables")
    return {name: pd.read_csv(folder / f"{name}.csv") for name in TABLES}


def plain(scores: pd.DataFrame) -> pd.DataFrame:
    """Adapters extracted against W0 and scored on the full-precision base: what every run has."""
    return scores[(scores["extraction"] == "plain") & (scores["base"] == "fp32")]


def on_nf4(scores: pd.DataFrame, summary: pd.DataFrame, ranks: tuple[int, ...] = (8, 64)) -> pd.DataFrame:
    """Per task, at each threshold and at ``ranks``: plain extraction on the fp32 and on the NF4
    base, NF4-aware extraction on the NF4 base (runs with ``compare_bases``), beside full
    fine-tuning and ``qlora`` trained at that rank where the study has it. Means over seeds."""
    compared = scores[scores["kind"].isin(["rank", "threshold"]) & (scores["base"] == "nf4")]
    runs = scores.set_index(KEY).index.isin(compared.set_index(KEY).index)
    scores = scores[runs]  # only the runs that compared bases: their fp32 rows are the same runs' plain adapters
    rows = []
    for task in sorted(compared["task"].unique()):
        found = scores[(scores["task"] == task) & scores["kind"].isin(["rank", "threshold"])]
        found = found[(found["kind"] == "threshold") | found["value"].isin(ranks)]
        qlora = summary[(summary["task"] == task) & (summary["variant"] == "qlora") & (summary["setting"] != "base")]
        for (kind, value), group in found.groupby(["kind", "value"], sort=True):
            cell = group.groupby(["extraction", "base"])["score"].mean()
            ranks = group.groupby("extraction")["mean_rank"].mean()
            row = {"task": task, "adapter": f"EV {value:g}" if kind == "threshold" else f"rank {value:g}",
                   "mean rank (plain)": ranks.get("plain", math.nan), "mean rank (NF4-aware)": ranks.get("nf4-aware", math.nan),
                   "plain, fp32 base": cell.get(("plain", "fp32"), math.nan),
                   "plain, NF4 base": cell.get(("plain", "nf4"), math.nan), "NF4-aware, NF4 base": cell.get(("nf4-aware", "nf4"), math.nan),
                   "full": group["full_score"].mean()}
            at_rank = qlora[qlora["rank"] == value]["score_mean"] if kind == "rank" and "rank" in qlora else pd.Series(dtype=float)
            row["qlora at that rank"] = at_rank.mean() if len(at_rank) else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def retained(scores: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per task and threshold: the extracted adapter's score as a share of full fine-tuning's,
    beside LoRA trained with the nearest number of trainable parameters (log distance)."""
    scores = plain(scores)
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


def library_choices(choices: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per task, means over seeds: full fine-tuning, the library's last adapter (at the run's
    threshold) and its best by validation, with the step it came from, beside LoRA (default setting)."""
    rows = []
    for task, group in choices.groupby("task", sort=True):
        lora = summary[(summary["task"] == task) & (summary["variant"] == "lora") & (summary["setting"] == "default")]["score_mean"]
        rows.append({"task": task, "seeds": len(group), "full": group["full_score"].mean(),
                     "last adapter": group["last_score"].mean(), "last mean rank": group["last_mean_rank"].mean(),
                     "best adapter": group["best_score"].mean(), "best mean rank": group["best_mean_rank"].mean(),
                     "best from steps": ", ".join(f"{step:g}" for step in group["best_step"]),
                     "LoRA": lora.iloc[0] if len(lora) else math.nan, "library MB": group["library_mb"].mean()})
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
