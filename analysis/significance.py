"""Is a difference in score more than noise? Every variant against LoRA, full fine-tuning, the
majority class and the untrained model, from the run records.

Two tests, chosen per comparison by what the runs allow:

- **Welch's t-test over seeds** when both sides have at least ``MIN_SEEDS_FOR_T`` successful
  seeds (a one-sample t-test when the reference is a constant: the majority class). It asks
  whether another seed would keep the order; it takes the evaluation examples as fixed.
- **A paired bootstrap over the evaluation examples** otherwise (``RESAMPLES`` resamples, a
  fixed generator): both sides are scored on the same resampled examples, each side's score the
  mean over its seeds. It asks whether another test set of the same size would keep the order;
  it cannot see seed noise, so it is the weaker evidence for a one-seed comparison.

Both are two-sided against LoRA and full (``better`` / ``worse`` / ``n.s.``) and one-sided
against the floors (the majority class, the untrained model: ``above`` or ``not above``), at
``ALPHA`` after Holm's correction within each task x reference (a dozen variants are compared
with each reference, so uncorrected a few verdicts would be chance). ``n.s.`` is no evidence
of equality: three seeds a side give the t-test little power, and a bootstrap over few
examples (E2E scores about 15 meaning representations) is coarse. The bootstrap needs the records' ``eval.examples`` (predictions and labels, or
E2E's BLEU statistics); a comparison whose records lack them, or whose two sides were scored
on different examples, gets no test (``test`` names why).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lorabench import records

ALPHA = 0.05
MIN_SEEDS_FOR_T = 3
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
REFERENCES = ("lora", "full")  # variants every other one is compared with, in their default setting
MAJORITY = "majority class"
UNTRAINED = "untrained"
WELCH = "Welch t over seeds"
ONE_SAMPLE = "one-sample t over seeds"
BOOTSTRAP = f"paired bootstrap over examples ({RESAMPLES})"
COLUMNS = [
    "task", "variant", "setting", "metric", "lower_is_better", "reference", "test", "n_seeds", "reference_n_seeds", "score",
    "reference_score", "difference", "p_value", "p_holm", "significant", "verdict",
]  # fmt: skip


def examples_by_run(results_dir: str | os.PathLike) -> dict[tuple, dict[str, Any]]:
    """(task, variant, setting, seed) -> the successful run's primary metric, score and
    ``eval.examples`` (None when its record has none)."""
    found = {}
    for record in records.read_all(results_dir):
        run, evaluation = record["run"], record.get("eval") or {}
        if record["status"] != "ok" or evaluation.get("primary_value") is None:
            continue
        key = (run["task"], run["variant"], run["setting"], int(run["seed"]))
        found[key] = {"metric": evaluation["primary"], "score": float(evaluation["primary_value"]), "examples": evaluation.get("examples")}
    return found


def metric_on(examples: dict[str, list], metric: str, weights: np.ndarray) -> np.ndarray:
    """The ``metric`` on each resample of the examples; ``weights`` (resamples x examples)
    counts how often each example is drawn (a row of ones is the score itself)."""
    weights = np.atleast_2d(weights).astype("float64")
    if metric == "bleu":
        return _bleu(weights @ np.asarray(examples["bleu_stats"], dtype="float64"))
    predictions, labels = np.asarray(examples["prediction"]), np.asarray(examples["label"])
    name, group = metric, None
    if "group" in examples and "_" in metric:
        name, group = metric.rsplit("_", 1)
        weights = weights * (np.asarray(examples["group"]) == group)
    if name == "accuracy":
        return (weights @ (predictions == labels).astype("float64")) / weights.sum(axis=1)
    measure = _PER_RESAMPLE.get(name)
    if measure is None:
        raise ValueError(f"no resampling rule for metric {metric!r}; known: bleu, accuracy, {', '.join(_PER_RESAMPLE)}")
    drawn = [np.repeat(np.arange(len(labels)), row.astype(int)) for row in weights]
    return np.array([measure(predictions[rows], labels[rows]) for rows in drawn])


def _bleu(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU (sacrebleu's default: exponential smoothing, brevity penalty) from the summed
    statistics of ``e2e.bleu_statistics``, one row per resample."""
    from sacrebleu.metrics import BLEU

    counts = np.rint(sums).astype(int).tolist()
    return np.array([BLEU.compute_bleu(row[2:6], row[6:10], row[0], row[1], smooth_method="exp").score for row in counts])


