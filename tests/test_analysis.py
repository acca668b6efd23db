"""Analysis on synthetic run records with known numbers: tables, figure, report."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import aggregate, plots, report
from lorabench import records

# Student t quantiles t(0.975, df) from printed tables, for the hand-computed intervals.
T_975 = {1: 12.706204736, 2: 4.302652730}
MB = 2**20
FULL_PARAMS, LORA_PARAMS, VERA_PARAMS = 23_000_000, 300_000, 10_000


def write_run(results, task, variant, seed, score=None, *, trainable, peak_mb=1000.0, error=None, commit="abc123", note=None):
    """A valid record; ``score=None`` with ``error`` makes a failed run; ``note`` a data note."""
    hparams = {"lr": 5e-4, "rank": 8, "target_modules": ["query", "value"], "max_steps": 600}
    run = {
        "task": task,
        "variant": variant,
        "setting": "default",
        "model": "minilm",
        "seed": seed,
        "hparams": hparams,
        "config_hash": records.config_hash(hparams),
        **({"data_source": "local", "data_note": note} if note else {}),
    }
    meta = {
        "device": "cpu",
        "threads": 2,
        "hostname": "h",
        "python": "3.11.7",
        "git_commit": commit,
        "git_dirty": False,
        "packages": {"torch": "2.13.0", "transformers": "5.23.0"},
        "finished_at": f"2026-11-23T02:0{seed}:00+00:00",
    }
    record = records.new_record(run, meta)
    if error:
        record.update(status="failed", error=error)
    else:
        metrics = {"accuracy": score, "f1": score - 0.01} if task == "sst2" else {"accuracy": score}
        record.update(
            status="ok",
            params={"trainable": trainable, "total": FULL_PARAMS, "adapter_bytes": 4 * MB, "adapter_path": "a"},
            train={
                "steps": 600,
                "samples": 19200,
                "tokens": 260_000,
                "wall_s": 180.0,
                "tokens_per_s": 1500.0,
                "samples_per_s": 110.0,
                "peak_memory_mb": peak_mb,
                "peak_memory_kind": "cpu_rss",
                "loss_curve": [[10, 0.69]],
                "val_curve": [],
            },
            eval={"split": "dev", "n": 872, "metrics": metrics, "primary": "accuracy", "primary_value": score},
        )
    records.write_atomic(records.record_path(results, task, variant, "default", seed), record)


DIVERGED = {"type": "DivergedError", "message": "loss is nan", "step": 37}
OOM = {"type": "OutOfMemoryError", "message": "CUDA out of memory", "step": 0}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """sst2: full x3, lora x2, vera 1 ok + 1 failed; imdb: full, lora, vera failed (other commit)."""
    results = tmp_path_factory.mktemp("results")
    for seed, (score, peak) in enumerate([(0.90, 900.0), (0.92, 1000.0), (0.94, 1100.0)]):
        write_run(results, "sst2", "full", seed, score, trainable=FULL_PARAMS, peak_mb=peak)
    for seed, score in enumerate([0.85, 0.87]):
        write_run(results, "sst2", "lora", seed, score, trainable=LORA_PARAMS)
    write_run(results, "sst2", "vera", 0, 0.80, trainable=VERA_PARAMS)
    write_run(results, "sst2", "vera", 1, trainable=VERA_PARAMS, error=DIVERGED)
    write_run(results, "imdb", "full", 0, 0.91, trainable=FULL_PARAMS, commit="def456", note="offline copy, trained on dev")
    write_run(results, "imdb", "lora", 0, 0.88, trainable=LORA_PARAMS, commit="def456")
    write_run(results, "imdb", "vera", 0, trainable=VERA_PARAMS, error=OOM, commit="def456")
    return results


@pytest.fixture(scope="module")
def summary(results):
    return aggregate.summarize(aggregate.tidy(aggregate.load_runs(results)))


def cell(summary, task, variant, column):
    return summary.set_index(["task", "variant"]).loc[(task, variant), column]


def test_load_runs_flattens_one_row_per_run(results):
    runs = aggregate.load_runs(results)
    assert len(runs) == 10
    assert list(runs.columns[: len(aggregate.RUN_COLUMNS)]) == aggregate.RUN_COLUMNS
    assert list(runs[["task", "variant", "seed"]].head(3).itertuples(index=False, name=None)) == [
        ("imdb", "full", 0),
        ("imdb", "lora", 0),
        ("imdb", "vera", 0),
    ]
    row = runs[(runs["task"] == "sst2") & (runs["variant"] == "lora")].iloc[0]
    assert row["hp_target_modules"] == '["query", "value"]'
    assert row["adapter_mb"] == 4.0
    assert row["pkg_torch"] == "2.13.0"
    assert row["metric_f1"] == pytest.approx(0.84)
    failed = runs[runs["status"] == "failed"].set_index("task")
    assert failed.loc["sst2", "error"] == "DivergedError: loss is nan (step 37)"
    assert math.isnan(failed.loc["sst2", "primary_value"])


def test_tidy_has_one_row_per_run_and_task_metric(results):
    long = aggregate.tidy(aggregate.load_runs(results))
    assert len(long) == 7 * 2 + 3 * 1  # sst2 reports accuracy and f1, imdb accuracy
    failed = long[long["status"] == "failed"]
    assert sorted(failed["metric"]) == ["accuracy", "accuracy", "f1"]
    assert failed["value"].isna().all()


def test_summary_cells_match_hand_computation(summary):
    assert list(summary.columns) == aggregate.SUMMARY_COLUMNS
    assert len(summary) == 6
    assert cell(summary, "sst2", "full", "n_seeds") == 3
    assert cell(summary, "sst2", "full", "score_mean") == pytest.approx(0.92)
    assert cell(summary, "sst2", "full", "score_std") == pytest.approx(0.02)
    assert cell(summary, "sst2", "full", "score_ci95_t") == pytest.approx(T_975[2] * 0.02 / math.sqrt(3))
    assert cell(summary, "sst2", "full", "peak_memory_mb") == pytest.approx(1000.0)
    assert cell(summary, "sst2", "lora", "score_std") == pytest.approx(math.sqrt(2) * 0.01)
    assert cell(summary, "sst2", "lora", "score_ci95_t") == pytest.approx(T_975[1] * 0.01)
    assert cell(summary, "sst2", "lora", "adapter_mb") == 4.0
    assert (cell(summary, "sst2", "vera", "n_seeds"), cell(summary, "sst2", "vera", "n_failed")) == (1, 1)
    assert cell(summary, "sst2", "vera", "score_mean") == pytest.approx(0.80)
    assert math.isnan(cell(summary, "sst2", "vera", "score_ci95_t"))
    assert (cell(summary, "imdb", "vera", "n_seeds"), cell(summary, "imdb", "vera", "n_failed")) == (0, 1)
    assert cell(summary, "imdb", "vera", "primary_metric") == "accuracy"


def test_summarize_gives_the_same_from_runs_or_tidy(results, summary):
    pd.testing.assert_frame_equal(aggregate.summarize(aggregate.load_runs(results)), summary)


def test_write_tables_writes_every_format(results):
    aggregate.main([str(results)])
    tables = results / "tables"
    assert len(pd.read_parquet(tables / "runs.parquet")) == len(pd.read_csv(tables / "runs.csv")) == 17
    assert (tables / "summary.md").read_text().startswith("| task | variant | setting |")
    assert r"\toprule" in (tables / "summary.tex").read_text()
    assert (tables / "leaderboard.md").read_text().startswith("| task | place | variant |")
    assert pd.read_csv(tables / "glue.csv").empty and r"\toprule" in (tables / "glue.tex").read_text()


def test_empty_results_give_empty_tables_with_headers(tmp_path):
    long, summary = aggregate.write_tables(tmp_path)
    assert long.empty and summary.empty
    assert list(pd.read_csv(tmp_path / "tables" / "summary.csv").columns) == aggregate.SUMMARY_COLUMNS
    assert "metric" in pd.read_csv(tmp_path / "tables" / "runs.csv").columns
    assert "No run records" in report.build_report(tmp_path).read_text()
    assert (tmp_path / "figures" / "score_vs_params.png").exists()


def test_score_vs_params_labels_axes_and_one_entry_per_variant(summary, tmp_path):
    figure = plots.score_vs_params(summary, tmp_path / "score")
    assert (tmp_path / "score.png").stat().st_size > 0 and (tmp_path / "score.pdf").stat().st_size > 0
    imdb, sst2 = figure.axes
    assert (imdb.get_title(), sst2.get_title()) == ("imdb\n(no successful run: vera)", "sst2")
    assert sst2.get_xlabel() == "trainable parameters (count, log scale)"
    assert sst2.get_ylabel() == "dev accuracy" and sst2.get_xscale() == "log"
    assert len(sst2.containers) == 3 and len(imdb.containers) == 2  # imdb's vera only failed
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["full", "lora", "vera"]
    other_setting = summary[summary["variant"] == "lora"].assign(setting="rank4", trainable=150_000)
    figure = plots.score_vs_params(pd.concat([summary, other_setting], ignore_index=True))
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["full", "lora", "vera"]  # settings share an entry


def test_variant_style_is_stable_and_distinct():
    known = [plots.variant_style(name) for name in aggregate.VARIANT_ORDER]
    assert len(set(known)) == len(known)
    assert plots.variant_style("my_method") == plots.variant_style("my_method")
    assert plots.variant_style("my_method") not in known
    colors = [color for color, _ in known]
    assert len(set(colors)) == len(colors) and colors[0] == plots.FULL_STYLE[0]


def test_report_lists_tables_environment_findings_and_failures(results):
    text = report.build_report(results).read_text()
    sst2 = text.split("### sst2 (dev accuracy)")[1].split("##")[0]
    imdb = text.split("### imdb (dev accuracy)")[1].split("##")[0]
    assert "| variant | env | score mean ± std (n) | F1 | trainable params |" in sst2  # the task's other metric
    assert "| full | E1 | 0.9200 ± 0.0200 (3) | 0.91 | 23,000,000 |" in sst2
    assert "| vera | E1 | 0.8000 (1), 1 failed | 0.79 |" in sst2
    assert "| variant | env | score mean ± std (n) | trainable params |" in imdb
    assert "_Data: offline copy, trained on dev._" in imdb and "_Data:" not in sst2
    assert "- **sst2**: minilm; 3 variants, seeds 0, 1, 2; scored on the dev split, 872 examples" in text
    assert "**These records come from more than one commit** (differing: git commit)" in text
    assert "| E1 | 7 | abc123 |" in text and "| E2 | 3 | def456 |" in text and "- torch: 2.13.0" in text
    leaderboard = text.split("## Leaderboard")[1].split("## GLUE")[0]
    assert "| 1 | full | 0.9200 | 0.0497 | 3 | 0.0005 | 23,000,000 | 100 | 100 | yes |" in leaderboard
    assert "| 2 | lora | 0.8600 | 0.1271 | 2 | 0.0005 | 300,000 | 93.5 | 1.304 | yes |" in leaderboard
    assert "![Score vs trainable parameters](figures/score_vs_params.png)" in text
    assert "![Cost relative to full fine-tuning](figures/cost_vs_full.png)" in text
    assert "**sst2** (dev accuracy): best is full at 0.9200 (n=3)." in text
    assert "Pareto front, by size: vera (0.8000, 10k params), lora (0.8600, 300k params), full (0.9200, 23M params)." in text
    assert "No parameter-efficient run reaches 99% of full's score." in text
    assert "**sst2**, relative to full fine-tuning: peak memory from 1.00x (lora) to 1.00x (lora)" in text
    assert "| sst2 | vera | default | 1 | DivergedError: loss is nan (step 37) |" in text
    assert "OutOfMemoryError: CUDA out of memory (step 0)" in text
    assert "Same in every run: lr=0.0005, max_steps=600, rank=8, target_modules=[\"query\", \"value\"]." in text
    assert "GLUE average" in text and "this study lacks cola, mrpc, qqp, stsb, mnli, qnli, rte" in text

    (results / "report.md").unlink()
    report.main([str(results), "--no-rebuild"])
    assert (results / "report.md").read_text() == text


def test_leaderboard_ranks_best_first_against_full_with_the_pareto_front(summary):
    board = aggregate.leaderboard(summary)
    assert list(board.columns) == aggregate.LEADERBOARD_COLUMNS
    sst2 = board[board["task"] == "sst2"].set_index("variant")
    assert list(sst2.index) == ["full", "lora", "vera"] and list(sst2["place"]) == [1, 2, 3]
    assert sst2.loc["lora", "pct_of_full_score"] == pytest.approx(100 * 0.86 / 0.92)
    assert sst2.loc["vera", "pct_of_full_params"] == pytest.approx(100 * VERA_PARAMS / FULL_PARAMS)
    assert sst2["pareto"].all()
    imdb = board[board["task"] == "imdb"]
    assert list(imdb["variant"]) == ["full", "lora"]  # vera has no successful run: not ranked


def test_the_leaderboard_marks_a_mean_under_the_studys_bar_with_its_measured_reason(summary):
    """SST-2 means: full 0.92, lora 0.86, vera 0.80; a bar of 0.85 with a reason for vera only,
    and none for imdb (no column there)."""
    bars = {"sst2": {"score": 0.85, "short": {"vera": "budget: 0.84 at twice the steps"}}}
    text = report.leaderboards(summary, bars=bars)
    sst2, imdb = text.split("### sst2")[1], text.split("### imdb")[1].split("### sst2")[0]
    rows = {line.split("|")[2].strip(): line for line in sst2.splitlines() if line.startswith("| ") and "variant" not in line}
    assert rows["vera"].rstrip().endswith("| under 0.85: budget: 0.84 at twice the steps |")
    assert rows["full"].rstrip().endswith("|  |") and rows["lora"].rstrip().endswith("|  |")
    assert "bar" in sst2.splitlines()[2] and "bar" not in imdb
    lower = report.bar_verdicts(pd.DataFrame({"primary_metric": ["perplexity"] * 2, "variant": ["lora", "full"],
                                              "setting": ["default"] * 2, "score_mean": [9.0, 11.0]}), {"score": 10})
    assert lower == ["", "over 10: no reason measured"]  # lower is better: a mean above the bar falls short
    assert report.leaderboards(summary) == report.leaderboards(summary, bars={})


def test_pareto_front_keeps_the_undominated_points_and_ties():
    points = pd.DataFrame({"trainable": [10, 20, 20, 30, 40, None], "score_mean": [0.5, 0.7, 0.7, 0.6, 0.9, 1.0]})
    assert aggregate.pareto_front(points).tolist() == [True, True, True, False, True, False]
    assert aggregate.pareto_front(points, lower_is_better=True).tolist() == [True, False, False, False, False, False]


def test_glue_average_needs_every_glue_task(tmp_path):
    scores = dict(zip(aggregate.GLUE_TASKS, [0.60, 0.94, 0.88, 0.90, 0.91, 0.87, 0.93, 0.80]))
    for task, score in scores.items():
        write_run(tmp_path, task, "lora", 0, score, trainable=LORA_PARAMS)
        if task != "rte":
            write_run(tmp_path, task, "vera", 0, score - 0.1, trainable=VERA_PARAMS)
    write_run(tmp_path, "wnli", "lora", 0, 0.1, trainable=LORA_PARAMS)  # not in the average
    summary = aggregate.summarize(aggregate.load_runs(tmp_path))
    glue = aggregate.glue_average(summary)
    assert glue[["variant", "setting"]].values.tolist() == [["lora", "default"]]  # vera lacks rte
    assert glue["glue_average"].iloc[0] == pytest.approx(100 * sum(scores.values()) / 8)
    assert glue["cola"].iloc[0] == pytest.approx(60.0)
    text = report.render(aggregate.tidy(aggregate.load_runs(tmp_path)), summary, figures=set())
    assert "| lora | 85.38 | 60 | 94 | 88 | 90 | 91 | 87 | 93 | 80 |" in text


def test_environments_get_ids_by_run_count_and_settings_sort_naturally(results):
    runs = aggregate.load_runs(results)
    assert runs.groupby("environment")["git_commit"].unique().map(list).to_dict() == {"E1": ["abc123"], "E2": ["def456"]}
    table = aggregate.environments(runs)
    assert table[["environment", "runs", "git commit"]].values.tolist() == [["E1", 7, "abc123"], ["E2", 3, "def456"]]
    summary = aggregate.summarize(runs)
    assert cell(summary, "imdb", "full", "environments") == "E2"
    assert aggregate.setting_order(["rank16", "rank4", "default", "base", "extract200", "extract10"]) == [
        "base", "default", "extract10", "extract200", "rank4", "rank16"]


def test_cost_vs_full_draws_one_bar_per_variant_against_full(summary, tmp_path):
    figure = plots.cost_vs_full(summary, tmp_path / "cost")
    assert (tmp_path / "cost.png").stat().st_size > 0 and (tmp_path / "cost.pdf").stat().st_size > 0
    imdb_memory, _, _, sst2_memory, sst2_activation, sst2_speed = figure.axes
    assert [ax.get_xlabel() for ax in (sst2_memory, sst2_activation, sst2_speed)] == [
        "peak memory / full's (x)", "activation memory / full's (x)", "training tokens/s / full's (x)"]
    assert sst2_memory.get_title() == "sst2" and [t.get_text() for t in sst2_memory.get_yticklabels()] == ["lora", "vera"]
    assert len(sst2_memory.containers) == 2 and len(imdb_memory.containers) == 1  # imdb's vera only failed
    assert [bar.get_width() for bar in sst2_memory.containers[0]] == [pytest.approx(1.0)]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["lora", "vera"]
    assert not sst2_activation.containers  # no activation memory recorded: nothing drawn


def write_extraction_run(results, interval, evaluations, library=None, val_curve=()):
    """A full run on sst2 whose record carries an extraction section with known numbers."""
    hparams = {"lr": 1e-4, "max_steps": 100}
    run = {"task": "sst2", "variant": "full", "setting": f"every{interval}", "model": "minilm", "seed": 0, "hparams": hparams,
           "config_hash": records.config_hash(hparams)}
    record = records.new_record(run, {"device": "cpu", "threads": 1})
    layers = {"bert.encoder.layer.0.attention.self.query.weight": {"rank": 4, "explained": 0.92, "norm": 2.0, "explained_at": {"1": 0.5, "4": 0.92}},
              "bert.encoder.layer.0.output.dense.weight": {"rank": 8, "explained": 0.9, "norm": 3.0, "explained_at": {"1": 0.3, "4": 0.7}}}
    extractions = [{"step": step, "triggers": ["periodic"], "seconds": 0.5, "flops": 10, "layers": layers} for step in range(interval, 101, interval)]
    record.update(status="ok", params={"trainable": FULL_PARAMS, "total": FULL_PARAMS}, train={"steps": 100, "wall_s": 60.0, "val_curve": list(val_curve)},
                  eval={"split": "dev", "n": 872, "metrics": {"accuracy": 0.9}, "primary": "accuracy", "primary_value": 0.9},
                  extraction={"config": {"interval": interval, "threshold": 0.9},
                              "snapshot": {"kind": "mmap", "copied_mb": 0.0, "mapped_mb": 86.0, "seconds": 0.1},
                              "extractions": extractions,
                              "overhead": {"seconds": 0.5 * len(extractions), "train_seconds": 50.0, "percent_time": len(extractions),
                                           "flops": 10 * len(extractions), "train_flops": 1e4, "percent_flops": 0.1 * len(extractions)},
                              "evaluations": evaluations, **({"library": library} if library else {})})
    records.write_atomic(records.record_path(results, "sst2", "full", f"every{interval}", 0), record)


def test_extraction_tables_and_figures_from_known_records(tmp_path):
    from analysis import extraction

    evaluations = [{"kind": "rank", "value": 4, "primary_value": 0.8, "trainable": 1000, "mean_rank": 4.0, "metrics": {}},
                   {"kind": "threshold", "value": 0.9, "primary_value": 0.81, "trainable": 2000, "mean_rank": 6.0, "metrics": {}}]
    write_extraction_run(tmp_path, 50, evaluations)
    write_extraction_run(tmp_path, 10, [])
    write_run(tmp_path, "sst2", "lora", 0, 0.85, trainable=2500)
    found = aggregate.write_extraction_tables(tmp_path)
    layers = found["extraction_layers"]
    assert len(layers) == 2 * (2 + 10) and set(layers["layer_type"]) == {"query", "MLP out"}
    assert layers.set_index(["setting", "step", "layer_type"]).loc[("every50", 100, "MLP out"), "rank"] == 8
    spectrum = found["extraction_spectrum"]
    assert spectrum[(spectrum["setting"] == "every50") & (spectrum["step"] == 50) & (spectrum["layer_type"] == "query")]["explained"].tolist() == [0.5, 0.92]
    overhead = extraction.overhead_summary(found["extraction_overhead"]).set_index("interval")
    assert overhead.loc[10, "extractions"] == 10 and overhead.loc[10, "% of training time"] == 10 and overhead.loc[50, "s per extraction"] == 0.5
    summary = aggregate.summarize(aggregate.tidy(aggregate.load_runs(tmp_path)))
    kept = extraction.retained(found["extraction_scores"], summary).iloc[0]
    assert kept["retained %"] == pytest.approx(90.0) and kept["LoRA score"] == 0.85 and kept["mean rank"] == 6.0

    rank_figure = plots.rank_vs_variance(found["extraction_spectrum"], found["extraction_layers"])
    left, right = rank_figure.axes[:2]
    assert left.get_xlabel() == "rank r (log scale)" and right.get_ylabel() == "rank chosen (mean over matrices)"
    assert len(left.get_lines()) >= 2  # one line per layer type
    kept_figure = plots.score_vs_rank(found["extraction_scores"], summary)
    labels = kept_figure.axes[0].get_legend_handles_labels()[1]
    assert {"extracted (rank r everywhere)", "LoRA trained at rank r", "full fine-tuning"} <= set(labels)
    cost_figure = plots.overhead_vs_interval(found["extraction_overhead"])
    assert [ax.get_ylabel() for ax in cost_figure.axes[:2]] == ["% of training time", "% of training FLOPs"]
    for name, figure in {"a": rank_figure, "b": kept_figure, "c": cost_figure}.items():
        assert all(path.stat().st_size > 0 for path in plots.save(figure, tmp_path / "figures" / name))


def rewrite(results, task, variant, seed, setting, hparams=None, train=None, selection=None):
    """Move a record written by ``write_run`` to ``setting``, with extra hyper-parameters,
    training measurements or a sweep's selection."""
    path = records.record_path(results, task, variant, "default", seed)
    record = records.read(path)
    record["run"]["setting"] = setting
    record["run"]["hparams"].update(hparams or {})
    record["train"].update(train or {})
    if selection is not None:
        record["run"]["selection"] = selection
    path.unlink()
    records.write_atomic(records.record_path(results, task, variant, setting, seed), record)


