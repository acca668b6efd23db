"""The Markdown report: environment, a results table per task, the figure, what it shows, failures.

``python -m analysis.report RESULTS_DIR`` rebuilds tables and figures from the run records,
then writes ``RESULTS_DIR/report.md``. With ``--no-rebuild`` it reads the tables and figures
already on disk instead (the Snakemake ``report`` rule, which runs after ``aggregate`` and
``plots``). The report names no time of its own, so the same records give the same file.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pandas as pd

from analysis import extraction
from analysis.aggregate import BYTES_PER_MB, GROUP_KEY, LOWER_IS_BETTER, markdown_table, runs_from_tidy, write_tables
from analysis.plots import FULL, score_label, variant_label, write_figures

FIGURE = "figures/score_vs_params.png"
# (run column, name in the report); machines and commits are what make numbers incomparable.
ENVIRONMENT_FIELDS = [
    ("device", "device"),
    ("hostname", "host"),
    ("threads", "threads"),
    ("python", "python"),
    ("pkg_torch", "torch"),
    ("pkg_transformers", "transformers"),
    ("git_commit", "git commit"),
]
MACHINE_NAMES = {"device", "host", "threads"}
SOFTWARE_NAMES = {"python", "torch", "transformers"}


def build_report(results_dir: str | os.PathLike, rebuild: bool = True) -> Path:
    """Write ``results_dir/report.md``; with ``rebuild`` first rewrite tables and figures."""
    results = Path(results_dir)
    if rebuild:
        long, summary = write_tables(results)
        write_figures(results, summary)
    else:
        long, summary = read_tables(results)
    found = extraction.read_tables(results)
    path = results / "report.md"
    path.write_text(render(long, summary, figure_exists=(results / FIGURE).exists(), extracted=found))
    return path


def read_tables(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy runs, summary) as ``analysis.aggregate`` wrote them."""
    tables = Path(results_dir, "tables")
    missing = [name for name in ("runs.parquet", "summary.csv") if not (tables / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{tables} lacks {', '.join(missing)}: run `python -m analysis.aggregate {results_dir}` first, or drop --no-rebuild"
        )
    return pd.read_parquet(tables / "runs.parquet"), pd.read_csv(tables / "summary.csv")


def render(table: pd.DataFrame, summary: pd.DataFrame, figure_exists: bool = True, extracted: dict[str, pd.DataFrame] | None = None) -> str:
    """The report's Markdown, from the tidy table (or run-level rows), the summary table and the
    extraction tables (``analysis.extraction``; the section is left out when there are none)."""
    runs = runs_from_tidy(table)
    if runs.empty:
        sections = ["# lorabench report", "No run records under `runs/` yet.", "## Failed runs\n\nnone"]
    else:
        sections = [
            header(runs),
            environment(runs),
            results(summary, metric_means(table), runs),
            figure(figure_exists),
            findings(summary),
        ]
        if extracted is not None and len(extracted["extraction_overhead"]):
            sections.append(extraction_section(extracted, summary))
        sections.append(failed_runs(runs))
    return "\n\n".join(sections) + "\n"


def header(runs: pd.DataFrame) -> str:
    failed = int((runs["status"] == "failed").sum())
    finished = runs["finished_at"].dropna()
    span = f", finished between {finished.min()} and {finished.max()}" if len(finished) else ""
    return (
        f"# lorabench report\n\n{len(runs)} runs ({len(runs) - failed} ok, {failed} failed) over "
        f"{_count(runs['task'].nunique(), 'task')} and {_count(runs['variant'].nunique(), 'variant')}{span}."
    )


def environment(runs: pd.DataFrame) -> str:
    """Where the records come from; values that differ between records are listed with counts."""
    lines, varying = ["## Environment", ""], []
    for column, name in ENVIRONMENT_FIELDS:
        values = runs[column].dropna().astype(str) if column in runs else pd.Series(dtype=str)
        counts = values.value_counts()
        if counts.empty:
            lines.append(f"- {name}: not recorded")
        elif len(counts) == 1:
            lines.append(f"- {name}: {counts.index[0]}")
        else:
            varying.append(name)
            listed = ", ".join(f"{value} ({count} runs)" for value, count in counts.items())
            lines.append(f"- {name}: **{len(counts)} distinct values**: {listed}")
    dirty = int(runs["git_dirty"].fillna(False).astype(bool).sum())
    if dirty:
        lines.append(f"- uncommitted changes in the working tree for {dirty} of {len(runs)} runs")
    if varying:
        where = []
        if MACHINE_NAMES.intersection(varying):
            where.append("more than one machine")
        if "git commit" in varying:
            where.append("more than one commit")
        if SOFTWARE_NAMES.intersection(varying):
            where.append("more than one software version")
        lines += [
            "",
            f"**Note:** these records come from {' and '.join(where)} (differing: {', '.join(varying)}); "
            + "compare timings and memory across them with care.",
        ]
    return "\n".join(lines)


def results(summary: pd.DataFrame, metrics: pd.DataFrame | None = None, runs: pd.DataFrame | None = None) -> str:
    """One table per task: the score over seeds, the task's other metrics and the mean costs
    of each variant, and where the data came from when that qualifies the scores."""
    kinds = ", ".join(sorted(summary["peak_memory_kind"].dropna().unique())) or "not recorded"
    parts = [
        "## Results",
        "Score: mean ± sample standard deviation over successful seeds (n); other metrics and costs: means over the "
        + f"same seeds. MB = {BYTES_PER_MB:,} bytes. Peak memory kind: {kinds}. Activation MB: what autograd keeps "
        + "for the backward pass of the longest training batch, exact on any device.",
    ]
    for task, rows in summary.groupby("task", sort=True):
        table = pd.DataFrame(
            {
                "variant": [variant_label(v, s) for v, s in zip(rows["variant"], rows["setting"])],
                "score mean ± std (n)": [score_cell(row) for row in rows.itertuples(index=False)],
            }
        )
        if metrics is not None and len(metrics):
            extra = rows[GROUP_KEY].merge(metrics, on=GROUP_KEY, how="left").drop(columns=GROUP_KEY)
            for metric in extra.columns:
                if extra[metric].notna().any() and metric not in set(rows["primary_metric"].dropna()):
                    table[metric] = extra[metric].to_numpy()
        table = table.assign(
            **{
                "trainable params": rows["trainable"].round().astype("Int64").to_numpy(),
                "adapter MB": rows["adapter_mb"].to_numpy(),
                "peak memory MB": rows["peak_memory_mb"].to_numpy(),
                "activation MB": rows["activation_mb"].to_numpy(),
                "tokens/s": rows["tokens_per_s"].to_numpy(),
                "wall s": rows["wall_s"].to_numpy(),
            }
        )
        notes = data_notes(runs, task) if runs is not None else ""
        parts.append(f"### {task} ({score_label(rows)})\n\n{notes}{markdown_table(table)}")
    return "\n\n".join(parts)


def metric_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per task x variant x setting, the mean of each metric over successful seeds, one column
    per metric; empty for a run-level table."""
    if "metric" not in table.columns:
        return pd.DataFrame(columns=GROUP_KEY)
    ok = table[(table["status"] == "ok") & table["metric"].notna()]
    means = ok.pivot_table(index=GROUP_KEY, columns="metric", values="value", aggfunc="mean", observed=True)
    means.columns = [str(column) for column in means.columns]
    return means.reset_index()


def data_notes(runs: pd.DataFrame, task: str) -> str:
    """What qualifies a task's scores (E2E offline: trained on the dev set), above its table."""
    if "data_note" not in runs.columns:
        return ""
    notes = runs.loc[runs["task"] == task, "data_note"].dropna().unique()
    return "".join(f"_Data: {note}._\n\n" for note in sorted(notes))


def score_cell(row) -> str:
    """ "0.8700 ± 0.0100 (3)", "0.8000 (1), 1 failed", or "— (0), 2 failed"."""
    if row.n_seeds == 0:
        text = "— (0)"
    elif row.n_seeds == 1:
        text = f"{row.score_mean:.4f} (1)"
    else:
        text = f"{row.score_mean:.4f} ± {row.score_std:.4f} ({row.n_seeds})"
    return f"{text}, {row.n_failed} failed" if row.n_failed else text


def figure(exists: bool) -> str:
    if not exists:
        return f"## Figure\n\n_{FIGURE} is missing: run `python -m analysis.plots RESULTS_DIR`._"
    pdf = FIGURE.removesuffix(".png") + ".pdf"
    return f"## Figure\n\n![Score vs trainable parameters]({FIGURE})\n\n[PDF]({pdf})"


def findings(summary: pd.DataFrame) -> str:
    """What the figure shows, in numbers: the best variant per task and each one relative to full."""
    parts = ["## What the figure shows"]
    for task, rows in summary.groupby("task", sort=True):
        scored = rows.dropna(subset=["score_mean"])
        if scored.empty:
            parts.append(f"**{task}**: no variant has a successful run.")
            continue
        metric = score_label(rows)
        lower_is_better = str(rows["primary_metric"].dropna().iloc[0]) in LOWER_IS_BETTER
        best = scored.loc[scored["score_mean"].idxmin() if lower_is_better else scored["score_mean"].idxmax()]
        text = (
            f"**{task}**: the best {metric} is {variant_label(best.variant, best.setting)}'s "
            f"{best.score_mean:.4f} (n={best.n_seeds})."
        )
        full = scored[scored["variant"] == FULL]
        if full.empty:
            text += " Full fine-tuning has no successful run here, so there is no reference to compare with."
        else:
            reference = full.iloc[0]
            others = scored[scored["variant"] != FULL]
            text += f" Full fine-tuning scores {reference.score_mean:.4f} with {reference.trainable:,.0f} trainable parameters."
            if len(others):
                text += (
                    " Relative to it: "
                    + "; ".join(
                        f"{variant_label(row.variant, row.setting)} reaches "
                        f"{100 * row.score_mean / reference.score_mean:.1f}% of its score with "
                        f"{_percent(row.trainable, reference.trainable)} of its trainable parameters"
                        for row in others.itertuples(index=False)
                    )
                    + "."
                )
        parts.append(text)
    return "\n\n".join(parts)


def extraction_section(found: dict[str, pd.DataFrame], summary: pd.DataFrame) -> str:
    """Parasitic extraction: its cost, what the extracted adapters keep, and the three figures,
    each with a sentence stating what it shows in numbers."""
    overhead = extraction.overhead_summary(found["extraction_overhead"])
    kept = extraction.retained(found["extraction_scores"], summary)
    parts = [
        "## Parasitic extraction",
        "Low-rank adapters extracted from full fine-tuning while it trains (`lorabench/extract.py`): at each extraction, "
        "dW = W_t - W0 of every adapted matrix, its truncated SVD, and the smallest rank whose explained variance "
        "(relative to the whole ||dW||_F^2) reaches the threshold. Cost: measured seconds against the training loop's, "
        "FLOPs counted from the matrix shapes against 6 x linear-layer weights x tokens.",
        "### Overhead\n\n" + markdown_table(overhead),
    ]
    for task, rows in overhead.groupby("task", sort=True):
        costs = "; ".join(f"every {row['interval']:g} steps, {row['% of training time']:.2f}% of training time and "
                          f"{row['% of training FLOPs']:.3f}% of its FLOPs ({row['s per extraction']:.2f} s per extraction)"
                          for _, row in rows.iterrows())
        snapshot = rows.iloc[0]
        parts.append(f"**{task}**: extracting {costs}. W0 snapshot: {snapshot['snapshot']}, {snapshot['snapshot MB copied']:.0f} MB copied.")
    if len(kept):
        parts.append("### Score retained at each explained-variance threshold\n\n" + markdown_table(kept))
        for task, rows in kept.groupby("task", sort=True):
            best = rows.iloc[(rows["threshold"] - 0.9).abs().argsort().iloc[0]]
            text = (f"**{task}**: at threshold {best['threshold']:g} the extracted adapter (mean rank {best['mean rank']:.1f}, "
                    f"{best['trainable params']:,} parameters with the head) keeps {best['retained %']:.1f}% of full fine-tuning's score "
                    f"({best['extracted score']:.4f} vs {best['full score']:.4f})")
            if "LoRA score" in rows and pd.notna(best.get("LoRA score")):
                text += f"; LoRA of the nearest size ({best['LoRA (nearest size)']}) scores {best['LoRA score']:.4f}"
            parts.append(text + ".")
    parts += [
        "### Figures",
        "![Rank vs explained variance](figures/rank_vs_variance.png)\n\n"
        "_Left: variance of each layer type's update explained at rank r, at the last extraction. "
        "Right: the rank the threshold needed at each extraction._",
        "![Score vs rank](figures/score_vs_rank.png)\n\n"
        "_Extracted adapters (by rank; by threshold at their mean rank) beside LoRA trained at the same rank; "
        "dashed: full fine-tuning; dotted: the untrained model._",
        "![Overhead vs interval](figures/overhead_vs_interval.png)",
    ]
    return "\n\n".join(parts)


def failed_runs(runs: pd.DataFrame) -> str:
    failed = runs.loc[runs["status"] == "failed", ["task", "variant", "setting", "seed", "error"]]
    return "## Failed runs\n\n" + (markdown_table(failed) if len(failed) else "none")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _percent(part: float, whole: float) -> str:
    if math.isnan(part) or math.isnan(whole) or whole == 0:
        return "an unknown share"
    return f"{100 * part / whole:.3g}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="the folder holding runs/ (report.md is written there)")
    parser.add_argument(
        "--no-rebuild", action="store_true", help="read tables/ and figures/ as they are instead of rebuilding them from runs/"
    )
    args = parser.parse_args(argv)
    print(build_report(args.results_dir, rebuild=not args.no_rebuild))


if __name__ == "__main__":
    main()