def _f1(predictions, labels) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, pos_label=1, zero_division=0.0))


def _matthews(predictions, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, predictions))


_PER_RESAMPLE = {
    "f1": _f1,
    "matthews_corr": _matthews,
    "pearson": lambda predictions, labels: float(stats.pearsonr(predictions, labels)[0]),
    "spearman": lambda predictions, labels: float(stats.spearmanr(predictions, labels)[0]),
}


def majority_examples(examples: dict[str, list], metric: str) -> dict[str, list] | None:
    """The examples as a constant predictor of the most frequent label would score them (of the
    metric's group, for a grouped metric such as MNLI's accuracy_matched); None for regression
    (float labels) and generation."""
    labels = examples.get("label")
    if labels is None or not all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        return None
    counted = labels
    if "group" in examples and "_" in metric:
        group = metric.rsplit("_", 1)[1]
        counted = [label for label, found in zip(labels, examples["group"]) if found == group] or labels
    most = Counter(counted).most_common(1)[0][0]
    return {**examples, "prediction": [most] * len(labels)}


def compare(side: list[dict], reference: list[dict], metric: str, lower_is_better: bool, one_sided: bool,
            constant_reference: bool = False) -> dict[str, Any]:
    """Test ``side`` (one entry per seed: score and examples) against ``reference``; the
    difference is side minus reference, and "better" follows the metric's direction."""
    score = float(np.mean([run["score"] for run in side]))
    reference_score = float(np.mean([run["score"] for run in reference]))
    sign = -1.0 if lower_is_better else 1.0
    row = {"n_seeds": len(side), "reference_n_seeds": len(reference), "score": score, "reference_score": reference_score,
           "difference": score - reference_score, "test": None, "p_value": math.nan}
    if not (math.isfinite(score) and math.isfinite(reference_score)):
        row["test"] = "none: the metric is undefined for a run"
        return row
    ours, theirs = [run["score"] * sign for run in side], [run["score"] * sign for run in reference]
    seeded = len(side) >= MIN_SEEDS_FOR_T and (constant_reference or len(reference) >= MIN_SEEDS_FOR_T)
    # Without spread on either side a t statistic is undefined: the bootstrap then judges a gap.
    spread = np.ptp(ours) > 0 or (not constant_reference and np.ptp(theirs) > 0)
    if seeded and (spread or score == reference_score):
        row["test"] = ONE_SAMPLE if constant_reference else WELCH
        row["p_value"] = _t_test(ours, theirs, one_sided, constant_reference)
    else:
        row["test"], row["p_value"] = _bootstrap(side, reference, metric, sign, one_sided)
    return row


def _t_test(side: list[float], reference: list[float], one_sided: bool, constant: bool) -> float:
    alternative = "greater" if one_sided else "two-sided"
    if np.ptp(side) == 0 and (constant or np.ptp(reference) == 0):  # equal scores, no spread: no difference
        return 1.0
    if constant:
        return float(stats.ttest_1samp(side, reference[0], alternative=alternative).pvalue)
    return float(stats.ttest_ind(side, reference, equal_var=False, alternative=alternative).pvalue)


def _bootstrap(side: list[dict], reference: list[dict], metric: str, sign: float, one_sided: bool) -> tuple[str, float]:
    examples = [run["examples"] for run in side + reference]
    if any(found is None for found in examples):
        return "none: a record has no eval.examples", math.nan
    if not _same_examples(examples, metric):
        return "none: scored on different examples", math.nan
    count = _count(examples[0], metric)
    weights = np.random.default_rng(BOOTSTRAP_SEED).multinomial(count, np.full(count, 1 / count), size=RESAMPLES)
    ours = np.mean([metric_on(run["examples"], metric, weights) for run in side], axis=0)
    theirs = np.mean([metric_on(run["examples"], metric, weights) for run in reference], axis=0)
    gaps = sign * (ours - theirs)
    if not np.isfinite(gaps).all():  # a correlation of constant predictions, a group no resample drew
        return "none: the metric is undefined on a resample", math.nan
    below, above = (np.sum(gaps <= 0) + 1) / (RESAMPLES + 1), (np.sum(gaps >= 0) + 1) / (RESAMPLES + 1)
    return BOOTSTRAP, float(below if one_sided else min(1.0, 2 * min(below, above)))


