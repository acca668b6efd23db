"""Figures from the summary table, with one colour and marker per variant in every figure.

Figures are built on ``matplotlib.figure.Figure`` directly (rendered by Agg), not through
pyplot, so no global backend or figure registry is touched and callers can inspect the
returned figure.

``python -m analysis.plots RESULTS_DIR`` reads ``RESULTS_DIR/tables/summary.csv`` and the
extraction tables and writes ``RESULTS_DIR/figures/<name>.png`` (150 dpi) and ``<name>.pdf`` for
``score_vs_params``, ``cost_vs_full`` and the extraction figures (``analysis/extraction.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis import extraction, significance
from analysis.aggregate import (
    BASE_SETTING,
    DEFAULT_SETTING,
    FULL,
    VARIANT_ORDER,
    full_reference,
    pareto_front,
    runs_from_tidy,
    score_label,
    task_lower_is_better,
    variant_order,
)
from lorabench import files

DPI = 150
# Full fine-tuning, the reference, is a black star (and a dashed line). The others take
# seaborn's colour-blind palette without grey and yellow (too close to black, too faint on
# white), then five hues of its "dark" palette, so each known variant has its own colour;
# every variant also has its own marker, so the figure still reads in greyscale.
FULL_STYLE = ("#000000", "*")
_COLORBLIND, _DARK = sns.color_palette("colorblind", 10).as_hex(), sns.color_palette("dark", 10).as_hex()
COLORS = tuple(_COLORBLIND[i] for i in (0, 1, 2, 3, 4, 5, 6, 9)) + tuple(_DARK[i] for i in (3, 2, 4, 8, 1))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "d", "8", "H")  # one per variant so far, for greyscale
STYLE_CYCLE = math.lcm(len(COLORS), len(MARKERS))  # distinct (colour, marker) pairs
KNOWN_ADAPTERS = tuple(variant for variant in VARIANT_ORDER if variant != FULL)


def variant_style(variant: str) -> tuple[str, str]:
    """(colour, marker) of a variant, the same in every figure and every run.

    Known variants take their place in ``VARIANT_ORDER``; others a stable hash of the name
    (not Python's ``hash``, which changes per process) into the pairs known ones leave free.
    """
    if variant == FULL:
        return FULL_STYLE
    if variant in KNOWN_ADAPTERS:
        index = KNOWN_ADAPTERS.index(variant)
    else:
        digest = int(hashlib.sha256(variant.encode()).hexdigest(), 16)
        index = len(KNOWN_ADAPTERS) + digest % (STYLE_CYCLE - len(KNOWN_ADAPTERS))
    return COLORS[index % len(COLORS)], MARKERS[index % len(MARKERS)]


def score_vs_params(summary: pd.DataFrame, out_stem: str | os.PathLike | None = None) -> Figure:
    """Primary score against trainable parameters (log x), one panel per task.

    Points are means over seeds with 95% Student-t error bars where n > 1; full fine-tuning
    is also a dashed horizontal line, the reference the other variants are judged against.
    Writes ``<out_stem>.png`` and ``<out_stem>.pdf`` when ``out_stem`` is given.
    """
    tasks = sorted(summary["task"].unique())
    ncols = max(1, min(len(tasks), 3))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(max(4.8 * ncols, 6.4), 3.6 * nrows + 1.2), layout="constrained")
        axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, task in zip(axes, tasks or ["no runs yet"]):
            _draw_task(ax, task, summary[summary["task"] == task])
        for ax in axes[max(len(tasks), 1) :]:
            ax.remove()
        figure.suptitle("Score vs trainable parameters (dashed: full fine-tuning; dotted: the untrained model; grey steps: Pareto front)")
        variant_legend(figure, summary["variant"], "variant (mean over seeds; error bars: 95% t interval)")
    if out_stem is not None:
        save(figure, out_stem)
    return figure


def variant_legend(figure: Figure, variants: pd.Series, title: str) -> None:
    """One figure legend below the panels, one entry per variant in ``VARIANT_ORDER`` (a
    variant's settings share its colour and marker), then the reference lines."""
    handles = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label.split(" [")[0], handle)
    if not handles:
        return
    order = variant_order(variants)
    labels = sorted(handles, key=lambda label: (order.index(label) if label in order else len(order), label))
    figure.legend([handles[label] for label in labels], labels, loc="outside lower center", ncols=min(len(labels), 5), title=title)


# Costs that ``cost_vs_full`` puts against full fine-tuning's: (summary column, axis label).
COST_RATIOS = (
    ("peak_memory_mb", "peak memory / full's"),
    ("activation_mb", "activation memory / full's"),
    ("tokens_per_s", "training tokens/s / full's"),
)


def cost_vs_full(summary: pd.DataFrame, out_stem: str | os.PathLike | None = None) -> Figure:
    """Peak memory, saved activations and training throughput of each variant as a multiple of
    full fine-tuning's on the same task: one row of panels per task, one bar per variant x
    setting in the variant's colour, its marker at the bar's end; 1 (full) is a dashed line."""
    trained = summary[(summary["setting"] != BASE_SETTING) & (summary["variant"] != FULL)]
    tasks = sorted(summary["task"].unique()) or ["no runs yet"]
    bars = max([len(trained[trained["task"] == task]) for task in tasks] + [1])
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(4.0 * len(COST_RATIOS), (0.22 * bars + 1.3) * len(tasks) + 1.4), layout="constrained")
        axes = figure.subplots(len(tasks), len(COST_RATIOS), squeeze=False)
        figure.suptitle("Cost relative to full fine-tuning on the same task (dashed: full = 1; memory: less is better; tokens/s: more is better)")
        for row, task in enumerate(tasks):
            rows = trained[trained["task"] == task]
            full = full_reference(summary[summary["task"] == task])
            for ax, (column, label) in zip(axes[row], COST_RATIOS):
                reference = math.nan if full is None else full[column]
                _draw_ratios(ax, rows, column, reference)
                ax.set_xlabel(f"{label} (x)")
                if full is None:
                    ax.set_title(f"{task}: no full run to compare with")
                else:
                    ax.set_title(task if reference > 0 else f"{task}: full's not measured")
        variant_legend(figure, trained["variant"], "variant")
    if out_stem is not None:
        save(figure, out_stem)
    return figure


