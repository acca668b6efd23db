"""Parasitic extraction, from the run records' ``extraction`` sections: tidy tables and the
three figures (how low-rank the update is, what an extracted adapter keeps, what it costs).

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
import seaborn as sns
from matplotlib.figure import Figure

from analysis import aggregate  # used at call time only: aggregate imports this module
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
FIGURES = ("rank_vs_variance", "score_vs_rank", "overhead_vs_interval")


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


def write_tables(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    found = tables(results_dir)
    for name, table in found.items():
        aggregate.write_csv(table, Path(results_dir, "tables", f"{name}.csv"))
    return found


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


def _grid(names: list[str], ncols: int, width: float, height: float, title: str):
    figure = Figure(figsize=(width * ncols, height * max(1, len(names)) + 0.8), layout="constrained")
    axes = figure.subplots(max(1, len(names)), ncols, squeeze=False)
    figure.suptitle(title)
    return figure, axes


def rank_vs_variance(spectrum: pd.DataFrame, layers: pd.DataFrame) -> Figure:
    """Left: variance explained against rank at the last extraction, per layer type (mean over
    matrices). Right: the rank the threshold needed at each extraction step, per layer type
    (bars when the run extracted once). One legend for the whole figure."""
    tasks = sorted(set(spectrum["task"]) | set(layers["task"])) or ["no extraction yet"]
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure, axes = _grid(tasks, 2, 4.8, 3.4, "How low-rank is full fine-tuning's update?")
        for row, task in enumerate(tasks):
            left, right = axes[row]
            rows = spectrum[(spectrum["task"] == task) & (spectrum["setting"] == _main_setting(spectrum, task))]
            last = rows[rows["step"] == rows["step"].max()]
            if len(last):
                sns.lineplot(last, x="rank", y="explained", hue="layer_type", style="layer_type", markers=True, dashes=False,
                             errorbar=None, ax=left, hue_order=_layer_order(last), style_order=_layer_order(last), legend=False)
            left.set_xscale("log", base=2)
            left.set_ylim(0, 1.02)
            left.set_xlabel("rank r (log scale)")
            left.set_ylabel("variance of dW explained, EV(r)")
            left.set_title(f"{task}: at step {int(last['step'].max()) if len(last) else '-'}")
            chosen = layers[(layers["task"] == task) & (layers["setting"] == _main_setting(layers, task))]
            _draw_chosen_ranks(right, task, chosen)
        _layer_legend(figure)
    return figure


def _layer_order(rows: pd.DataFrame) -> list[str]:
    order = [kind for kind, _ in LAYER_TYPES] + ["other"]
    return [kind for kind in order if kind in set(rows["layer_type"])]


def _draw_chosen_ranks(ax, task: str, chosen: pd.DataFrame) -> None:
    """The rank chosen per layer type: lines over the extraction steps, or bars when there is
    only one extraction (a line of one point says nothing)."""
    ax.set_ylabel("rank chosen (mean over matrices)")
    if chosen.empty:
        ax.set_title(f"{task}: no extraction")
        return
    order, threshold = _layer_order(chosen), chosen["threshold"].iloc[0]
    steps = sorted(chosen["step"].unique())
    if len(steps) > 1:
        sns.lineplot(chosen, x="step", y="rank", hue="layer_type", style="layer_type", markers=True, dashes=False,
                     errorbar=None, ax=ax, hue_order=order, style_order=order)
        ax.set_xlabel("training step")
        ax.set_title(f"{task}: rank for EV >= {threshold:g}, over training")
    else:
        sns.barplot(chosen, x="layer_type", y="rank", hue="layer_type", order=order, hue_order=order, errorbar=None, ax=ax, legend=False)
        ax.set_xlabel("layer type")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(f"{task}: rank for EV >= {threshold:g} at step {int(steps[0])} (the only extraction)")
    if ax.get_legend() is not None:
        ax.get_legend().remove()


def _layer_legend(figure: Figure) -> None:
    handles = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 7), title="layer type")


def _main_setting(table: pd.DataFrame, task: str) -> str:
    """The setting to draw for a task: ``default`` when it has an extraction, else the first."""
    settings = sorted(table.loc[table["task"] == task, "setting"].unique())
    return "default" if "default" in settings or not settings else settings[0]


def score_vs_rank(scores: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Score against rank: adapters extracted from full fine-tuning (by rank, and by threshold at
    their mean rank) beside LoRA trained at that rank; full fine-tuning and the base model as
    horizontal lines."""
    tasks = sorted(scores["task"].unique()) or ["no extraction yet"]
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(max(7.5, 5.2 * len(tasks)), 4.6), layout="constrained")
        axes = figure.subplots(1, max(1, len(tasks)), squeeze=False)[0]
        figure.suptitle("What an adapter extracted from full fine-tuning keeps")
        for ax, task in zip(axes, tasks):
            rows = scores[scores["task"] == task]
            by_rank = rows[rows["kind"] == "rank"].groupby("value")["score"].mean()
            ax.plot(by_rank.index, by_rank.values, marker="o", color="#0173b2", label="extracted (rank r everywhere)")
            by_threshold = rows[rows["kind"] == "threshold"].groupby("value")[["mean_rank", "score"]].mean()
            ax.plot(by_threshold["mean_rank"], by_threshold["score"], linestyle="none", marker="D", color="#de8f05",
                    label="extracted (EV threshold; x = mean rank)")
            _label_thresholds(ax, by_threshold)
            lora = _lora_by_rank(summary, task)
            if len(lora):
                ax.plot(lora.index, lora.values, marker="s", color="#029e73", label="LoRA trained at rank r")
            task_summary = summary[summary["task"] == task]
            full = aggregate.full_reference(task_summary)
            if full is not None:
                ax.axhline(full["score_mean"], color="black", linestyle="--", linewidth=1, label="full fine-tuning")
            base = task_summary[task_summary["setting"] == "base"]["score_mean"].dropna()
            if len(base):
                ax.axhline(base.iloc[0], color="grey", linestyle=":", linewidth=1.2, label="base model (untrained)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r (log scale)")
            ax.set_ylabel(aggregate.score_label(task_summary) if len(task_summary) else "score")
            ax.set_title(task)
        handles = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        if handles:
            figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2)
    return figure


