"""Tuned learning rates: the tuning study at the default study's budgets, the rates file written
from its sweeps (and written again the same), and the default study training at those rates."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from lorabench import rates, records, run, study, sweep
from tests.test_sweep import sweep_record

ROOT = Path(__file__).resolve().parent.parent
LR_FREE = ("lr", "score_split", "save_adapter", "extract", "forgetting_tokens")  # what a sweep run sets apart from its final run
# How often a run validates changes none of its steps (evaluation draws no random number and
# updates nothing): the default study's full runs validate more often, beside their extractions.
VALIDATION_ONLY = ("eval_every",)


def config(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


def test_the_tuning_study_sweeps_every_default_run_at_its_budget_and_data():
    """Every task x variant of the default study (and of each setting the tuning study sweeps) is swept on a grid of at least 4 log-spaced
    rates that brackets the rate the default study configures; each sweep run trains on the
    examples, and at the budget, of the default run it tunes (everything but lr and what a
    sweep run leaves out)."""
    default, tune = config("config"), config("tune")
    assert set(tune["tasks"]) == set(default["tasks"]) and tune["variants"] == default["variants"] == "all"
    swept_settings = tune["lr_sweep"].get("settings", ["default"])
    finals = {(run_.task, run_.variant, run_.setting): dict(run_.overrides) for run_ in study.expand({**default, "rates": None})
              if run_.setting in swept_settings}
    sweeps = study.expand_sweeps(tune)
    assert {s.key for s in sweeps} == set(finals)
    for swept in sweeps:
        final = run.resolve_hparams(swept.task, swept.variant, finals[swept.key])
        grid = sorted(dict(r.overrides)["lr"] for r in swept.runs)
        ratios = [high / low for low, high in zip(grid, grid[1:])]
        assert len(grid) >= 4 and max(ratios) == pytest.approx(min(ratios), rel=0.05), (swept.key, grid)
        assert grid[0] < final["lr"] < grid[-1], (swept.key, final["lr"], grid)
        for sweep_run in swept.runs:
            tuned = run.resolve_hparams(swept.task, swept.variant, dict(sweep_run.overrides))
            differ = {key for key in final if final[key] != tuned[key]} - set(LR_FREE) - set(VALIDATION_ONLY) - {"data_dir"}
            assert not differ, (swept.key, {key: (final[key], tuned[key]) for key in differ})


def small_tuning(tmp_path: Path, rank_setting: bool = False) -> tuple[dict, Path]:
    """A two-variant tuning study's config and results: sweep records and their selections,
    written as the DAG writes them. LoRA's best rate is inside its grid, LoRA-FA's at its top;
    with ``rank_setting``, LoRA at rank 64 is swept too, on its own grid, and prefers 3e-5."""
    tune = {"results": str(tmp_path / "tune"), "tasks": ["sst2"], "variants": ["lora", "lora_fa"], "seeds": [0],
            "settings": {"default": {}}, "hparams": {"task": {"sst2": {"max_steps": 20, "val_size": 50}}},
            "lr_sweep": {"grids": {"all": [1e-4, 1e-3, 1e-2]}}}
    scores = {"lora": {1e-4: 0.70, 1e-3: 0.86, 1e-2: 0.51}, "lora_fa": {1e-4: 0.60, 1e-3: 0.70, 1e-2: 0.80},
              "rank64": {1e-5: 0.75, 3e-5: 0.85, 1e-4: 0.80}}
    if rank_setting:
        tune["settings"]["rank64"] = {"variants": ["lora"], "hparams": {"rank": 64, "alpha": 128}}
        tune["lr_sweep"].update(settings=["default", "rank64"], grids={"all": [1e-4, 1e-3, 1e-2], "rank64": [1e-5, 3e-5, 1e-4]})
    for swept in study.expand_sweeps(tune):
        paths = []
        for sweep_run, path in zip(swept.runs, swept.records(tune["results"])):
            lr = dict(sweep_run.overrides)["lr"]
            record = sweep_record(lr, 0, scores[swept.variant if swept.setting == "default" else swept.setting][lr], variant=swept.variant)
            record["run"]["hparams"] = run.resolve_hparams("sst2", swept.variant, dict(sweep_run.overrides))
            record["meta"] = {"git_commit": "abc1234", "git_dirty": False}
            paths.append(str(records.write_atomic(path, record)))
        assert sweep.main(["--out", f"{tune['results']}/{swept.selection}", *paths]) == 0
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    return tune, tmp_path / "tune.yaml"


def test_the_rates_file_is_written_from_the_sweeps_and_written_again_the_same(tmp_path, capsys):
    tune, tune_path = small_tuning(tmp_path)
    out = tmp_path / "rates.yaml"
    assert rates.main([tune["results"], "--config", str(tune_path), "--out", str(out)]) == 0
    assert "at the edge of the grid: lora_fa (high)" in capsys.readouterr().out
    written = out.read_text()
    found = rates.read(out)["default"]
    lora, lora_fa = found["sst2"]["lora"], found["sst2"]["lora_fa"]
    assert lora["lr"] == 1e-3 and lora["at_edge"] is None and lora_fa["lr"] == 1e-2 and lora_fa["at_edge"] == "high"
    assert [entry["mean"] for entry in lora["scores"]] == [0.70, 0.86, 0.51] and lora["grid"] == [1e-4, 1e-3, 1e-2]
    assert lora["budget"]["max_steps"] == 20 and lora["budget"]["val_size"] == 50 and lora["commits"] == ["abc1234"]
    assert lora["metric"] == "accuracy" and lora["split"] == sweep.VALIDATION_SPLIT
    out.unlink()
    assert rates.main([tune["results"], "--config", str(tune_path), "--out", str(out)]) == 0
    assert out.read_text() == written


def test_the_default_study_trains_each_run_at_its_tuned_rate_unless_a_later_layer_sets_one(tmp_path):
    tune, tune_path = small_tuning(tmp_path)
    assert rates.main([tune["results"], "--config", str(tune_path), "--out", str(tmp_path / "rates.yaml")]) == 0
    study_config = copy.deepcopy(config("smoke"))
    study_config["variants"] = ["full", "lora", "lora_fa"]
    study_config.pop("lr_sweep")  # a swept setting takes its sweep's rate, not the file's
    study_config["rates"] = str(tmp_path / "rates.yaml")
    study_config["settings"]["ownlr"] = {"tasks": ["sst2"], "variants": ["lora"], "hparams": {"lr": 5e-4}}
    tuned = rates.read(tmp_path / "rates.yaml")["default"]["sst2"]
    runs = study.expand(study_config)
    for found in runs:
        lr = dict(found.overrides).get("lr")
        if found.task == "sst2" and found.variant in tuned and found.setting != "ownlr":
            assert lr == tuned[found.variant]["lr"] and found.rates == study_config["rates"], found
            assert found.cli_rates() == f"--rates {study_config['rates']}"
        else:
            assert found.rates is None and found.cli_rates() == "", found
    assert any(found.setting == "ownlr" and dict(found.overrides)["lr"] == 5e-4 for found in runs)


def test_a_setting_swept_on_its_own_grid_trains_at_its_own_rate_and_the_others_at_the_default(tmp_path, capsys):
    """LoRA at rank 64 is tuned on its own grid (lr_sweep.grids names the setting); the file keeps
    it under settings; the study's rank64 runs (and run --rates --setting rank64) take it, while
    a setting that was not swept (rank4) trains at the default setting's rate."""
    tune, tune_path = small_tuning(tmp_path, rank_setting=True)
    grids = {swept.key: sorted(dict(r.overrides)["lr"] for r in swept.runs) for swept in study.expand_sweeps(tune)}
    assert grids[("sst2", "lora", "rank64")] == [1e-5, 3e-5, 1e-4] and grids[("sst2", "lora", "default")] == [1e-4, 1e-3, 1e-2]
    out = tmp_path / "rates.yaml"
    assert rates.main([tune["results"], "--config", str(tune_path), "--out", str(out)]) == 0
    assert "sst2 (rank64): 1 rates" in capsys.readouterr().out
    document = yaml.safe_load(out.read_text())
    assert document["settings"]["rank64"]["sst2"]["lora"]["lr"] == 3e-5 and document["rates"]["sst2"]["lora"]["lr"] == 1e-3
    study_config = copy.deepcopy(config("smoke"))
    study_config.pop("lr_sweep")
    study_config.update(variants=["lora"], rates=str(out))
    study_config["settings"].update(rank64={"tasks": ["sst2"], "hparams": {"rank": 64, "alpha": 128}},
                                    rank4={"tasks": ["sst2"], "hparams": {"rank": 4, "alpha": 8}})
    lrs = {found.setting: dict(found.overrides)["lr"] for found in study.expand(study_config) if found.task == "sst2"}
    assert lrs["rank64"] == 3e-5 and lrs["rank4"] == lrs["default"] == 1e-3
    assert rates.selection_for(out, "sst2", "lora", "rank64")["hparams"] == {"lr": 3e-5}
    assert rates.selection_for(out, "sst2", "lora", "rank4")["hparams"] == {"lr": 1e-3}