def test_report_shows_the_learning_rate_each_variant_got_and_what_checkpointing_costs(tmp_path):
    grid = [{"lr": 1e-4, "mean": 0.80, "values": [0.80], "seeds": [0], "failed": 0},
            {"lr": 1e-3, "mean": 0.86, "values": [0.86], "seeds": [0], "failed": 0},
            {"lr": 1e-2, "mean": None, "values": [], "seeds": [0], "failed": 1}]
    selection = {"task": "sst2", "variant": "lora", "hparam": "lr", "grid": [1e-4, 1e-3, 1e-2], "metric": "accuracy",
                 "split": "validation", "lower_is_better": False, "scores": grid, "chosen": 1e-3, "hparams": {"lr": 1e-3}}
    for seed in (0, 1):
        write_run(tmp_path, "sst2", "lora", seed, 0.85, trainable=LORA_PARAMS)
        rewrite(tmp_path, "sst2", "lora", seed, "default", train={"activation_mb": 100.0}, selection=selection)
    write_run(tmp_path, "sst2", "full", 0, 0.90, trainable=FULL_PARAMS, peak_mb=800.0)
    rewrite(tmp_path, "sst2", "full", 0, "gradckpt", hparams={"gradient_checkpointing": True},
            train={"activation_mb": 50.0, "tokens_per_s": 1200.0})
    write_run(tmp_path, "sst2", "full", 0, 0.90, trainable=FULL_PARAMS, peak_mb=1000.0)  # written to "default"
    rewrite(tmp_path, "sst2", "full", 0, "default", train={"activation_mb": 200.0})

    long = aggregate.tidy(aggregate.load_runs(tmp_path))
    chosen = aggregate.lr_selections(long)
    assert list(chosen.columns) == aggregate.LR_SELECTION_COLUMNS
    assert chosen[["lr", "chosen", "failed"]].values.tolist() == [[1e-4, False, 0], [1e-3, True, 0], [1e-2, False, 1]]
    assert math.isnan(chosen["mean"].iloc[2])
    text = report.render(long, aggregate.summarize(long), figures=set())
    rates = text[text.index("## Learning rates") :]
    assert "| lora | 0.001 | 0.0001, 0.001, 0.01 | 1 | 0.8000 at 0.0001; **0.8600 at 0.001**; failed at 0.01 |" in rates
    assert "At the edge" not in rates
    checkpointing = text[text.index("## Gradient checkpointing") : text.index("## Learning rates")]
    assert "| sst2 | full [gradckpt] | 200 -> 50 (0.25x) | 1000 -> 800 (0.80x) | 1500 -> 1200 (0.80x) | 0.9000 -> 0.9000 |" in checkpointing


