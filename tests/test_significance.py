"""Significance against LoRA, full fine-tuning and the floors, on records with known examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sacrebleu

from analysis import aggregate, headline, plots, report, significance
from lorabench import records
from tasks import e2e

N = 400  # evaluation examples of the synthetic task
LABELS = [index % 2 for index in range(N)]  # balanced except as cut below
LABELS[:40] = [1] * 40  # 220 of 400 positive: the majority class scores 0.55


def correct_on(count: int, offset: int = 0) -> list[int]:
    """Predictions right on ``count`` examples (from ``offset``, wrapping) and wrong on the rest."""
    right = {(offset + i) % N for i in range(count)}
    return [label if i in right else 1 - label for i, label in enumerate(LABELS)]


def write(results, variant, seed, predictions, setting="default", examples=True, labels=LABELS):
    hparams = {"lr": 1e-3, "max_steps": 0 if setting == "base" else 100}
    run = {"task": "toy", "variant": variant, "setting": setting, "model": "m", "seed": seed, "hparams": hparams,
           "config_hash": records.config_hash(hparams)}
    record = records.new_record(run, {"device": "cpu", "threads": 1, "packages": {}})
    score = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    evaluation = {"split": "dev", "n": len(labels), "metrics": {"accuracy": score}, "primary": "accuracy", "primary_value": score}
    if examples:
        evaluation["examples"] = {"prediction": predictions, "label": labels}
    record.update(status="ok", params={"trainable": 1000 if variant != "full" else 10**6, "total": 10**6},
                  train={"steps": hparams["max_steps"], "wall_s": 1.0, "tokens_per_s": 10.0, "loss_curve": [], "val_curve": []},
                  eval=evaluation)
    records.write_atomic(records.record_path(results, "toy", variant, setting, seed), record)


def row(tests: pd.DataFrame, variant: str, reference: str) -> pd.Series:
    found = tests[(tests["variant"] == variant) & (tests["reference"] == reference)]
    assert len(found) == 1, found
    return found.iloc[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """lora and full 3 seeds each; close (3 seeds, 1 point under LoRA, the seeds overlapping);
    strong (3 seeds, 10 points over LoRA); single (1 seed, 10 points over LoRA); same (1 seed,
    LoRA seed 0's predictions); majority (1 seed, always the majority class); the untrained
    model at 0.5."""
    results = tmp_path_factory.mktemp("significance")
    for seed, count in enumerate([320, 324, 316]):  # 0.80, 0.81, 0.79
        write(results, "lora", seed, correct_on(count, seed))
    for seed, count in enumerate([344, 348, 340]):  # 0.86, 0.87, 0.85
        write(results, "full", seed, correct_on(count, seed))
    for seed, count in enumerate([324, 308, 320]):  # 0.81, 0.77, 0.80: mean 0.793
        write(results, "close", seed, correct_on(count, seed + 7))
    for seed, count in enumerate([360, 364, 356]):
        write(results, "strong", seed, correct_on(count, seed))
    write(results, "single", 0, correct_on(360))
    write(results, "same", 0, correct_on(320, 0))
    write(results, "majority", 0, [1] * N)
    write(results, "lora", 0, correct_on(200), setting="base")
    aggregate.write_tables(results)
    return results


def test_welch_over_three_seeds_a_side(study):
    tests = significance.table(study)
    strong = row(tests, "strong", "lora")
    assert strong["test"] == significance.WELCH and strong["verdict"] == "better" and strong["p_value"] < 0.01
    close = row(tests, "close", "lora")
    assert close["test"] == significance.WELCH and close["verdict"] == "n.s."
    lora, full = row(tests, "lora", "full"), row(tests, "full", "lora")
    assert lora["verdict"] == "worse" and full["verdict"] == "better" and lora["p_value"] == pytest.approx(full["p_value"])
    assert lora["difference"] == pytest.approx(0.80 - 0.86)


def test_a_one_seed_side_gets_the_paired_bootstrap(study):
    tests = significance.table(study)
    single = row(tests, "single", "lora")
    assert single["test"] == significance.BOOTSTRAP and single["verdict"] == "better"
    # LoRA seed 0's own predictions against LoRA's three seeds: the same examples right, no difference
    assert row(tests, "same", "lora")["verdict"] == "n.s."


def test_the_floors_majority_class_and_untrained(study):
    tests = significance.table(study)
    majority = row(tests, "majority", significance.MAJORITY)
    assert majority["reference_score"] == pytest.approx(0.55) and majority["verdict"] == "not above" and majority["p_value"] > 0.4
    assert row(tests, "single", significance.UNTRAINED)["verdict"] == "above"  # 0.90 against 0.50, one seed each: bootstrap
    assert row(tests, "single", significance.UNTRAINED)["test"] == significance.BOOTSTRAP
    assert row(tests, "lora", significance.MAJORITY)["test"] == significance.ONE_SAMPLE
    assert row(tests, "lora", significance.UNTRAINED)["verdict"] == "above"
    assert not ((tests["setting"] == "base").any())  # the untrained model is a floor, never a contender


def test_leaderboard_and_report_show_the_verdicts_and_mark_the_floor(study):
    board = pd.read_csv(study / "tables" / "leaderboard.csv")
    by_variant = board.set_index("variant")
    assert by_variant.loc["strong", "vs_lora"] == "better" and by_variant.loc["strong", "vs_full"] == "better"
    assert by_variant.loc["close", "vs_lora"] == "n.s." and pd.isna(by_variant.loc["lora", "vs_lora"])
    assert not by_variant.loc["majority", "above_floors"] and by_variant.loc["strong", "above_floors"]
    text = report.build_report(study).read_text()
    assert f"0.5500 {report.AT_FLOOR}" in text and f"0.8000 {report.AT_FLOOR}" not in text
    tested = board["above_floors"].notna().sum()
    assert f"**1 of {tested} scores are not significantly above their floors**" in text.split("## Environment")[0]
    assert "Welch's t-test over seeds" in text and "paired bootstrap over the evaluation examples" in text
    assert (study / report.SEED_FIGURE).is_file() and "## Every seed" in text


def test_seed_figure_has_one_point_per_seed_and_the_floors(study):
    runs = aggregate.runs_from_tidy(pd.read_parquet(study / "tables" / "runs.parquet"))
    summary = pd.read_csv(study / "tables" / "summary.csv")
    figure = plots.seed_scores(runs, summary, pd.read_csv(study / "tables" / "significance.csv"))
    ax = figure.axes[0]
    points = sum(len(collection.get_offsets()) for collection in ax.collections if hasattr(collection, "get_offsets") and collection.get_offsets().ndim == 2)
    assert points >= len(runs[(runs["setting"] == "default")])
    assert {line.get_label() for line in ax.get_lines()} >= {significance.MAJORITY, significance.UNTRAINED}


def test_records_without_examples_or_on_other_examples_are_not_tested(tmp_path):
    write(tmp_path, "lora", 0, correct_on(320))
    write(tmp_path, "old", 0, correct_on(330), examples=False)
    other = LABELS[::-1]
    write(tmp_path, "other", 0, correct_on(330)[::-1], labels=other)
    tests = significance.table(tmp_path)
    assert row(tests, "old", "lora")["test"] == "none: a record has no eval.examples" and row(tests, "old", "lora")["verdict"] == "untested"
    assert row(tests, "other", "lora")["test"] == "none: scored on different examples"


def test_bleu_from_summed_statistics_is_sacrebleus_corpus_bleu():
    hypotheses = ["the cat sat on the mat", "a dog ran", "there is a pub near the river", "x"]
    references = [["the cat sat on a mat", "a cat sat"], ["the dog ran away"], ["a pub is near the river", "there is a pub", "pub"], ["y z"]]
    statistics = e2e.bleu_statistics(hypotheses, references)
    assert all(len(entry) == 10 for entry in statistics)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(3)]
    expected = sacrebleu.corpus_bleu(hypotheses, streams).score
    assert significance.metric_on({"bleu_stats": statistics}, "bleu", np.ones(4))[0] == pytest.approx(expected, abs=1e-9)
    # a resample drawing the first MR twice and the last not at all is the BLEU of that corpus
    twice = sacrebleu.corpus_bleu([hypotheses[0], *hypotheses[:3]], [[s[0], *s[:3]] for s in streams]).score
    assert significance.metric_on({"bleu_stats": statistics}, "bleu", np.array([2, 1, 1, 0]))[0] == pytest.approx(twice, abs=1e-9)


def test_grouped_accuracy_counts_only_its_group():
    examples = {"prediction": [1, 1, 0, 0], "label": [1, 0, 0, 1], "group": ["matched", "matched", "mismatched", "mismatched"]}
    weights = np.ones(4)
    assert significance.metric_on(examples, "accuracy_matched", weights)[0] == 0.5
    assert significance.metric_on(examples, "accuracy", weights)[0] == 0.5
    assert significance.metric_on({**examples, "prediction": [1, 0, 1, 1]}, "accuracy_mismatched", weights)[0] == 0.5


def test_headline_table_has_every_variant_with_ci_rate_and_verdicts(study, tmp_path):
    text = headline.table(study)
    lines = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(lines) == {"full", "lora", "close", "strong", "single", "same", "majority"}
    assert "| 0.800 ± 0.025 (3) | 0.001 | — / worse |" in lines["lora"] and lines["lora"].endswith("| 10 |")  # tokens/s
    assert "| 0.550 (1) † |" in lines["majority"] and "| better / better |" in lines["strong"]
    page = tmp_path / "page.md"
    page.write_text(f"before\n{headline.START}\nold\n{headline.END}\nafter\n")
    assert headline.write(page, text) and page.read_text() == f"before\n{headline.START}\n{text}{headline.END}\nafter\n"
    assert not headline.write(page, text)


def test_holm_adjusts_within_each_task_and_reference(study):
    tests = significance.table(study)
    assert (tests["p_holm"].dropna() >= tests["p_value"].dropna() - 1e-12).all()
    for _, family in tests.dropna(subset=["p_value"]).groupby(["task", "reference"]):
        ordered = family.sort_values("p_value")
        assert ordered["p_holm"].is_monotonic_increasing
        assert ordered["p_holm"].iloc[0] == pytest.approx(min(1.0, len(family) * ordered["p_value"].iloc[0]))
    assert set(tests.columns) >= {"metric", "lower_is_better"} and (tests["metric"] == "accuracy").all()


def test_identical_seeds_go_to_the_bootstrap_and_an_undefined_metric_is_not_tested():
    runs = [{"score": 0.8, "examples": {"prediction": correct_on(320), "label": LABELS}}] * 3
    others = [{"score": 0.81, "examples": {"prediction": correct_on(324, 50), "label": LABELS}}] * 3
    found = significance.compare(runs, others, "accuracy", lower_is_better=False, one_sided=False)
    assert found["test"] == significance.BOOTSTRAP and found["p_value"] > 0.05  # three equal seeds a side: no t statistic
    constant = {"prediction": [0.5] * 10, "label": [float(i) for i in range(10)]}
    varied = {"prediction": [float(i) for i in range(10)], "label": [float(i) for i in range(10)]}
    flat = significance.compare([{"score": float("nan"), "examples": constant}], [{"score": 1.0, "examples": varied}], "pearson", False, False)
    assert flat["test"].startswith("none") and np.isnan(flat["p_value"])


def test_the_majority_of_a_grouped_metric_is_its_groups():
    examples = {"prediction": [0] * 6, "label": [1, 1, 0, 0, 0, 0], "group": ["matched"] * 2 + ["mismatched"] * 4}
    assert significance.majority_examples(examples, "accuracy_matched")["prediction"] == [1] * 6
    assert significance.majority_examples(examples, "accuracy")["prediction"] == [0] * 6


def test_the_best_run_is_called_best_only_as_far_as_its_tests_go(study, tmp_path):
    text = report.build_report(study).read_text()
    assert "**toy** (dev accuracy): best is single at 0.9000 (n=1)." in text  # better than LoRA and full, both significant
    write(tmp_path, "lora", 0, correct_on(320))
    write(tmp_path, "full", 0, correct_on(324, 50))
    text = report.build_report(tmp_path).read_text()
    assert "best is full at 0.8100 (n=1), not significantly better than lora." in text


def test_a_study_whose_every_score_is_at_its_floors_says_so_at_the_top_and_beside_each_sentence():
    assert report.floor_note(pd.DataFrame({"above_floors": [True, None]})) == ""  # nothing at the floor, or untested
    note = report.floor_note(pd.DataFrame({"above_floors": [False, False, None]}))
    assert note.startswith("**No score in this study is significantly above its floors**") and "noise" in note
    board_row = pd.Series({"above_floors": False})
    assert report._floor_mark(board_row) == f" {report.AT_FLOOR} (not significantly above its floors)"
    assert report._floor_mark(pd.Series({"above_floors": float("nan")})) == ""