def _label_thresholds(ax, by_threshold: pd.DataFrame) -> None:
    """Each threshold's label near the bottom of the panel under its diamond, one step higher
    per diamond to its left, with a thin leader line: labels of nearby thresholds never overlap
    each other, and the curves, which sit high, stay clear."""
    for index, (threshold, point) in enumerate(by_threshold.sort_values("mean_rank").iterrows()):
        ax.annotate(f"EV {threshold:g}", (point["mean_rank"], point["score"]), xytext=(point["mean_rank"], 0.05 + 0.07 * index),
                    textcoords=ax.get_xaxis_transform(), ha="center", fontsize=7, color="#8c5a00",
                    arrowprops={"arrowstyle": "-", "color": "#de8f05", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3})


def _lora_by_rank(summary: pd.DataFrame, task: str) -> pd.Series:
    """LoRA's score by the rank it trained at, from the summary's hp_rank (any setting but base)."""
    rows = summary[(summary["task"] == task) & (summary["variant"] == "lora") & (summary["setting"] != "base")]
    if "rank" not in rows.columns:
        return pd.Series(dtype=float)
    return rows.dropna(subset=["rank", "score_mean"]).groupby("rank")["score_mean"].mean().sort_index()


def overhead_vs_interval(overhead: pd.DataFrame) -> Figure:
    """Extraction cost against the interval between extractions, as a share of training's time
    and of its FLOPs."""
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(9.6, 3.8), layout="constrained")
        left, right = figure.subplots(1, 2)
        figure.suptitle("What parasitic extraction costs")
        for ax, column, label in ((left, "percent_time", "% of training time"), (right, "percent_flops", "% of training FLOPs")):
            if len(overhead):
                sns.lineplot(overhead, x="interval", y=column, hue="task", style="task", markers=True, dashes=False, errorbar=None, ax=ax)
            ax.set_xscale("log")
            ax.set_xlabel("steps between extractions (log scale)")
            ax.set_ylabel(label)
    return figure


def write_figures(results_dir: str | os.PathLike, found: dict[str, pd.DataFrame], summary: pd.DataFrame) -> list[Path]:
    from analysis.plots import save

    folder = Path(results_dir, "figures")
    paths = []
    paths += save(rank_vs_variance(found["extraction_spectrum"], found["extraction_layers"]), folder / "rank_vs_variance")
    paths += save(score_vs_rank(found["extraction_scores"], summary), folder / "score_vs_rank")
    paths += save(overhead_vs_interval(found["extraction_overhead"]), folder / "overhead_vs_interval")
    return paths