def _count(examples: dict[str, list], metric: str) -> int:
    return len(examples["bleu_stats"] if metric == "bleu" else examples["label"])


def _same_examples(examples: list[dict], metric: str) -> bool:
    """Both sides scored the same examples: the same labels, or for BLEU the same inputs."""
    key = "input" if metric == "bleu" else "label"
    if any(key not in found for found in examples):
        return False
    first = examples[0][key]
    return all(found[key] == first for found in examples[1:])


def verdict(row: dict[str, Any], one_sided: bool) -> tuple[bool | None, str]:
    """(significant, what it means) from the Holm-adjusted p-value: above / not above a floor;
    better / worse / n.s. else."""
    if pd.isna(row["p_holm"]):
        return None, "untested"
    significant = bool(row["p_holm"] < ALPHA)
    if one_sided:
        return significant, "above" if significant else "not above"
    if not significant:
        return False, "n.s."
    better = (row["difference"] < 0) if row["lower_is_better"] else (row["difference"] > 0)
    return True, "better" if better else "worse"


def table(results_dir: str | os.PathLike, base_setting: str = "base", default_setting: str = "default") -> pd.DataFrame:
    """One row per trained task x variant x setting x reference (``COLUMNS``): LoRA's and full
    fine-tuning's default settings, the majority class (classifiers), the untrained model
    (``base_setting``)."""
    runs = examples_by_run(results_dir)
    groups: dict[tuple, list[dict]] = {}
    for (task, variant, setting, _seed), run in sorted(runs.items()):
        groups.setdefault((task, variant, setting), []).append(run)
    rows = []
    for (task, variant, setting), side in groups.items():
        if setting == base_setting:
            continue
        metric = side[0]["metric"]
        lower = metric in records.LOWER_IS_BETTER
        for reference_name in REFERENCES:
            reference = groups.get((task, reference_name, default_setting))
            if reference is not None and (variant, setting) != (reference_name, default_setting):
                rows.append(_row(task, variant, setting, reference_name, compare(side, reference, metric, lower, one_sided=False), metric, lower))
        floors = []
        majority = majority_examples(side[0]["examples"], metric) if side[0]["examples"] else None
        if majority is not None:
            score = float(metric_on(majority, metric, np.ones(_count(majority, metric)))[0])
            floors.append((MAJORITY, [{"score": score, "examples": majority}], True))
        untrained = next((found for (t, _, s), found in groups.items() if t == task and s == base_setting), None)
        if untrained is not None:  # one untrained score is a floor to clear, several a distribution
            floors.append((UNTRAINED, untrained, len(untrained) == 1))
        for name, reference, constant in floors:
            rows.append(_row(task, variant, setting, name, compare(side, reference, metric, lower, one_sided=True, constant_reference=constant),
                             metric, lower))
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["p_holm"] = holm(table)
    for index, found in table.iterrows():
        table.loc[index, ["significant", "verdict"]] = verdict(found, one_sided=found["reference"] in (MAJORITY, UNTRAINED))
    return table


def holm(table: pd.DataFrame) -> pd.Series:
    """Holm's step-down adjustment of ``p_value`` within each task x reference (NaN stays NaN)."""
    adjusted = pd.Series(math.nan, index=table.index, dtype="float64")
    for _, family in table.dropna(subset=["p_value"]).groupby(["task", "reference"], sort=False):
        ordered = family["p_value"].sort_values(kind="stable")
        count = len(ordered)
        running = 0.0
        for rank, (index, value) in enumerate(ordered.items()):
            running = max(running, min(1.0, (count - rank) * value))
            adjusted[index] = running
    return adjusted


def _row(task, variant, setting, reference, result, metric, lower) -> dict[str, Any]:
    row = {"task": task, "variant": variant, "setting": setting, "metric": metric, "lower_is_better": lower, "reference": reference,
           **result, "p_holm": math.nan, "significant": None, "verdict": None}
    return {column: row[column] for column in COLUMNS}