def test_a_run_that_timed_no_step_shows_tokens_per_s_as_not_measured(tmp_path):
    """tokens/s is null in a record whose run timed no step (0 in records written before that): tables and
    the report say "n/m", ratios skip it, and the cost figure writes "not measured" where a bar would be."""
    untimed = {"tokens_per_s": None, "samples_per_s": None, "timed_steps": 0}
    write_run(tmp_path, "sst2", "full", 0, 0.90, trainable=FULL_PARAMS)
    rewrite(tmp_path, "sst2", "full", 0, "gradckpt", hparams={"gradient_checkpointing": True}, train={**untimed, "activation_mb": 50.0})
    write_run(tmp_path, "sst2", "full", 0, 0.90, trainable=FULL_PARAMS)
    rewrite(tmp_path, "sst2", "full", 0, "default", train={"activation_mb": 200.0})
    write_run(tmp_path, "sst2", "lora", 0, 0.85, trainable=LORA_PARAMS)
    rewrite(tmp_path, "sst2", "lora", 0, "default", train=untimed)
    write_run(tmp_path, "sst2", "vera", 0, 0.80, trainable=VERA_PARAMS)
    rewrite(tmp_path, "sst2", "vera", 0, "default", train={"tokens_per_s": 0.0, "samples_per_s": 0.0, "timed_steps": 0})

    long, summary = aggregate.write_tables(tmp_path)
    by_setting = summary.set_index(["variant", "setting"])
    assert by_setting.loc[("full", "default"), "tokens_per_s"] == 1500.0 and math.isnan(by_setting.loc[("full", "gradckpt"), "tokens_per_s"])
    assert math.isnan(by_setting.loc[("lora", "default"), "tokens_per_s"]) and math.isnan(by_setting.loc[("vera", "default"), "samples_per_s"])
    markdown = (tmp_path / "tables" / "summary.md").read_text()
    lines = {tuple(line.split(" | ")[1:3]): line for line in markdown.splitlines() if line.startswith("| sst2 | ")}
    assert lines["lora", "default"].endswith("| n/m | n/m | 180 | cpu_rss | 8 | 0.0005 | E1 |") and "| n/m |" in lines["vera", "default"]
    assert "| 1,500 | 110 | 180 |" in lines["full", "default"] and aggregate.NOT_MEASURED_NOTE in markdown

    text = report.render(long, summary, figures=set())
    results = text[text.index("### sst2 (dev accuracy)") :]
    assert "| lora | 0.8500 (1) | 0.84 | 300,000 | 4 | 1,000 |  | n/m | 180 |" in results
    assert f"_tokens/s {aggregate.NOT_MEASURED_NOTE}_" in results
    assert "tokens/s not measured for lora, vera (no training step was timed), so not compared" in text
    checkpointing = text[text.index("## Gradient checkpointing") :]
    assert "| sst2 | full [gradckpt] | 200 -> 50 (0.25x) | 1000 -> 1000 (1.00x) | 1500 -> n/m | 0.9000 -> 0.9000 |" in checkpointing

    memory, _, speed = plots.cost_vs_full(summary).axes
    assert len(memory.containers) == 2 and not speed.containers  # no bar of 0 for vera's old record
    assert [label.get_text() for label in speed.texts] == [" not measured", " not measured"]


