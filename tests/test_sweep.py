"""Learning-rate sweeps: the grid expanded into validation-only runs, the selection, and the
final runs at the chosen rate."""

import json
import math
from pathlib import Path

import pytest
import yaml

from lorabench import records, run, study, sweep
from lorabench.run import ConfigError
from tests.helpers import tiny_sst2

ROOT = Path(__file__).resolve().parent.parent


def sweep_record(lr, seed, value=None, metric="accuracy", split="validation", variant="lora"):
    """A sweep run's record: ``value=None`` makes it a failed run."""
    hparams = {"lr": lr}
    record = records.new_record({"task": "sst2", "variant": variant, "setting": f"default.lr{lr:g}", "model": "minilm", "seed": seed,
                                 "hparams": hparams, "config_hash": records.config_hash(hparams)}, {})
    if value is None:
        return {**record, "status": "failed", "error": {"type": "DivergedError", "message": "loss is nan", "step": 3}}
    return {**record, "status": "ok", "params": {}, "train": {},
            "eval": {"split": split, "n": 64, "metrics": {metric: value}, "primary": metric, "primary_value": value}}


def sources(found):
    return [f"r{i}.json" for i in range(len(found))]


def test_the_best_mean_over_seeds_is_chosen():
    found = [sweep_record(1e-4, 0, 0.80), sweep_record(1e-4, 1, 0.90), sweep_record(1e-3, 0, 0.86), sweep_record(1e-3, 1, 0.86),
             sweep_record(1e-2, 0, 0.50), sweep_record(1e-2, 1, 0.52)]
    selection = sweep.select(found, sources(found))
    assert selection["grid"] == [1e-4, 1e-3, 1e-2] and selection["metric"] == "accuracy" and not selection["lower_is_better"]
    assert [entry["mean"] for entry in selection["scores"]] == pytest.approx([0.85, 0.86, 0.51])
    assert selection["chosen"] == 1e-3 and selection["hparams"] == {"lr": 1e-3}
    assert [entry["seeds"] for entry in selection["scores"]] == [[0, 1]] * 3


def test_smaller_is_better_for_perplexity_and_ties_go_to_the_smaller_rate():
    found = [sweep_record(2e-4, 0, 5.0, "perplexity"), sweep_record(1e-4, 0, 4.0, "perplexity"), sweep_record(5e-4, 0, 4.0, "perplexity")]
    selection = sweep.select(found, sources(found))
    assert selection["lower_is_better"] and selection["chosen"] == 1e-4


def test_a_rate_with_a_failed_run_is_not_chosen_and_all_failing_is_an_error():
    found = [sweep_record(1e-3, 0, 0.9), sweep_record(1e-3, 1, None), sweep_record(1e-4, 0, 0.7), sweep_record(1e-4, 1, 0.7)]
    selection = sweep.select(found, sources(found))
    assert selection["chosen"] == 1e-4
    assert selection["scores"][1] == {"lr": 1e-3, "mean": None, "values": [0.9], "seeds": [0, 1], "failed": 1}
    with pytest.raises(sweep.SelectionError, match="every sweep run failed.*widen the grid"):
        sweep.select([sweep_record(1e-3, 0, None)], ["a.json"])


def test_records_scored_on_the_reported_split_are_refused():
    found = [sweep_record(1e-3, 0, 0.9, split="dev"), sweep_record(1e-4, 0, 0.8)]
    with pytest.raises(sweep.SelectionError, match="r0.json: scored on the 'dev' split.*score_split=val"):
        sweep.select(found, sources(found))


def test_the_command_writes_the_selection_and_bad_files_are_named(tmp_path, capsys):
    paths = []
    for lr, value in ((1e-4, 0.7), (1e-3, 0.8)):
        paths.append(str(records.write_atomic(tmp_path / f"lr{lr:g}.json", sweep_record(lr, 0, value))))
    assert sweep.main(["--out", str(tmp_path / "selected.json"), *paths]) == 0
    assert sweep.read_selection(tmp_path / "selected.json")["chosen"] == 1e-3
    assert "lr 0.001" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text('{"hparams": {}}')
    with pytest.raises(sweep.SelectionError, match="broken.json: field 'hparams' is missing or empty"):
        sweep.read_selection(tmp_path / "broken.json")
    with pytest.raises(sweep.SelectionError, match="no such selection file"):
        sweep.read_selection(tmp_path / "absent.json")


def smoke_config():
    return yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())


