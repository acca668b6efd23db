"""Run records -> pandas tables: one row per run, one row per run x metric, and a summary.

Analysis reads only the run records (``lorabench.records``), never the engine, so tables
can be rebuilt anywhere from ``results/runs`` without retraining.

``python -m analysis.aggregate RESULTS_DIR`` writes into ``RESULTS_DIR/tables``:
``runs.parquet`` and ``runs.csv`` (the tidy long form), then ``summary``, ``leaderboard``,
``glue``, ``lr_selection`` and ``significance`` (each as .csv, .md and .tex), then the
extraction tables, each written atomically. Markdown shows a throughput that no training step timed as ``n/m``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis import extraction, significance
from lorabench import files, records

RUN_KEY = ["task", "variant", "setting", "seed"]
GROUP_KEY = ["task", "variant", "setting"]

# Known variants in the order tables and legends list them; unknown ones follow, sorted.
VARIANT_ORDER = (
    "full", "lora", "qlora", "lora_fa", "lora_plus", "vera", "delta_lora",
    "pissa", "delora", "dora", "edora", "lotr", "adalora", "extracted",
)  # fmt: skip

# How tables and axes name the metrics that tasks record; others keep their record name.
METRIC_NAMES = {
    "accuracy": "accuracy", "accuracy_matched": "accuracy (matched)", "accuracy_mismatched": "accuracy (mismatched)",
    "f1": "F1", "matthews_corr": "Matthews corr.", "pearson": "Pearson r", "spearman": "Spearman rho",
    "bleu": "BLEU", "rouge_l": "ROUGE-L", "perplexity": "perplexity", "forgetting": "forgetting (nats/token)", "loss": "loss",
}  # fmt: skip

# The GLUE average of Hu et al. (2021) and most LoRA papers: the eight tasks without WNLI,
# each on its primary metric (CoLA Matthews, STS-B Pearson, MNLI matched, accuracy else).
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
BASE_SETTING = "base"  # the untrained model (max_steps 0): a reference, never a contender
DEFAULT_SETTING = "default"
FULL = "full"  # full fine-tuning: the reference every other variant is compared with

# Adapter size uses the same MB as peak memory: 2**20 bytes.
BYTES_PER_MB = 2**20

# Fixed run columns, so that empty results still give tables with headers. Every
# hyper-parameter, package version and metric adds a column: hp_<name>, pkg_<name>, metric_<name>.
RUN_FIELDS = ["task", "variant", "setting", "seed", "model", "config_hash"]
DATA_FIELDS = ["data_source", "data_note"]  # where the data came from, and what that changes
TRAIN_FIELDS = [
    "steps", "samples", "tokens", "wall_s", "timed_s", "tokens_per_s", "samples_per_s", "peak_memory_mb", "peak_memory_kind",
    "activation_mb",
]  # fmt: skip
# What makes two records' timings and memory incomparable: (run column, name in the report).
ENVIRONMENT_FIELDS = [
    ("device", "device"), ("hostname", "host"), ("threads", "threads"), ("python", "python"),
    ("pkg_torch", "torch"), ("pkg_transformers", "transformers"), ("git_commit", "git commit"),
]  # fmt: skip
META_FIELDS = [
    "device", "threads", "hostname", "python", "platform",
    "lorabench_version", "git_commit", "git_dirty", "started_at", "finished_at",
]  # fmt: skip
RUN_COLUMNS = [
    *RUN_FIELDS, *DATA_FIELDS, "status", "error", "trainable", "total", "adapter_mb", *TRAIN_FIELDS,
    "eval_split", "eval_n", "primary_metric", "primary_value", *META_FIELDS, "environment", "selection",
]  # fmt: skip
COUNT_COLUMNS = ["seed", "trainable", "total", "steps", "samples", "tokens", "eval_n", "threads"]
FLOAT_COLUMNS = ["adapter_mb", "wall_s", "timed_s", "tokens_per_s", "samples_per_s", "peak_memory_mb", "activation_mb", "primary_value"]
TIDY_VALUE_COLUMNS = ["metric", "value"]

# Throughput is missing (null in the record, NaN here) when a run timed no step: it was no longer
# than its timing warm-up. Markdown shows that as NOT_MEASURED, never as a blank or a 0.
THROUGHPUT_COLUMNS = ["tokens_per_s", "samples_per_s"]
NOT_MEASURED = "n/m"
NOT_MEASURED_NOTE = f"{NOT_MEASURED}: not measured (no training step was timed: the run was no longer than its timing warm-up)."

# Cost columns the summary averages over a group's successful seeds.
COST_COLUMNS = ["trainable", "total", "adapter_mb", "peak_memory_mb", "activation_mb", "tokens_per_s", "samples_per_s", "wall_s"]
SUMMARY_COLUMNS = [
    *GROUP_KEY, "primary_metric", "eval_split", "n_seeds", "n_failed",
    "score_mean", "score_std", "score_ci95_t", *COST_COLUMNS, "peak_memory_kind", "rank", "lr", "environments",
]  # fmt: skip
LEADERBOARD_COLUMNS = [
    "task", "place", "variant", "setting", "primary_metric", "score_mean", "score_ci95_t", "n_seeds", "lr",
    "trainable", "pct_of_full_score", "pct_of_full_params", "pareto", "vs_lora", "vs_full", "above_floors",
]  # fmt: skip
# The leaderboard's significance columns: the verdict against each reference of ``significance``.
VERDICT_COLUMNS = {"vs_lora": "lora", "vs_full": "full"}
LR_SELECTION_COLUMNS = ["task", "variant", "setting", "lr", "metric", "split", "mean", "seeds", "failed", "chosen"]
CI_LEVEL = 0.95


def load_runs(results_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per run record under ``results_dir/runs``, every nested field flattened."""
    rows = [_flatten(record) for record in records.read_all(results_dir)]
    runs = pd.DataFrame(rows)
    extra = sorted(set(runs.columns) - set(RUN_COLUMNS))  # hp_*, metric_*, pkg_*, each group together
    runs = runs.reindex(columns=RUN_COLUMNS + extra)
    for column in COUNT_COLUMNS:
        runs[column] = pd.to_numeric(runs[column]).astype("Int64")
    for column in FLOAT_COLUMNS + [c for c in extra if c.startswith("metric_")]:
        runs[column] = pd.to_numeric(runs[column]).astype("float64")
    for column in extra:
        if column.startswith("hp_"):
            runs[column] = _one_type(runs[column])
    runs["environment"] = environment_ids(runs)
    return sort_runs(runs, RUN_KEY)