def test_analysis_modules_import_one_way():
    """records -> tables (aggregate, extraction, significance) -> figures (plots) -> report: no module
    imports one that imports it back, at the top or inside a function."""
    import ast
    from pathlib import Path

    folder = Path(aggregate.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "analysis":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("analysis."):
                found.add(node.module.split(".")[1])
        imports[path.stem] = found

    def reaches(start, goal, seen=()):
        return any(step == goal or (step not in seen and reaches(step, goal, (*seen, step))) for step in imports.get(start, ()))

    assert not [name for name in imports if reaches(name, name)], imports
    assert imports["extraction"] == set() and imports["significance"] == set()


def test_a_cost_range_over_one_variant_is_one_value():
    def row(variant, memory, activation, speed):
        return {"task": "sst2", "variant": variant, "setting": "default", "score_mean": 0.8, "peak_memory_mb": memory,
                "activation_mb": activation, "tokens_per_s": speed, "n_seeds": 1, "peak_memory_kind": "cuda_max_allocated"}

    one = pd.DataFrame([row("full", 100.0, 50.0, 1000.0), row("lora", 60.0, 40.0, 1500.0)])
    text = report.cost_findings(one)
    assert "training tokens/s 1.50x (lora)" in text and "from" not in text
    two = pd.concat([one, pd.DataFrame([row("dora", 80.0, 45.0, 900.0)])], ignore_index=True)
    assert "training tokens/s from 0.90x (dora) to 1.50x (lora)" in report.cost_findings(two)


def test_the_library_tables_figure_and_report_from_known_records(tmp_path):
    """Library entries become curves beside the full model's validation, and the best and last
    adapters a row per run and a sentence per task with their numbers."""
    from analysis import extraction, report

    ranks = {"a.weight": 4, "b.weight": 8}
    entries = [{"step": 50, "ranks": ranks, "scores": {"threshold": 0.86, "rank8": 0.84}},
               {"step": 100, "ranks": {"a.weight": 8, "b.weight": 8}, "scores": {"threshold": 0.83, "rank8": 0.83}}]
    library = {"entries": entries, "best": {"step": 50, "validation": 0.86, "primary_value": 0.82, "mean_rank": 6.0}, "bytes": 3 * 2**20}
    evaluations = [{"kind": "threshold", "value": 0.9, "primary_value": 0.80, "trainable": 2000, "mean_rank": 8.0, "metrics": {}}]
    write_extraction_run(tmp_path, 50, evaluations, library=library, val_curve=[[50, 0.88], [100, 0.87]])
    write_run(tmp_path, "sst2", "lora", 0, 0.85, trainable=2500)
    found = aggregate.write_extraction_tables(tmp_path)
    curves = found["extraction_library"].set_index(["step", "curve"])
    assert curves.loc[(50, "full"), "validation"] == 0.88 and curves.loc[(50, "threshold"), "mean_rank"] == 6.0
    assert curves.loc[(100, "rank8"), "validation"] == 0.83 and len(curves) == 6
    summary = aggregate.summarize(aggregate.tidy(aggregate.load_runs(tmp_path)))
    choice = extraction.library_choices(found["extraction_library_choice"], summary).iloc[0]
    assert (choice["full"], choice["last adapter"], choice["best adapter"], choice["best from steps"], choice["LoRA"]) == (0.9, 0.80, 0.82, "50", 0.85)
    assert choice["library MB"] == 3.0
    figure = plots.library_curve(found["extraction_library"])
    assert {"full fine-tune", "extracted, EV threshold", "extracted, rank8"} <= set(figure.axes[0].get_legend_handles_labels()[1])
    text = report.build_report(tmp_path).read_text()
    assert ("**sst2**: the last adapter scores 0.8000 (mean rank 8.0), the best by validation 0.8200 (from steps 50), "
            "full fine-tuning 0.9000, LoRA 0.8500.") in text