def _draw_ratios(ax, rows: pd.DataFrame, column: str, reference: float) -> None:
    """One bar per row; a row that trained but has no value (tokens/s of a run that timed no
    step) gets the words "not measured" instead of a bar, never a bar of 0."""
    labels = [variant_label(v, s) for v, s in zip(rows["variant"], rows["setting"])]
    ratios = rows[column].astype("float64") / reference if pd.notna(reference) and reference > 0 else rows[column] * math.nan
    for position, (row, ratio, label) in enumerate(zip(rows.itertuples(index=False), ratios, labels)):
        if pd.isna(getattr(row, column)) and row.n_seeds > 0:
            ax.text(0, position, " not measured", va="center", color="grey", fontsize="small")
        if pd.isna(ratio):
            continue
        color, marker = variant_style(row.variant)
        ax.barh(position, ratio, color=color, alpha=0.35, height=0.7)
        ax.plot(ratio, position, marker=marker, color=color, markeredgecolor="white", markeredgewidth=0.6, linestyle="none", label=label)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)), labels)
    if labels:
        ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(left=0)


def save(figure: Figure, out_stem: str | os.PathLike) -> list[Path]:
    """Write PNG (150 dpi) and PDF, each atomically; the PDF carries no creation date so reruns
    give the same file. The format is named: the temporary file's suffix is ``.tmp``."""
    stem = Path(out_stem)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    for path, options in ((png, {"dpi": DPI}), (pdf, {"metadata": {"CreationDate": None}})):
        with files.atomic_path(path) as temporary:
            figure.savefig(temporary, format=path.suffix.removeprefix("."), **options)
    return [png, pdf]


