"""Figures from the summary table, with one colour and marker per variant in every figure.

Figures are built on ``matplotlib.figure.Figure`` directly (rendered by Agg), not through
pyplot, so no global backend or figure registry is touched and callers can inspect the
returned figure.

``python -m analysis.plots RESULTS_DIR`` reads ``RESULTS_DIR/tables/summary.csv`` and the
extraction tables and writes ``RESULTS_DIR/figures/<name>.png`` (150 dpi) and ``<name>.pdf`` for
``score_vs_params`` and the extraction figures (``analysis/extraction.py``).
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

from analysis import extraction
from analysis.aggregate import VARIANT_ORDER, variant_order

FULL = "full"
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
        figure.suptitle("Score vs trainable parameters (dashed: full fine-tuning; dotted: the untrained model)")
        handles = {}
        for ax in figure.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label.split(" [")[0], handle)  # one entry per variant: its settings share its marker
        if handles:
            order = variant_order(summary["variant"])
            labels = sorted(handles, key=lambda label: (order.index(label.split(" [")[0]) if label.split(" [")[0] in order else len(order), label))
            figure.legend([handles[label] for label in labels], labels, loc="outside lower center", ncols=min(len(labels), 5), title="variant (mean over seeds; error bars: 95% t interval)")
    if out_stem is not None:
        save(figure, out_stem)
    return figure


def save(figure: Figure, out_stem: str | os.PathLike) -> list[Path]:
    """Write PNG (150 dpi) and PDF; the PDF carries no creation date so reruns give the same file."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    figure.savefig(png, dpi=DPI)
    figure.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]


def write_figures(results_dir: str | os.PathLike, summary: pd.DataFrame | None = None) -> list[Path]:
    """Every figure under ``results_dir/figures``, from ``summary`` (else ``tables/summary.csv``)
    and the extraction tables under ``tables/``."""
    if summary is None:
        summary = pd.read_csv(Path(results_dir, "tables", "summary.csv"))
    paths = save(score_vs_params(summary), Path(results_dir, "figures", "score_vs_params"))
    return paths + extraction.write_figures(results_dir, extraction.read_tables(results_dir), summary)


def score_label(rows: pd.DataFrame) -> str:
    """The y-axis name, e.g. "dev accuracy", from the task's eval split and primary metric."""
    metric = rows["primary_metric"].dropna()
    split = rows["eval_split"].dropna()
    if metric.empty:
        return "score"
    return f"{split.iloc[0]} {metric.iloc[0]}" if len(split) else str(metric.iloc[0])


def variant_label(variant: str, setting: str) -> str:
    return variant if setting == "default" else f"{variant} [{setting}]"


BASE_SETTING = "base"  # the untrained model (max_steps 0): a reference line, not a point


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
    unscored = rows[~rows.index.isin(scored.index)]
    names = ", ".join(variant_label(v, s) for v, s in zip(unscored["variant"], unscored["setting"]))
    ax.set_title(f"{task}\n(no successful run: {names})" if names else task)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(score_label(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.plots", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="the folder holding tables/ (figures/ is written there)")
    args = parser.parse_args(argv)
    for path in write_figures(args.results_dir):
        print(path)


if __name__ == "__main__":
    main()