def test_a_sweep_expands_into_validation_runs_and_final_runs_that_wait_for_it():
    config = smoke_config()
    config["seeds"] = [0, 1]
    config["lr_sweep"] = {"grids": {"all": [1e-4, 1e-3], "full": [1e-5, 3e-5, 1e-4]}, "tasks": ["sst2"]}
    sweeps = {item.key: item for item in study.expand_sweeps(config)}
    assert set(sweeps) == {("sst2", "full", "default"), ("sst2", "lora", "default")}
    full = sweeps[("sst2", "full", "default")]
    assert [(r.setting, r.seed, r.folder) for r in full.runs] == [("default.lr1e-05", 0, "sweeps"), ("default.lr3e-05", 0, "sweeps"),
                                                                  ("default.lr0.0001", 0, "sweeps")]
    overrides = dict(full.runs[0].overrides)
    assert overrides["lr"] == 1e-5 and overrides["score_split"] == "val" and overrides["extract"] is None
    assert full.records("res")[0] == "res/sweeps/sst2/full/default.lr1e-05/seed0.json"
    finals = {run.key: run for run in study.expand(config)}
    swept = finals[("runs", "sst2", "lora", "default", 1)]
    assert swept.inputs("res") == {"selection": "res/sweeps/sst2/lora/default/selected.json"}
    assert finals[("runs", "sst2", "lora", "base", 0)].inputs("res") == {} and finals[("runs", "e2e", "lora", "default", 0)].selection is None


@pytest.mark.parametrize(
    "change, message",
    [({"grids": {"all": [1e-4, 1e-3]}, "settings": ["noval"]}, "val_size=0.*set val_size in the study's hparams"),
     ({"grids": {"lroa": [1e-4, 1e-3]}}, r"'lr_sweep.grids': unknown variants \['lroa'\]"),
     ({"grids": {"full": [1e-5, 1e-4]}}, "no grid for variant 'lora'"),
     ({"grids": {"all": [1e-4, 1e-3]}, "settings": ["base"]}, "trains no step"),
     ({"grids": {"all": [1e-4, 1e-3]}, "settings": ["defualt"]}, r"unknown settings \['defualt'\]"),
     ({"grids": {"all": [1e-4, -1.0]}}, "lr=-1.0 must be > 0")],
)
def test_a_bad_sweep_fails_before_any_job(change, message):
    config = {**smoke_config(), "lr_sweep": change}
    config["settings"]["noval"] = {"hparams": {"val_size": 0, "eval_every": 0}}
    with pytest.raises(ConfigError, match=message):
        study.expand_sweeps(config)


def test_a_run_scores_validation_only_and_takes_a_selection(tmp_path):
    data = str(tiny_sst2(tmp_path / "data"))
    small = {"max_steps": 2, "batch_size": 4, "val_size": 8, "threads": 1, "save_adapter": False, "data_dir": data}
    scored = run.execute("sst2", "lora", 0, "default.lr0.001", {**small, "score_split": "val", "lr": 1e-3}, tmp_path / "s.json")
    assert scored["eval"]["split"] == "validation" and scored["eval"]["n"] == 8 and scored["eval"]["primary"] == "accuracy"
    selection = {"hparams": {"lr": 2e-4}, "grid": [2e-4, 1e-3], "chosen": 2e-4}
    final = run.execute("sst2", "lora", 0, "default", {**small, "lr": 1e-3}, tmp_path / "f.json", selection)
    assert final["run"]["hparams"]["lr"] == 2e-4 and final["run"]["selection"] == selection
    assert final["eval"]["split"] == "dev" and not math.isnan(final["eval"]["primary_value"])
    assert json.loads((tmp_path / "f.json").read_text())["run"]["selection"]["chosen"] == 2e-4
    with pytest.raises(ConfigError, match="val_size=0 carves none"):
        run.resolve_hparams("sst2", "lora", {"score_split": "val"})


def test_a_score_that_is_not_a_number_counts_as_failed():
    found = [sweep_record(1e-4, 0, float("nan"), "pearson"), sweep_record(1e-3, 0, 0.3, "pearson")]
    selection = sweep.select(found, sources(found))
    assert selection["chosen"] == 1e-3 and selection["scores"][0]["failed"] == 1 and selection["scores"][0]["mean"] is None


@pytest.mark.parametrize(
    "change, message",
    [({"grids": {"all": [1e-4, 1e-3]}, "tasks": ["imdb"]}, "sweeps no run"),
     ({"grids": {"all": [1e-4, 1.0000001e-4]}}, "not distinct"),
     ({"grids": {"all": [1e-4, 1e-3]}, "hparams": {"train_size": 10}}, r"sets \['train_size'\].*study's hparams"),
     ({"grids": {"all": [1e-4, 1e-3]}, "hparams": {"max_steps": 2}, "settings": ["epochs"]}, "sets max_steps, but epochs=1")],
)
def test_a_sweep_that_would_mislead_is_refused(change, message):
    config = {**smoke_config(), "lr_sweep": change}
    config["settings"]["epochs"] = {"hparams": {"epochs": 1}}
    with pytest.raises(ConfigError, match=message):
        study.expand_sweeps(config)