def test_a_run_at_its_tuned_rate_keeps_the_grid_and_the_edge_in_its_record(tmp_path):
    tune, tune_path = small_tuning(tmp_path)
    assert rates.main([tune["results"], "--config", str(tune_path), "--out", str(tmp_path / "rates.yaml")]) == 0
    selection = rates.selection_for(tmp_path / "rates.yaml", "sst2", "lora_fa")
    assert selection["hparams"] == {"lr": 1e-2} and selection["at_edge"] == "high" and selection["source"] == str(tmp_path / "rates.yaml")
    with pytest.raises(rates.RatesError, match="no tuned rate for sst2/dora; run its sweep"):
        rates.selection_for(tmp_path / "rates.yaml", "sst2", "dora")
    (tmp_path / "bad.yaml").write_text("format: other\n")
    with pytest.raises(rates.RatesError, match="bad.yaml: field 'format'"):
        rates.read(tmp_path / "bad.yaml")


def test_the_report_shows_a_tuned_rate_at_the_edge_of_its_grid(tmp_path):
    from analysis import aggregate, report
    from tests.test_analysis import LORA_PARAMS, rewrite, write_run

    tune, tune_path = small_tuning(tmp_path)
    assert rates.main([tune["results"], "--config", str(tune_path), "--out", str(tmp_path / "rates.yaml")]) == 0
    results = tmp_path / "results"
    for variant in ("lora", "lora_fa"):
        write_run(results, "sst2", variant, 0, 0.85, trainable=LORA_PARAMS)
        rewrite(results, "sst2", variant, 0, "default", selection=rates.selection_for(tmp_path / "rates.yaml", "sst2", variant))
    long = aggregate.tidy(aggregate.load_runs(results))
    text = report.render(long, aggregate.summarize(long), figures=set())
    learning = text[text.index("## Learning rates") :]
    assert "At the edge of its grid (the best rate may lie outside it; widen the grid): sst2/lora_fa (0.01)." in learning
    assert "sst2/lora " not in learning.split("At the edge")[1]