def seed_scores(runs: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame | None = None,
                out_stem: str | os.PathLike | None = None) -> Figure:
    """Each successful seed's score as a point beside its variant's mean and 95% CI (default
    setting, best first), one panel per task; the majority class and the untrained model, the
    floors of ``analysis.significance``, as grey lines."""
    runs = runs[(runs["status"] == "ok") & (runs["setting"] == DEFAULT_SETTING)].dropna(subset=["primary_value"])
    means = summary[summary["setting"] == DEFAULT_SETTING].dropna(subset=["score_mean"])
    tasks = sorted(means["task"].unique())
    ncols = max(1, min(len(tasks), 3))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(max(4.8 * ncols, 6.4), 3.8 * nrows), layout="constrained")
        axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, task in zip(axes, tasks or ["no runs yet"]):
            rows = means[means["task"] == task].sort_values("score_mean", ascending=task_lower_is_better(means[means["task"] == task]))
            for x, row in enumerate(rows.itertuples(index=False)):
                color, marker = variant_style(row.variant)
                seeds = runs[(runs["task"] == task) & (runs["variant"] == row.variant)]["primary_value"].to_numpy()
                offsets = [0.0] if len(seeds) == 1 else [-0.18 + 0.36 * i / (len(seeds) - 1) for i in range(len(seeds))]
                ax.scatter([x + offset for offset in offsets], seeds, color=color, marker=marker, s=14, alpha=0.6, linewidths=0)
                error = row.score_ci95_t if row.n_seeds > 1 and pd.notna(row.score_ci95_t) else None
                ax.errorbar([x + 0.3], [row.score_mean], yerr=error, color=color, marker="_", markersize=10, capsize=3, linestyle="none")
            for name, style in ((significance.MAJORITY, ":"), (significance.UNTRAINED, "--")):
                floor = _floor(tests, task, name)
                if floor is not None:
                    ax.axhline(floor, color="grey", linestyle=style, linewidth=1, label=name)
            ax.set_xticks(range(len(rows)), list(rows["variant"]), rotation=60, ha="right")
            ax.set_title(task)
            ax.set_ylabel(score_label(rows) if len(rows) else "score")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower left", fontsize="small", frameon=True)
        for ax in axes[len(tasks or [None]):]:
            ax.set_visible(False)
        figure.suptitle("Each seed (points), mean and 95% CI (bar)")
    if out_stem is not None:
        save(figure, out_stem)
    return figure


def _floor(tests: pd.DataFrame | None, task: str, reference: str) -> float | None:
    if tests is None or tests.empty:
        return None
    found = tests.loc[(tests["task"] == task) & (tests["reference"] == reference), "reference_score"].dropna()
    return float(found.iloc[0]) if len(found) else None


def write_figures(results_dir: str | os.PathLike, summary: pd.DataFrame | None = None) -> list[Path]:
    """Every figure under ``results_dir/figures``, from ``summary`` (else ``tables/summary.csv``),
    the run and significance tables and the extraction tables under ``tables/``."""
    tables = Path(results_dir, "tables")
    if summary is None:
        summary = pd.read_csv(tables / "summary.csv")
    runs = runs_from_tidy(pd.read_parquet(tables / "runs.parquet")) if (tables / "runs.parquet").exists() else None
    tests = pd.read_csv(tables / "significance.csv") if (tables / "significance.csv").exists() else None
    paths = save(score_vs_params(summary), Path(results_dir, "figures", "score_vs_params"))
    paths += save(cost_vs_full(summary), Path(results_dir, "figures", "cost_vs_full"))
    if runs is not None:
        paths += save(seed_scores(runs, summary, tests), Path(results_dir, "figures", "seed_scores"))
    return paths + write_extraction_figures(results_dir, extraction.read_tables(results_dir), summary)


def variant_label(variant: str, setting: str) -> str:
    if setting == BASE_SETTING:
        return "base model (untrained)"
    return variant if setting == DEFAULT_SETTING else f"{variant} [{setting}]"


