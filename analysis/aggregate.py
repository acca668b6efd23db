"""Run records -> pandas tables: one row per run, one row per run x metric, and a summary.

Analysis reads only the run records (``lorabench.records``), never the engine, so tables
can be rebuilt anywhere from ``results/runs`` without retraining.

``python -m analysis.aggregate RESULTS_DIR`` writes into ``RESULTS_DIR/tables``:
``runs.parquet`` and ``runs.csv`` (the tidy long form), ``summary.csv``, ``summary.md``
and ``summary.tex``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis import extraction
from lorabench import records

RUN_KEY = ["task", "variant", "setting", "seed"]
GROUP_KEY = ["task", "variant", "setting"]

# Known variants in the order tables and legends list them; unknown ones follow, sorted.
VARIANT_ORDER = (
    "full", "lora", "qlora", "lora_fa", "lora_plus", "vera", "delta_lora",
    "pissa", "delora", "dora", "edora", "lotr", "adalora", "extracted",
)  # fmt: skip

# Primary metrics where smaller is better, so "best variant" picks the minimum.
LOWER_IS_BETTER = frozenset({"loss", "eval_loss", "perplexity", "ppl", "wer", "cer", "ter"})

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
META_FIELDS = [
    "device", "threads", "hostname", "python", "platform",
    "lorabench_version", "git_commit", "git_dirty", "started_at", "finished_at",
]  # fmt: skip
RUN_COLUMNS = [
    *RUN_FIELDS, *DATA_FIELDS, "status", "error", "trainable", "total", "adapter_mb", *TRAIN_FIELDS,
    "eval_split", "eval_n", "primary_metric", "primary_value", *META_FIELDS,
]  # fmt: skip
COUNT_COLUMNS = ["seed", "trainable", "total", "steps", "samples", "tokens", "eval_n", "threads"]
FLOAT_COLUMNS = ["adapter_mb", "wall_s", "timed_s", "tokens_per_s", "samples_per_s", "peak_memory_mb", "activation_mb", "primary_value"]
TIDY_VALUE_COLUMNS = ["metric", "value"]

# Cost columns the summary averages over a group's successful seeds.
COST_COLUMNS = ["trainable", "total", "adapter_mb", "peak_memory_mb", "activation_mb", "tokens_per_s", "samples_per_s", "wall_s"]
SUMMARY_COLUMNS = [
    *GROUP_KEY, "primary_metric", "eval_split", "n_seeds", "n_failed",
    "score_mean", "score_std", "score_ci95_t", *COST_COLUMNS, "peak_memory_kind", "rank",
]  # fmt: skip
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
    return sort_runs(runs, RUN_KEY)


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
        }
        row.update({column: ok[column].astype("float64").mean() for column in COST_COLUMNS})
        rows.append(row)
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary.attrs["ci"] = f"{CI_LEVEL:.0%} Student t, half-width"
    return sort_runs(summary, GROUP_KEY)


def _first_number(column: pd.Series) -> float:
    numbers = pd.to_numeric(column, errors="coerce").dropna()
    return float(numbers.iloc[0]) if len(numbers) else math.nan


def sort_runs(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sort by ``keys`` with variants in ``VARIANT_ORDER`` (full first), so tables are stable."""

    def key(column: pd.Series) -> pd.Series:
        if column.name != "variant":
            return column
        return pd.Categorical(column, categories=variant_order(column), ordered=True)

    return table.sort_values(keys, key=key, kind="stable").reset_index(drop=True)


def variant_order(variants) -> list[str]:
    """The given variant names, known ones in ``VARIANT_ORDER``, then the rest alphabetically."""
    present = set(variants)
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def write_tables(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild every table under ``results_dir/tables`` from the records; return (tidy, summary)."""
    tables = Path(results_dir, "tables")
    tables.mkdir(parents=True, exist_ok=True)
    long = tidy(load_runs(results_dir))
    summary = summarize(long)
    long.to_parquet(tables / "runs.parquet", index=False)
    long.to_csv(tables / "runs.csv", index=False)
    summary.to_csv(tables / "summary.csv", index=False)
    (tables / "summary.md").write_text(markdown_table(summary) + "\n")
    (tables / "summary.tex").write_text(latex_table(summary))
    extraction.write_tables(results_dir)
    return long, summary


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
    """A GitHub-flavoured Markdown table; numbers right-aligned (no ``tabulate`` needed)."""
    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|"
    body = [
        "| " + " | ".join(format_value(value).replace("|", "\\|") for value in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


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
        "eval_split": evaluation.get("split"),
        "eval_n": evaluation.get("n"),
        "primary_metric": evaluation.get("primary"),
        "primary_value": evaluation.get("primary_value"),
        **{key: meta.get(key) for key in META_FIELDS},
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