def environment_ids(runs: pd.DataFrame) -> pd.Series:
    """E1, E2, ... per distinct environment (``ENVIRONMENT_FIELDS``), E1 the one with most runs,
    so records from several machines or commits can be told apart in every table."""
    fields = [column for column, _ in ENVIRONMENT_FIELDS]
    if runs.empty:
        return pd.Series(index=runs.index, dtype=object)
    keys = runs.reindex(columns=fields).astype("string").fillna("").agg("\x1f".join, axis=1)
    order = keys.value_counts(sort=False).sort_values(ascending=False, kind="stable").index
    names = {key: f"E{number}" for number, key in enumerate(order, start=1)}
    return keys.map(names).astype(object)


def environments(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per environment id: its run count and the value of every environment field."""
    fields = dict(ENVIRONMENT_FIELDS)
    runs = runs_from_tidy(runs)
    if "environment" not in runs.columns:  # tables written before environments had ids
        runs = runs.assign(environment=environment_ids(runs))
    rows = runs.reindex(columns=[*fields, "environment"]).groupby("environment", sort=False)
    table = rows[list(fields)].first().rename(columns=fields).astype("string")
    table.insert(0, "runs", rows.size())
    table = table.reset_index()
    return table.sort_values("environment", key=lambda ids: ids.str[1:].astype(int)).reset_index(drop=True)


def tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per run x metric its task reports, with every run column repeated.

    A failed run keeps one row per metric of its task, with a NaN value, so that it stays
    visible wherever the table is filtered by metric; a task with no successful run gives
    its runs a single row with no metric.
    """
    metric_columns = [column for column in runs.columns if column.startswith("metric_")]
    id_columns = [column for column in runs.columns if column not in metric_columns]
    long = runs.melt(id_vars=id_columns, value_vars=metric_columns, var_name="metric", value_name="value")
    long["metric"] = long["metric"].str.removeprefix("metric_")
    reported = long.loc[long["value"].notna(), ["task", "metric"]].drop_duplicates()
    long = long.merge(reported, on=["task", "metric"])
    unmeasured = runs.loc[~runs["task"].isin(reported["task"]), id_columns].assign(metric=None, value=np.nan)
    parts = [part for part in (long, unmeasured) if len(part)]
    table = pd.concat(parts, ignore_index=True) if parts else long
    table["value"] = table["value"].astype("float64")
    return sort_runs(table, RUN_KEY + ["metric"])


def runs_from_tidy(table: pd.DataFrame) -> pd.DataFrame:
    """The run-level rows of a tidy table (or a run table, returned as is)."""
    if "metric" not in table.columns:
        return table
    return table.drop(columns=TIDY_VALUE_COLUMNS).drop_duplicates(RUN_KEY).reset_index(drop=True)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per task x variant x setting: the primary score over seeds and the mean costs.

    ``score_ci95_t`` is the half-width of the 95% confidence interval of the mean, from
    Student's t with n-1 degrees of freedom (NaN when n = 1); ``n_seeds`` counts the
    successful seeds, ``n_failed`` the failed ones. Costs are means over successful seeds.
    """
    runs = runs_from_tidy(table)
    task_metric = runs.dropna(subset=["primary_metric"]).groupby("task")["primary_metric"].first()
    task_split = runs.dropna(subset=["eval_split"]).groupby("task")["eval_split"].first()
    rows = []
    for (task, variant, setting), group in runs.groupby(GROUP_KEY, sort=False):
        ok = group[group["status"] == "ok"]
        scores = ok["primary_value"].dropna().astype("float64")
        mean, std, half_width = _mean_std_ci(scores)
        row = {
            "task": task,
            "variant": variant,
            "setting": setting,
            "primary_metric": task_metric.get(task),
            "eval_split": task_split.get(task),
            "n_seeds": len(scores),
            "n_failed": int((group["status"] == "failed").sum()),
            "score_mean": mean,
            "score_std": std,
            "score_ci95_t": half_width,
            "peak_memory_kind": ", ".join(sorted(ok["peak_memory_kind"].dropna().unique())) or None,
            "rank": _first_number(group["hp_rank"]) if "hp_rank" in group else math.nan,  # the adapter's (none for full)
            "lr": _first_number(group["hp_lr"]) if "hp_lr" in group else math.nan,
            "environments": "+".join(sorted(group.get("environment", pd.Series(dtype=object)).dropna().unique(), key=lambda name: int(name[1:]))),
        }
        row.update({column: ok[column].astype("float64").mean() for column in COST_COLUMNS})
        rows.append(row)
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary.attrs["ci"] = f"{CI_LEVEL:.0%} Student t, half-width"
    return sort_runs(summary, GROUP_KEY)


def lower_is_better(metric: str | None) -> bool:
    """Whether the best of this metric is its minimum ("best variant" then picks the smallest)."""
    return str(metric) in records.LOWER_IS_BETTER


def task_lower_is_better(rows: pd.DataFrame) -> bool:
    """Whether smaller is better for the primary metric of these rows (one task's)."""
    metrics = rows["primary_metric"].dropna()
    return lower_is_better(metrics.iloc[0] if len(metrics) else None)


def full_reference(rows: pd.DataFrame) -> pd.Series | None:
    """One task's full fine-tuning row to compare with: the default setting's when it has a
    score, else the first other full setting with one; None when full has no successful run."""
    full = rows[(rows["variant"] == FULL) & rows["score_mean"].notna()]
    preferred = full[full["setting"] == DEFAULT_SETTING]
    chosen = preferred if len(preferred) else full
    return chosen.iloc[0] if len(chosen) else None


def metric_name(metric: str | None) -> str:
    return METRIC_NAMES.get(str(metric), str(metric)) if metric is not None else "score"


def score_label(rows: pd.DataFrame) -> str:
    """The y-axis name, e.g. "dev accuracy" or "test BLEU", from the task's eval split and
    primary metric."""
    metric = rows["primary_metric"].dropna()
    split = rows["eval_split"].dropna()
    if metric.empty:
        return "score"
    return f"{split.iloc[0]} {metric_name(metric.iloc[0])}" if len(split) else metric_name(metric.iloc[0])


def pareto_front(points: pd.DataFrame, lower_is_better: bool = False) -> pd.Series:
    """True for the rows no other row beats on both trainable parameters (fewer) and score
    (better), ties on both counting as no beating; rows missing either are never on it."""
    valid = points["trainable"].notna() & points["score_mean"].notna()
    cost = points["trainable"].astype("float64").to_numpy()
    gain = points["score_mean"].astype("float64").to_numpy() * (-1 if lower_is_better else 1)
    front = []
    for i in range(len(points)):
        dominated = valid & (cost <= cost[i]) & (gain >= gain[i]) & ((cost < cost[i]) | (gain > gain[i]))
        front.append(bool(valid.iloc[i]) and not dominated.any())
    return pd.Series(front, index=points.index, dtype=bool)


def leaderboard(summary: pd.DataFrame, tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per task, every trained variant x setting ranked by mean score (best first), with its
    share of full fine-tuning's score and parameters and whether it is on the Pareto front of
    score vs trainable parameters. The untrained base model is left out: it is a reference.
    With the ``significance`` table: the verdict against LoRA and full fine-tuning, and whether
    the score is significantly above every floor (majority class, untrained model) it has."""
    parts = []
    for task, rows in summary[summary["setting"] != BASE_SETTING].groupby("task", sort=True):
        rows = rows.dropna(subset=["score_mean"])
        if rows.empty:
            continue
        lower = task_lower_is_better(rows)
        rows = rows.sort_values("score_mean", ascending=lower, kind="stable").copy()
        rows["place"] = range(1, len(rows) + 1)
        reference = full_reference(rows)
        rows["pct_of_full_score"] = percent_of_full(rows["score_mean"], reference, lower)
        rows["pct_of_full_params"] = math.nan if reference is None else 100 * rows["trainable"] / reference["trainable"]
        rows["pareto"] = pareto_front(rows, lower)
        parts.append(rows)
    board = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    if tests is not None and len(board):
        board = board.drop(columns=[*VERDICT_COLUMNS, "above_floors"], errors="ignore").merge(verdicts(tests), on=GROUP_KEY, how="left")
    return board.reindex(columns=LEADERBOARD_COLUMNS).reset_index(drop=True)


def verdicts(tests: pd.DataFrame) -> pd.DataFrame:
    """Per task x variant x setting: the verdict against LoRA and full, and ``above_floors``:
    True when significantly above every floor that was tested (a task may have only one: no
    majority class for generation), False when not above one, None when none was tested."""
    rows = []
    for key, group in tests.groupby(GROUP_KEY, sort=False):
        row = dict(zip(GROUP_KEY, key))
        for column, reference in VERDICT_COLUMNS.items():
            found = group.loc[group["reference"] == reference, "verdict"]
            row[column] = found.iloc[0] if len(found) else None
        floors = group[group["reference"].isin([significance.MAJORITY, significance.UNTRAINED])]
        tested = floors["significant"].dropna()
        row["above_floors"] = None if tested.empty else bool(tested.astype(bool).all())
        rows.append(row)
    return pd.DataFrame(rows, columns=[*GROUP_KEY, *VERDICT_COLUMNS, "above_floors"])


def percent_of_full(scores: pd.Series, reference: pd.Series | None, lower: bool) -> pd.Series:
    """Scores as % of full fine-tuning's, oriented so that above 100 is always better than
    full (full / score when smaller is better); NaN where the ratio means nothing (no full run,
    or a reference score of 0 or below, as a Matthews correlation can be)."""
    full = math.nan if reference is None else float(reference["score_mean"])
    if not full > 0:
        return pd.Series(math.nan, index=scores.index)
    return 100 * (full / scores.where(scores > 0) if lower else scores / full)


def glue_average(summary: pd.DataFrame) -> pd.DataFrame:
    """The GLUE average (x100) per variant x setting that has a score on every task of
    ``GLUE_TASKS``, with the task scores beside it; empty when no variant has them all."""
    scores = summary[summary["task"].isin(GLUE_TASKS) & (summary["setting"] != BASE_SETTING)].dropna(subset=["score_mean"])
    wide = scores.pivot_table(index=["variant", "setting"], columns="task", values="score_mean", observed=True)
    wide = wide.reindex(columns=list(GLUE_TASKS)).dropna() * 100
    wide.insert(0, "glue_average", wide.mean(axis=1))
    wide = wide.reset_index().sort_values("glue_average", ascending=False, kind="stable")
    return wide.reindex(columns=["variant", "setting", "glue_average", *GLUE_TASKS]).reset_index(drop=True)


def lr_selections(table: pd.DataFrame) -> pd.DataFrame:
    """Per swept task x variant x setting, one row per rate of its grid: the mean validation
    score over the sweep's seeds, how many of them failed, and whether the rate was chosen.
    Read from the final runs' records, which carry their sweep's selection file."""
    runs = runs_from_tidy(table)
    if "selection" not in runs.columns:  # tables written before sweeps existed
        return pd.DataFrame(columns=LR_SELECTION_COLUMNS)
    rows = []
    swept = runs.dropna(subset=["selection"]).drop_duplicates(GROUP_KEY)
    for run in swept.itertuples(index=False):
        selection = json.loads(run.selection)
        for entry in selection["scores"]:
            rows.append({"task": run.task, "variant": run.variant, "setting": run.setting, "lr": entry["lr"],
                         "metric": selection["metric"], "split": selection["split"],
                         "mean": math.nan if entry["mean"] is None else entry["mean"], "seeds": len(entry["seeds"]),
                         "failed": entry["failed"], "chosen": entry["lr"] == selection["chosen"]})
    table = pd.DataFrame(rows, columns=LR_SELECTION_COLUMNS)
    return sort_runs(table, GROUP_KEY + ["lr"]) if len(table) else table


def _first_number(column: pd.Series) -> float:
    numbers = pd.to_numeric(column, errors="coerce").dropna()
    return float(numbers.iloc[0]) if len(numbers) else math.nan


def sort_runs(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sort by ``keys`` with variants in ``VARIANT_ORDER`` (full first) and settings in natural
    order (base, default, then rank4 before rank16), so tables are stable and read in order."""

    def key(column: pd.Series) -> pd.Series:
        if column.name == "variant":
            return pd.Categorical(column, categories=variant_order(column), ordered=True)
        if column.name == "setting":
            return pd.Categorical(column, categories=setting_order(column), ordered=True)
        return column

    return table.sort_values(keys, key=key, kind="stable").reset_index(drop=True)


def setting_order(settings) -> list[str]:
    """base, default, then the others with their numbers compared as numbers."""
    present = set(settings)
    first = [name for name in (BASE_SETTING, DEFAULT_SETTING) if name in present]
    return first + sorted(present - set(first), key=_natural_key)


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(name))]


def variant_order(variants) -> list[str]:
    """The given variant names, known ones in ``VARIANT_ORDER``, then the rest alphabetically."""
    present = set(variants)
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def write_tables(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild every table under ``results_dir/tables`` from the records; return (tidy, summary)."""
    tables = Path(results_dir, "tables")
    long = tidy(load_runs(results_dir))
    summary = summarize(long)
    with files.atomic_path(tables / "runs.parquet") as temporary:
        long.to_parquet(temporary, index=False)
    write_csv(long, tables / "runs.csv")
    tests = significance.table(results_dir, BASE_SETTING, DEFAULT_SETTING)
    tables_by_name = {"summary": summary, "leaderboard": leaderboard(summary, tests), "glue": glue_average(summary),
                      "lr_selection": lr_selections(long), "significance": tests}
    for name, table in tables_by_name.items():
        write_csv(table, tables / f"{name}.csv")
        files.write_text_atomic(tables / f"{name}.md", markdown_file(table))
        files.write_text_atomic(tables / f"{name}.tex", latex_table(table))
    write_extraction_tables(results_dir)
    return long, summary


def write_extraction_tables(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """``analysis.extraction``'s tables, as CSV beside the others."""
    found = extraction.tables(results_dir)
    for name, table in found.items():
        write_csv(table, Path(results_dir, "tables", f"{name}.csv"))
    return found


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """A table as CSV, written atomically (``lorabench.files``) so that a kill never leaves half of one."""
    with files.atomic_path(path) as temporary:
        table.to_csv(temporary, index=False)


def markdown_file(table: pd.DataFrame) -> str:
    """A table's Markdown file, its unmeasured throughput shown as ``NOT_MEASURED`` and explained below it."""
    shown = mark_not_measured(table)
    note = f"\n{NOT_MEASURED_NOTE}\n" if shown.isin([NOT_MEASURED]).any().any() else ""
    return markdown_table(shown) + "\n" + note


def mark_not_measured(table: pd.DataFrame) -> pd.DataFrame:
    """``NOT_MEASURED`` in the throughput cells of rows that trained (a successful seed, not the
    untrained base model) but timed no step, so that a missing measurement never reads as one."""
    trained = pd.Series(True, index=table.index)
    if "n_seeds" in table.columns:
        trained &= table["n_seeds"] > 0
    if "setting" in table.columns:
        trained &= table["setting"] != BASE_SETTING
    marked = {column: not_measured(table[column], trained) for column in THROUGHPUT_COLUMNS if column in table.columns}
    return table.assign(**marked)


def not_measured(values: pd.Series, trained: pd.Series) -> pd.Series:
    """``values`` with ``NOT_MEASURED`` where ``trained`` holds but the value is missing."""
    return values.astype(object).where(values.notna() | ~trained.to_numpy(), NOT_MEASURED)


def format_value(value: Any) -> str:
    """A table cell: blank for missing, thousands separators for big numbers, 4 digits else."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; numbers, and text that starts with one ("0.85 (3)"),
    right-aligned (no ``tabulate`` needed)."""
    numeric = [_numeric_column(table[column]) for column in table.columns]
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|"
    body = [
        "| " + " | ".join(format_value(value).replace("|", "\\|") for value in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def _numeric_column(column: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(column):
        return True
    cells = column.dropna().astype(str)
    cells = cells[(cells != "") & (cells != NOT_MEASURED)]
    return bool(len(cells)) and bool(cells.str.match(r"^[-+]?[\d.,]+( |$)").all())


def latex_table(table: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (no Jinja2 needed); text is escaped for LaTeX."""
    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    columns = "".join("r" if is_number else "l" for is_number in numeric)
    lines = [f"\\begin{{tabular}}{{{columns}}}", "\\toprule", _latex_row(table.columns), "\\midrule"]
    lines += [_latex_row(format_value(value) for value in row) for row in table.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def _latex_row(cells) -> str:
    escapes = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
    return " & ".join("".join(escapes.get(char, char) for char in str(cell)) for cell in cells) + r" \\"


def _mean_std_ci(scores: pd.Series) -> tuple[float, float, float]:
    n = len(scores)
    if n == 0:
        return math.nan, math.nan, math.nan
    if n == 1:
        return float(scores.iloc[0]), math.nan, math.nan
    std = float(scores.std(ddof=1))
    half_width = float(stats.t.ppf(0.5 + CI_LEVEL / 2, df=n - 1)) * std / math.sqrt(n)
    return float(scores.mean()), std, half_width


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    run = record["run"]
    params = record["params"] or {}
    train = record["train"] or {}
    evaluation = record["eval"] or {}
    meta = record["meta"] or {}
    adapter_bytes = params.get("adapter_bytes")
    row = {
        **{key: run[key] for key in RUN_FIELDS},
        **{key: run.get(key) for key in DATA_FIELDS},
        "status": record["status"],
        "error": _describe_error(record["error"]),
        "trainable": params.get("trainable"),
        "total": params.get("total"),
        "adapter_mb": None if adapter_bytes is None else adapter_bytes / BYTES_PER_MB,
        **{key: train.get(key) for key in TRAIN_FIELDS},
        **({key: None for key in THROUGHPUT_COLUMNS} if train.get("timed_steps") == 0 else {}),  # older records wrote 0, not null
        "eval_split": evaluation.get("split"),
        "eval_n": evaluation.get("n"),
        "primary_metric": evaluation.get("primary"),
        "primary_value": evaluation.get("primary_value"),
        **{key: meta.get(key) for key in META_FIELDS},
        "selection": _cell(run.get("selection")),
    }
    row.update({f"hp_{name}": _cell(value) for name, value in run["hparams"].items()})
    row.update({f"pkg_{name}": version for name, version in (meta.get("packages") or {}).items()})
    row.update({f"metric_{name}": value for name, value in (evaluation.get("metrics") or {}).items()})
    return row


def _describe_error(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    text = f"{error.get('type', 'Error')}: {error.get('message', '')}"
    return text if error.get("step") is None else f"{text} (step {error['step']})"


def _cell(value: Any) -> Any:
    """Lists and dicts become JSON strings, so every hyper-parameter fits one table cell."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _one_type(column: pd.Series) -> pd.Series:
    """Parquet needs one type per column: a hyper-parameter that is 8 in one run and "auto" in
    another becomes text in all."""
    if column.dropna().map(type).nunique() <= 1:
        return column
    return column.where(column.isna(), column.astype(str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="the folder holding runs/ (tables/ is written there)")
    args = parser.parse_args(argv)
    long, summary = write_tables(args.results_dir)
    runs = runs_from_tidy(long)
    print(
        f"{len(runs)} runs ({(runs['status'] == 'failed').sum()} failed), {len(summary)} groups -> {args.results_dir / 'tables'}"
    )


if __name__ == "__main__":
    main()