def _draw_task(ax, task: str, rows: pd.DataFrame) -> None:
    base = rows[rows["setting"] == BASE_SETTING].dropna(subset=["score_mean"])
    if len(base):
        ax.axhline(base["score_mean"].iloc[0], color="grey", linestyle=":", linewidth=1.2, label="base model (untrained)")
    rows = rows[rows["setting"] != BASE_SETTING]
    scored = rows.dropna(subset=["score_mean", "trainable"])
    for row in scored.itertuples(index=False):
        color, marker = variant_style(row.variant)
        error = row.score_ci95_t if row.n_seeds > 1 and pd.notna(row.score_ci95_t) else None
        ax.errorbar(
            row.trainable,
            row.score_mean,
            yerr=error,
            color=color,
            marker=marker,
            markersize=13 if marker == "*" else 8,
            markeredgecolor="white",
            markeredgewidth=0.6,
            linestyle="none",
            capsize=3,
            label=variant_label(row.variant, row.setting),
        )
        if row.variant == FULL:
            ax.axhline(row.score_mean, color=color, linestyle="--", linewidth=1)
    _draw_pareto_front(ax, scored)
    unscored = rows[~rows.index.isin(scored.index)]
    names = ", ".join(variant_label(v, s) for v, s in zip(unscored["variant"], unscored["setting"]))
    ax.set_title(f"{task}\n(no successful run: {names})" if names else task)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(score_label(rows))


def _draw_pareto_front(ax, scored: pd.DataFrame) -> None:
    """A grey step line through the points no other beats on both parameters and score."""
    if scored.empty:
        return
    front = scored[pareto_front(scored, task_lower_is_better(scored))].sort_values("trainable")
    if len(front) > 1:
        ax.step(front["trainable"], front["score_mean"], where="post", color="grey", linewidth=1, alpha=0.7, zorder=0)


# Parasitic extraction's figures, from analysis.extraction's tables.

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
    order = [kind for kind, _ in extraction.LAYER_TYPES] + ["other"]
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
            rows = extraction.plain(scores[scores["task"] == task])
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
            full = full_reference(task_summary)
            if full is not None:
                ax.axhline(full["score_mean"], color="black", linestyle="--", linewidth=1, label="full fine-tuning")
            base = task_summary[task_summary["setting"] == "base"]["score_mean"].dropna()
            if len(base):
                ax.axhline(base.iloc[0], color="grey", linestyle=":", linewidth=1.2, label="base model (untrained)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r (log scale)")
            ax.set_ylabel(score_label(task_summary) if len(task_summary) else "score")
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


def library_curve(curves: pd.DataFrame) -> Figure:
    """Validation score over training steps: the full fine-tune (its periodic validation) and the
    adapter extracted at each step, at the threshold and at each fixed rank, with the head of that
    step. Lines: means over seeds; points: each seed."""
    tasks = sorted(curves["task"].unique()) or ["no library yet"]
    names = {"full": "full fine-tune", "threshold": "extracted, EV threshold"}
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(max(7.5, 5.2 * len(tasks)), 4.4), layout="constrained")
        axes = figure.subplots(1, max(1, len(tasks)), squeeze=False)[0]
        figure.suptitle("How early does an extracted adapter hold the fine-tune?")
        for ax, task in zip(axes, tasks):
            rows = curves[curves["task"] == task].assign(curve=lambda t: t["curve"].map(lambda c: names.get(c, f"extracted, {c}")))
            if len(rows):
                sns.lineplot(rows, x="step", y="validation", hue="curve", style="curve", markers=True, dashes=False, errorbar=None, ax=ax)
                sns.scatterplot(rows, x="step", y="validation", hue="curve", legend=False, alpha=0.35, s=14, ax=ax)
            ax.set_xlabel("training step")
            ax.set_ylabel("validation score")
            ax.set_title(task)
    return figure


def write_extraction_figures(results_dir: str | os.PathLike, found: dict[str, pd.DataFrame], summary: pd.DataFrame) -> list[Path]:

    folder = Path(results_dir, "figures")
    paths = []
    paths += save(rank_vs_variance(found["extraction_spectrum"], found["extraction_layers"]), folder / "rank_vs_variance")
    paths += save(score_vs_rank(found["extraction_scores"], summary), folder / "score_vs_rank")
    paths += save(overhead_vs_interval(found["extraction_overhead"]), folder / "overhead_vs_interval")
    paths += save(library_curve(found["extraction_library"]), folder / "library_curve")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.plots", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="the folder holding tables/ (figures/ is written there)")
    args = parser.parse_args(argv)
    for path in write_figures(args.results_dir):
        print(path)


if __name__ == "__main__":
    main()