def test_a_variant_without_a_grid_of_its_own_gets_factors_of_its_configured_rate():
    """`all: {factors: [1/3, 1, 3, 9]}` gives a new variant the grid the others were given by hand."""
    tune = config("tune")
    explicit = {name: grid for name, grid in tune["lr_sweep"]["grids"].items() if name != "all"}
    tune["lr_sweep"].pop("settings", None)  # the default setting's grids; a setting's own grid is its own choice
    by_hand = {(s.task, s.variant): sorted(dict(r.overrides)["lr"] for r in s.runs) for s in study.expand_sweeps(tune)}
    tune["lr_sweep"]["grids"] = {"all": tune["lr_sweep"]["grids"]["all"]}
    for variant, layer in config("config")["hparams"]["variant"].items():  # centred on the default study's rates, as the hand grids
        tune["hparams"]["variant"].setdefault(variant, {})["lr"] = layer["lr"]
    by_factors = {(s.task, s.variant): sorted(dict(r.overrides)["lr"] for r in s.runs) for s in study.expand_sweeps(tune)}
    assert set(by_factors) == set(by_hand)
    for key, grid in by_factors.items():
        # The hand grids add rates beyond p/3 and 9p where a best rate was at an end; a variant
        # without one (a new file) has the factor grid in both.
        if key[1] in explicit:
            extra = sorted(set(by_hand[key]) - set(grid))
            assert set(grid) <= set(by_hand[key]) and all(lr < grid[0] or lr > grid[-1] for lr in extra), key
        else:
            assert grid == by_hand[key], key
