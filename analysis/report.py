"""The Markdown report: the study, its environments, a leaderboard and a results table per
task, the GLUE average, every figure with a paragraph of what it shows in numbers, failures,
and the hyper-parameters that differ between runs.

``python -m analysis.report RESULTS_DIR`` rebuilds tables and figures from the run records,
then writes ``RESULTS_DIR/report.md``. With ``--no-rebuild`` it reads the tables and figures
already on disk instead (the Snakemake ``report`` rule, which runs after ``aggregate`` and
``plots``). The report names no time of its own, so the same records give the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from functools import partial
from pathlib import Path

import pandas as pd

from analysis import extraction, significance
from analysis.aggregate import (
    BASE_SETTING,
    DEFAULT_SETTING,
    FULL,
    BYTES_PER_MB,
    ENVIRONMENT_FIELDS,
    GLUE_TASKS,
    GROUP_KEY,
    NOT_MEASURED,
    NOT_MEASURED_NOTE,
    environments,
    full_reference,
    glue_average,
    leaderboard,
    lower_is_better,
    lr_selections,
    markdown_table,
    metric_name,
    not_measured,
    runs_from_tidy,
    score_label,
    task_lower_is_better,
    write_tables,
)
from analysis.plots import COST_RATIOS, variant_label, write_figures
from lorabench import files

FIGURE = "figures/score_vs_params.png"
COST_FIGURE = "figures/cost_vs_full.png"
SEED_FIGURE = "figures/seed_scores.png"
# Beside a score not significantly above the majority class or the untrained model.
AT_FLOOR = "†"
MACHINE_NAMES = {"device", "host", "threads"}
SOFTWARE_NAMES = {"python", "torch", "transformers"}
# Below this share of the way from the untrained model to full fine-tuning, a variant is said
# not to have learnt the task in the study's budget.
LEARNT_FRACTION = 0.1


def build_report(results_dir: str | os.PathLike, rebuild: bool = True, bars: dict | None = None) -> Path:
    """Write ``results_dir/report.md``; with ``rebuild`` first rewrite tables and figures. ``bars``:
    the study config's, marked beside the leaderboard's rows (``leaderboards``)."""
    results = Path(results_dir)
    if rebuild:
        long, summary = write_tables(results)
        write_figures(results, summary)
    else:
        long, summary = read_tables(results)
    found = extraction.read_tables(results)
    figures = {name for name in (FIGURE, COST_FIGURE, SEED_FIGURE) if (results / name).exists()}
    tests_path = results / "tables" / "significance.csv"
    tests = pd.read_csv(tests_path) if tests_path.exists() else None
    return files.write_text_atomic(results / "report.md", render(long, summary, figures=figures, extracted=found, tests=tests,
                                                                 bars=bars))


def read_tables(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy runs, summary) as ``analysis.aggregate`` wrote them."""
    tables = Path(results_dir, "tables")
    missing = [name for name in ("runs.parquet", "summary.csv") if not (tables / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{tables} lacks {', '.join(missing)}: run `python -m analysis.aggregate {results_dir}` first, or drop --no-rebuild"
        )
    return pd.read_parquet(tables / "runs.parquet"), pd.read_csv(tables / "summary.csv")


def render(
    table: pd.DataFrame,
    summary: pd.DataFrame,
    figures: set[str] | frozenset[str] = frozenset({FIGURE, COST_FIGURE, SEED_FIGURE}),
    extracted: dict[str, pd.DataFrame] | None = None,
    tests: pd.DataFrame | None = None,
    bars: dict | None = None,
) -> str:
    """The report's Markdown, from the tidy table (or run-level rows), the summary table, the
    figures that exist (paths relative to the results folder), the extraction tables
    (``analysis.extraction``; that section is left out when there are none), the
    significance tests (``analysis.significance``; without them, no verdicts are shown) and the
    study's bars (without them, no bar column)."""
    runs = runs_from_tidy(table)
    if runs.empty:
        return "\n\n".join(["# lorabench report", "No run records under `runs/` yet.", "## Failed runs\n\nnone"]) + "\n"
    sections = [
        header(runs),
        floor_note(leaderboard(summary, tests)),
        environment(runs),
        leaderboards(summary, tests, bars),
        seed_figure(SEED_FIGURE in figures, tests),
        glue_section(summary),
        score_figure(FIGURE in figures),
        findings(summary, tests),
        cost_figure(COST_FIGURE in figures),
        cost_findings(summary),
        results(summary, metric_means(table), runs),
    ]
    if extracted is not None and len(extracted["extraction_overhead"]):
        sections.append(extraction_section(extracted, summary))
    sections += [gradient_checkpointing(summary, runs), learning_rates(table), failed_runs(runs), hyperparameters(runs)]
    return "\n\n".join(section for section in sections if section) + "\n"


def header(runs: pd.DataFrame) -> str:
    """What was run: counts, and per task the model, the reported split and the seeds."""
    failed = int((runs["status"] == "failed").sum())
    finished = runs["finished_at"].dropna()
    span = f", finished between {finished.min()} and {finished.max()}" if len(finished) else ""
    lines = [
        f"# lorabench report\n\n{len(runs)} runs ({len(runs) - failed} ok, {failed} failed) over "
        f"{_count(runs['task'].nunique(), 'task')} and {_count(runs['variant'].nunique(), 'variant')}{span}.",
        "",
    ]
    for task, rows in runs.groupby("task", sort=True):
        models = ", ".join(sorted(rows["model"].dropna().astype(str).unique()))
        settings = ", ".join(s for s in pd.unique(rows["setting"]) if s not in (DEFAULT_SETTING, BASE_SETTING))
        scored = rows.dropna(subset=["eval_split"])
        split = f"{scored['eval_split'].iloc[0]} split, {int(scored['eval_n'].max()):,} examples" if len(scored) and scored["eval_n"].notna().any() else "no score yet"
        lines.append(
            f"- **{task}**: {models}; {_count(rows['variant'].nunique(), 'variant')}, {_seeds(rows['seed'])}; "
            f"scored on the {split}" + (f"; other settings: {settings}" if settings else "")
        )
    lines += ["", "Hyper-parameters that differ between runs are listed at the end."]
    return "\n".join(lines)


def floor_note(board: pd.DataFrame) -> str:
    """At the top: how many scores are not significantly above their floors (the majority class,
    the untrained model), so that a study too short to mean anything says so before any ranking."""
    if "above_floors" not in board.columns:
        return ""
    tested = board["above_floors"].dropna()
    at_floor = sum(_at_floor(value) for value in tested)
    if tested.empty or not at_floor:
        return ""
    if at_floor == len(tested):
        return (f"**No score in this study is significantly above its floors** (the majority class or the untrained model; "
                f"{AT_FLOOR} below): its runs are too short or too few to mean anything, so its rankings and ratios are noise. "
                "It checks the pipeline, not the methods.")
    return (f"**{at_floor} of {len(tested)} scores are not significantly above their floors** (the majority class or the "
            f"untrained model; marked {AT_FLOOR}): read their places in the rankings as noise.")


def _at_floor(value) -> bool:
    """An ``above_floors`` verdict that is False (not None or NaN: untested)."""
    return value is not None and not pd.isna(value) and not bool(value)


def _floor_mark(row) -> str:
    """Beside a score in a sentence: says when it is not significantly above its floors."""
    return f" {AT_FLOOR} (not significantly above its floors)" if _at_floor(getattr(row, "above_floors", None)) else ""


def environment(runs: pd.DataFrame) -> str:
    """Where the records come from. When they come from more than one environment (machine,
    software or commit), each gets an id (E1, E2, ...) that the results tables show per row."""
    table = environments(runs)
    names = [name for _, name in ENVIRONMENT_FIELDS]
    varying = [name for name in names if table[name].nunique(dropna=False) > 1]
    lines = ["## Environment", ""]
    for name in names:
        if name not in varying:
            value = table[name].iloc[0] if len(table) else None
            lines.append(f"- {name}: {'not recorded' if pd.isna(value) else value}")
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
        shown = table[["environment", "runs", *varying]].copy()
        if "git commit" in varying:
            shown["git commit"] = shown["git commit"].str[:12]
        lines += [
            "",
            f"**These records come from {' and '.join(where)}** (differing: {', '.join(varying)}). "
            + "Each results row names the environments of its runs (column `env`); compare timings and memory "
            + "only between rows of the same environment.",
            "",
            markdown_table(shown),
        ]
    return "\n".join(lines)


def bar_verdicts(rows: pd.DataFrame, bar: dict) -> list[str]:
    """Beside each leaderboard row of one task: '' where the mean reaches the task's bar, else
    'under S' (over S for a metric where lower is better) and the measured reason the study's
    config gives for that variant, or that none was measured."""
    lower = lower_is_better(rows["primary_metric"].iloc[0])
    reasons = bar.get("short") or {}
    marks = []
    for variant, setting, value in zip(rows["variant"], rows["setting"], rows["score_mean"]):
        short = pd.notna(value) and (value > bar["score"] if lower else value < bar["score"])
        reason = reasons.get(variant) if setting == DEFAULT_SETTING else None
        marks.append(f"{'over' if lower else 'under'} {bar['score']:g}: {reason or 'no reason measured'}" if short else "")
    return marks


def leaderboards(summary: pd.DataFrame, tests: pd.DataFrame | None = None, bars: dict | None = None) -> str:
    """Per task, the trained variants best first, against full fine-tuning, LoRA and the floors,
    and, where the study sets a bar for the task, which means fall short of it and why."""
    board = leaderboard(summary, tests)
    if board.empty:
        return ""
    parts = [
        "## Leaderboard",
        "Mean score over seeds, best first (95% CI: Student t half-width, blank with one seed); lr: the rate it trained at; "
        "% of full: of full fine-tuning's score (full / score when smaller is better, so above 100 always beats full) "
        "and of its trainable parameters; Pareto: no other run is at least as good in score and in trainable "
        "parameters and better in one.",
    ]
    if tests is not None:
        parts.append(significance_legend(tests))
    for task, rows in board.groupby("task", sort=True):
        scale = _scale(summary.loc[summary["task"] == task, "score_mean"])
        columns = {
            "#": rows["place"].to_numpy(),
            "variant": [variant_label(v, s) for v, s in zip(rows["variant"], rows["setting"])],
            metric_name(rows["primary_metric"].iloc[0]): [score_text(value, scale) + (f" {AT_FLOOR}" if _at_floor(above) else "")
                                                          for value, above in zip(rows["score_mean"], rows["above_floors"])],
            "95% CI ±": [score_text(value, scale) for value in rows["score_ci95_t"]],
            "seeds": rows["n_seeds"].to_numpy(),
            "lr": [f"{value:.3g}" if pd.notna(value) else "" for value in rows["lr"]],
            "trainable params": rows["trainable"].round().astype("Int64").to_numpy(),
            "% of full score": rows["pct_of_full_score"].round(1).to_numpy(),
            "% of full params": rows["pct_of_full_params"].to_numpy(),
            "Pareto": ["yes" if on_front else "" for on_front in rows["pareto"]],
        }
        if tests is not None:
            columns["vs LoRA"] = [value if isinstance(value, str) else "" for value in rows["vs_lora"]]
            columns["vs full"] = [value if isinstance(value, str) else "" for value in rows["vs_full"]]
        if bars and task in bars:
            columns["bar"] = bar_verdicts(rows, bars[task])
        parts.append(f"### {task}\n\n{markdown_table(pd.DataFrame(columns))}")
    return "\n\n".join(parts)


def significance_legend(tests: pd.DataFrame) -> str:
    """How the leaderboard's verdicts were reached, and which comparisons could not be tested."""
    untested = sorted(name for name in tests["test"].dropna().unique() if name.startswith("none"))
    text = (f"vs LoRA, vs full: better, worse, or n.s. (not significant at {significance.ALPHA:g}, two-sided, Holm-corrected "
            f"within each task and reference): Welch's t-test over seeds where both sides have {significance.MIN_SEEDS_FOR_T} "
            f"or more, else a paired bootstrap over the evaluation examples ({significance.RESAMPLES} resamples), which sees "
            "the test set's noise but not the seeds'. n.s. is no evidence of equality: three seeds give the t-test little "
            f"power. {AT_FLOOR}: not significantly above the majority class or the untrained model (one-sided, the same "
            "tests; a one-sample t-test against the majority class where a variant has three seeds): that score is no "
            "evidence that the method learnt the task. Every test and p-value: `tables/significance.csv`.")
    if untested:
        text += " Untested: " + "; ".join(name.removeprefix("none: ") for name in untested) + "."
    return text


def seed_figure(exists: bool, tests: pd.DataFrame | None) -> str:
    """Each seed's score beside the mean, with the floors as lines."""
    if tests is None and not exists:
        return ""
    return _figure("## Every seed", "Each seed's score beside the mean and its 95% CI", SEED_FIGURE, exists)


def glue_section(summary: pd.DataFrame) -> str:
    """The GLUE average where a variant has every GLUE task, else what it lacks."""
    present = sorted(set(summary["task"]) & set(GLUE_TASKS))
    if not present:
        return ""
    table = glue_average(summary)
    title = "## GLUE average"
    rule = f"Mean of the primary scores x 100 on {', '.join(GLUE_TASKS)} (WNLI left out, as in Hu et al. 2021)."
    if table.empty:
        missing = ", ".join(task for task in GLUE_TASKS if task not in present)
        lacks = f"this study lacks {missing}" if missing else "some tasks have no successful run for any one variant"
        return f"{title}\n\n{rule} Not computed: no variant has a score on all of them; {lacks}."
    table.insert(0, "variant", [variant_label(v, s) for v, s in zip(table.pop("variant"), table.pop("setting"))])
    return f"{title}\n\n{rule}\n\n{markdown_table(table.round(2))}"


def results(summary: pd.DataFrame, metrics: pd.DataFrame | None = None, runs: pd.DataFrame | None = None) -> str:
    """One table per task: the score over seeds, the task's other metrics and the mean costs
    of each variant, and where the data came from when that qualifies the scores."""
    kinds = ", ".join(sorted(summary["peak_memory_kind"].dropna().unique())) or "not recorded"
    parts = [
        "## Results per task",
        "Every variant and setting in variant order. "
        "Score: mean ± sample standard deviation over successful seeds (n); other metrics and costs: means over the "
        + f"same seeds. MB = {BYTES_PER_MB:,} bytes. Peak memory kind: {kinds}. Activation MB: what autograd keeps "
        + "for the backward pass of the longest training batch, exact on any device.",
    ]
    unmeasured = False
    for task, rows in summary.groupby("task", sort=True):
        table = pd.DataFrame(
            {
                "variant": [variant_label(v, s) for v, s in zip(rows["variant"], rows["setting"])],
                "score mean ± std (n)": [score_cell(row, _scale(rows["score_mean"])) for row in rows.itertuples(index=False)],
            }
        )
        if summary["environments"].nunique() > 1 or summary["environments"].str.contains("+", regex=False).any():
            table.insert(1, "env", rows["environments"].to_numpy())
        if metrics is not None and len(metrics):
            extra = rows[GROUP_KEY].merge(metrics, on=GROUP_KEY, how="left").drop(columns=GROUP_KEY)
            for metric in extra.columns:
                if extra[metric].notna().any() and metric not in set(rows["primary_metric"].dropna()):
                    table[metric] = extra[metric].to_numpy()
        trained = (rows["setting"] != BASE_SETTING).to_numpy()  # the untrained model has no adapter nor training costs
        tokens_per_s = not_measured(rows["tokens_per_s"].where(trained), trained & (rows["n_seeds"] > 0))
        unmeasured |= bool((tokens_per_s == NOT_MEASURED).any())
        table = table.assign(
            **{
                "trainable params": rows["trainable"].round().astype("Int64").where(trained).to_numpy(),
                "adapter MB": rows["adapter_mb"].where(trained).to_numpy(),
                "peak memory MB": rows["peak_memory_mb"].where(trained).to_numpy(),
                "activation MB": rows["activation_mb"].where(trained).to_numpy(),
                "tokens/s": tokens_per_s.to_numpy(),
                "wall s": rows["wall_s"].to_numpy(),
            }
        )
        notes = data_notes(runs, task) if runs is not None else ""
        table = table.rename(columns={metric: metric_name(metric) for metric in table.columns})
        parts.append(f"### {task} ({score_label(rows)})\n\n{notes}{markdown_table(table)}")
    if unmeasured:
        parts.append(f"_tokens/s {NOT_MEASURED_NOTE}_")
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


def score_cell(row, scale: float | None = None) -> str:
    """ "0.8700 ± 0.0100 (3)", "0.8000 (1), 1 failed", or "— (0), 2 failed"."""
    if row.n_seeds == 0:
        text = "— (0)"
    elif row.n_seeds == 1:
        text = f"{score_text(row.score_mean, scale)} (1)"
    else:
        text = f"{score_text(row.score_mean, scale)} ± {score_text(row.score_std, scale)} ({row.n_seeds})"
    return f"{text}, {row.n_failed} failed" if row.n_failed else text


def score_text(value: float, scale: float | None = None) -> str:
    """A score with 4 decimals on a task whose scores stay below 10 (accuracy, correlation) and
    2 on one that reaches 10 (BLEU, ROUGE); ``scale`` is the task's largest |score|, so one
    task's column keeps one format."""
    if pd.isna(value):
        return ""
    return f"{value:.2f}" if abs(value if scale is None else scale) >= 10 else f"{value:.4f}"


def _scale(scores: pd.Series) -> float:
    return float(scores.abs().max()) if scores.notna().any() else 0.0


def score_figure(exists: bool) -> str:
    return _figure("## Score vs trainable parameters", "Score vs trainable parameters", FIGURE, exists)


def cost_figure(exists: bool) -> str:
    return _figure("## Memory and throughput relative to full fine-tuning", "Cost relative to full fine-tuning", COST_FIGURE, exists)


def _figure(title: str, alt: str, path: str, exists: bool) -> str:
    if not exists:
        return f"{title}\n\n_{path} is missing: run `python -m analysis.plots RESULTS_DIR`._"
    return f"{title}\n\n![{alt}]({path})\n\n[PDF]({path.removesuffix('.png')}.pdf)"


def findings(summary: pd.DataFrame, tests: pd.DataFrame | None = None) -> str:
    """What the score figure shows, in numbers, per task: the best run (and whether the runs after
    it differ from it significantly), full fine-tuning and the untrained model, the Pareto front,
    the smallest run within 1% of full, and who did not learn."""
    board = leaderboard(summary, tests)
    parts = []
    for task, rows in summary.groupby("task", sort=True):
        ranked = board[board["task"] == task]
        if ranked.empty:
            parts.append(f"**{task}**: no variant has a successful run.")
            continue
        metric = score_label(rows)
        lower = task_lower_is_better(ranked)
        fmt = partial(score_text, scale=_scale(rows["score_mean"]))
        best = ranked.iloc[0]
        text = [f"**{task}** ({metric}): best is {variant_label(best.variant, best.setting)} at {fmt(best.score_mean)} (n={best.n_seeds})"
                + _floor_mark(best) + _tied_with_best(ranked, best) + "."]
        full = full_reference(ranked)
        base = rows[(rows["setting"] == BASE_SETTING)].dropna(subset=["score_mean"])
        if full is None:
            text.append("Full fine-tuning has no successful run here, so nothing is compared with it.")
        else:
            text.append(f"Full fine-tuning{_setting_note(full)} scores {fmt(full.score_mean)}{_floor_mark(full)} "
                        f"with {full.trainable:,.0f} trainable parameters.")
        if len(base):
            text.append(f"The untrained model scores {fmt(base['score_mean'].iloc[0])}.")
        front = ranked[ranked["pareto"]].sort_values("trainable")
        if len(front):
            text.append("Pareto front, by size: " + ", ".join(
                f"{variant_label(row.variant, row.setting)} ({fmt(row.score_mean)}{' ' + AT_FLOOR if _at_floor(row.above_floors) else ''}, "
                f"{_params(row.trainable)})" for row in front.itertuples()) + ".")
        if full is not None:
            others = ranked[ranked["variant"] != FULL]
            close = others[others["pct_of_full_score"] >= 99]
            if len(close):
                smallest = close.sort_values("trainable").iloc[0]
                floors = [_at_floor(smallest.get("above_floors")), _at_floor(full.get("above_floors"))]
                text.append(f"The smallest run reaching 99% of full's score is {variant_label(smallest.variant, smallest.setting)}: "
                            f"{fmt(smallest.score_mean)} with {smallest.pct_of_full_params:.3g}% of full's trainable parameters"
                            + (f" ({'both are' if all(floors) else 'one is'} not significantly above the floors, "
                               "so the match says nothing)." if any(floors) else "."))
            elif others["pct_of_full_score"].notna().any():
                text.append("No parameter-efficient run reaches 99% of full's score.")
            gain = (full.score_mean - base["score_mean"].iloc[0]) * (-1 if lower else 1) if len(base) else math.nan
            if gain > 0:  # full learnt the task, so "a tenth of its way" means something
                progress = (ranked["score_mean"] - base["score_mean"].iloc[0]) * (-1 if lower else 1) / gain
                stuck = ranked[progress < LEARNT_FRACTION]
                if len(stuck):
                    text.append("Not learnt in this budget (less than a tenth of full's way from the untrained model): "
                                + ", ".join(f"{variant_label(row.variant, row.setting)} ({fmt(row.score_mean)})" for row in stuck.itertuples()) + ".")
        parts.append(" ".join(text))
    return "\n\n".join(parts)


def _tied_with_best(ranked: pd.DataFrame, best) -> str:
    """", not significantly better than lora or full" where the best run's verdicts say so."""
    if "vs_lora" not in ranked.columns:
        return ""
    tied = [name for column, name in (("vs_full", FULL), ("vs_lora", "lora"))
            if best.variant != name and best[column] == "n.s."]
    return f", not significantly better than {' or '.join(tied)}" if tied else ""


def cost_findings(summary: pd.DataFrame) -> str:
    """What the cost figure shows, in numbers: per task and measure, the range of the variants'
    ratios to full fine-tuning, with who is at each end."""
    parts = []
    for task, rows in summary.groupby("task", sort=True):
        full = full_reference(rows)
        trained = rows[(rows["variant"] != FULL) & (rows["setting"] != BASE_SETTING)]
        if full is None or trained.empty:
            continue
        sentences = []
        for column, label in COST_RATIOS:
            ratios = (trained[column] / full[column]).dropna()
            if ratios.empty:
                continue
            low, high = trained.loc[ratios.idxmin()], trained.loc[ratios.idxmax()]
            measure = label.split(' /')[0]
            if len(ratios) == 1:  # one variant: a value, not a range
                sentences.append(f"{measure} {ratios.iloc[0]:.2f}x ({variant_label(low.variant, low.setting)})")
                continue
            sentences.append(f"{measure} from {ratios.min():.2f}x ({variant_label(low.variant, low.setting)}) "
                             f"to {ratios.max():.2f}x ({variant_label(high.variant, high.setting)})")
        unmeasured = [variant_label(row["variant"], row["setting"]) for row in [full, *(row for _, row in trained.iterrows())]
                      if pd.isna(row["tokens_per_s"]) and row["n_seeds"] > 0]
        if unmeasured:
            sentences.append(f"tokens/s not measured for {', '.join(unmeasured)} (no training step was timed), so not compared")
        if sentences:
            parts.append(f"**{task}**, relative to full fine-tuning: " + "; ".join(sentences) + ".")
    kinds = ", ".join(sorted(summary["peak_memory_kind"].dropna().unique()))
    if parts and "cpu" in kinds:
        parts.append("On CPU, peak memory is the process's resident set, model weights and libraries included, so it "
                     "separates variants less than activation memory does (what autograd keeps for the backward pass, exact on any device).")
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
    quantized = extraction.on_nf4(found["extraction_scores"], summary)
    if len(quantized):
        parts.append("### On a 4-bit base\n\n"
                     "Adapters extracted at the end of the run, scored on the full-precision base and on the same base in NF4 "
                     "(QLoRA's 4-bit format): plain extraction (dW = W_t - W0) and NF4-aware extraction (dW = W_t - dequant(NF4(W0)), "
                     "so that the 4-bit base plus the adapter approximates W_t, quantization error included). Means over seeds:\n\n"
                     + markdown_table(quantized))
    choices = extraction.library_choices(found["extraction_library_choice"], summary)
    if len(choices):
        parts.append("### The library: every extraction's adapter, scored along the run\n\n"
                     "Each extraction keeps its adapter at the threshold (`seedN.library.safetensors`, `adapters.load(model, path, "
                     "step=N)` or `best=True`), scored on the validation split with the task head of its own step; the best by "
                     "validation is also scored on the reported split. Means over seeds:\n\n" + markdown_table(choices))
        for _, row in choices.iterrows():
            parts.append(f"**{row['task']}**: the last adapter scores {row['last adapter']:.4f} (mean rank {row['last mean rank']:.1f}), "
                         f"the best by validation {row['best adapter']:.4f} (from steps {row['best from steps']}), "
                         f"full fine-tuning {row['full']:.4f}" + (f", LoRA {row['LoRA']:.4f}" if pd.notna(row["LoRA"]) else "") + ".")
        parts.append("![Library along the run](figures/library_curve.png)\n\n"
                     "_Validation score at each extraction step: the full fine-tune, and its adapter extracted then (with the head "
                     "of that step) at the threshold and at fixed ranks._")
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


def gradient_checkpointing(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    """What gradient checkpointing saves and costs: each setting that turns it on against the
    same task and variant's default setting, without it; nothing when no run used it."""
    column = "hp_gradient_checkpointing"
    if column not in runs.columns:
        return ""
    on = runs.loc[runs[column].fillna(False).astype(bool), GROUP_KEY].drop_duplicates()
    rows = []
    for task, variant, setting in on.itertuples(index=False):
        group = summary[(summary["task"] == task) & (summary["variant"] == variant)]
        with_it, without = group[group["setting"] == setting], group[group["setting"] == DEFAULT_SETTING]
        if with_it.empty or without.empty or setting == DEFAULT_SETTING:
            continue
        a, b = without.iloc[0], with_it.iloc[0]
        rates = [runs.loc[(runs["task"] == task) & (runs["variant"] == variant) & (runs["setting"] == name), "hp_lr"].iloc[0]
                 for name in (DEFAULT_SETTING, setting)]
        rate_note = "" if rates[0] == rates[1] else f" (lr {rates[0]:g} vs {rates[1]:g}: not comparable)"
        rows.append({"task": task, "variant": variant_label(variant, setting),
                     "activation MB": _change(a.activation_mb, b.activation_mb),
                     "peak memory MB": _change(a.peak_memory_mb, b.peak_memory_mb),
                     "tokens/s": _change(a.tokens_per_s, b.tokens_per_s),
                     "score": f"{score_text(a.score_mean)} -> {score_text(b.score_mean)}{rate_note}"})
    if not rows:
        return ""
    table = pd.DataFrame(rows)
    unmeasured = any(NOT_MEASURED in row[column] for row in rows for column in ("activation MB", "peak memory MB", "tokens/s"))
    note = f" {NOT_MEASURED_NOTE}" if unmeasured else ""
    return ("## Gradient checkpointing\n\n"
            "Each row: the variant's default setting -> the same with `gradient_checkpointing=true` (activations recomputed "
            "in the backward pass instead of kept). Activation MB: what autograd keeps for the backward pass of the longest "
            f"batch; tokens/s: training throughput (the price of recomputing).{note}\n\n" + markdown_table(table))


def _change(before: float, after: float) -> str:
    """ "1500 -> 1200 (0.80x)"; a side that was not measured reads ``NOT_MEASURED`` and the ratio is left out."""
    if pd.isna(before) or pd.isna(after) or not before:
        return " -> ".join(NOT_MEASURED if pd.isna(value) else f"{value:.0f}" for value in (before, after))
    return f"{before:.0f} -> {after:.0f} ({after / before:.2f}x)"


def learning_rates(table: pd.DataFrame) -> str:
    """Which learning rate each swept variant got, from which grid, on what validation score;
    nothing when the study swept nothing."""
    chosen = lr_selections(table)
    if chosen.empty:
        return ""
    parts = ["## Learning rates",
             "Swept settings train at the rate of their grid with the best mean validation score over the sweep's seeds "
             "(validation: examples carved out of train, never the reported split; a rate with a failed run is not chosen). "
             "Each cell: the validation score at that rate; **bold**: the rate chosen."]
    for task, rows in chosen.groupby("task", sort=True):
        metric = metric_name(rows["metric"].iloc[0])
        scale = _scale(rows["mean"])
        lines = []
        for (variant, setting), group in rows.groupby(["variant", "setting"], sort=False):
            cells = [f"{score_text(row.mean, scale) if pd.notna(row.mean) else 'failed'} at {row.lr:g}" for row in group.itertuples()]
            cells = [f"**{cell}**" if row.chosen else cell for cell, row in zip(cells, group.itertuples())]
            pick = group[group["chosen"]]
            seeds = group["seeds"].max()
            lines.append({"variant": variant_label(variant, setting), "chosen lr": f"{pick['lr'].iloc[0]:g}" if len(pick) else "",
                          "grid": ", ".join(f"{lr:g}" for lr in group["lr"]), "sweep seeds": seeds,
                          f"validation {metric} by rate": "; ".join(cells)})
        parts.append(f"### {task}\n\n{markdown_table(pd.DataFrame(lines))}")
    edges = chosen[chosen["chosen"]].merge(chosen.groupby(["task", "variant", "setting"])["lr"].agg(["min", "max"]).reset_index(),
                                            on=["task", "variant", "setting"])
    at_edge = edges[(edges["lr"] == edges["min"]) | (edges["lr"] == edges["max"])]
    if len(at_edge):
        parts.append("At the edge of its grid (the best rate may lie outside it; widen the grid): "
                     + ", ".join(f"{row.task}/{variant_label(row.variant, row.setting)} ({row.lr:g})" for row in at_edge.itertuples()) + ".")
    return "\n\n".join(parts)


def hyperparameters(runs: pd.DataFrame) -> str:
    """Every hyper-parameter: one line for those with one value in every run; per task, a line
    for those the same in all its runs and a table of those that differ. A variant's own
    options (set for some variants only) go together in the table's last column."""
    columns = [column for column in runs.columns if column.startswith("hp_")]
    texts = runs[columns].map(_hp_text)
    common = [column for column in columns if texts[column].nunique() == 1]
    lines = ["## Hyper-parameters", "Same in every run: " + _assignments(texts.iloc[0], common) + "."]
    for task, rows in texts.assign(variant=runs["variant"], setting=runs["setting"]).groupby(runs["task"], sort=True):
        rest = [column for column in columns if column not in common]
        same = [column for column in rest if rows[column].nunique() == 1 and (rows[column] != "").all()]
        varying = [column for column in rest if column not in same and (rows[column] != "").any()]
        shared = [column for column in varying if (rows[column] != "").all()]
        own = [column for column in varying if column not in shared]
        table = rows[["variant", "setting", *shared]].rename(columns=lambda column: column.removeprefix("hp_"))
        if own:
            table["variant options"] = [_assignments(row, [c for c in own if row[c] != ""]) for _, row in rows.iterrows()]
        lines.append(f"### {task}\n\nSame in all its runs: {_assignments(rows.iloc[0], same)}.")
        if varying:
            lines.append(markdown_table(table.drop_duplicates()))
    return "\n\n".join(lines)


def _hp_text(value) -> str:
    """A hyper-parameter as text: "" when unset, 8 rather than 8.0."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _assignments(row: pd.Series, columns: list[str]) -> str:
    return ", ".join(f"{column.removeprefix('hp_')}={row[column]}" for column in columns if row[column] != "") or "none"


def failed_runs(runs: pd.DataFrame) -> str:
    failed = runs.loc[runs["status"] == "failed", ["task", "variant", "setting", "seed", "error"]]
    return "## Failed runs\n\n" + (markdown_table(failed) if len(failed) else "none")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _setting_note(row) -> str:
    return "" if row.setting == DEFAULT_SETTING else f" [{row.setting}]"


def _seeds(seeds: pd.Series) -> str:
    values = sorted(int(seed) for seed in seeds.dropna().unique())
    return f"seed {values[0]}" if len(values) == 1 else f"seeds {', '.join(map(str, values))}"


def _params(count: float) -> str:
    """1,234,567 -> "1.23M params"; 24,258 -> "24.3k params"."""
    if pd.isna(count):
        return "? params"
    return f"{count / 1e6:.3g}M params" if count >= 1e6 else f"{count / 1e3:.3g}k params" if count >= 1e3 else f"{count:.0f} params"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="the folder holding runs/ (report.md is written there)")
    parser.add_argument(
        "--no-rebuild", action="store_true", help="read tables/ and figures/ as they are instead of rebuilding them from runs/"
    )
    parser.add_argument("--bars", type=json.loads, default={},
                        help='the study\'s bars, as JSON: {task: {"score": S, "short": {variant: reason}}} (the Snakefile passes config "bars")')
    args = parser.parse_args(argv)
    print(build_report(args.results_dir, rebuild=not args.no_rebuild, bars=args.bars))


if __name__ == "__main__":
    main()
