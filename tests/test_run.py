"""One run = one process = one record: config checks, failures, atomic records, determinism."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorabench import records, run
from lorabench.run import ConfigError, parse_sets, resolve_hparams

from tests.helpers import tiny_sst2

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_resolve_and_layer():
    hparams = resolve_hparams("sst2", "lora", {"rank": 4, "lr": 2e-3})
    assert (hparams["rank"], hparams["lr"], hparams["model"], hparams["targets"]) == (4, 2e-3, "minilm", "all-linear")


@pytest.mark.parametrize(
    "overrides, message",
    [({"rnak": 4}, r"unknown hyper-parameter\(s\) \['rnak'\].*known: .*rank"),
     ({"lr": -1.0}, "lr=-1.0 must be > 0"),
     ({"rank": 0}, "rank must be a positive integer"),
     ({"rank": 2.5}, "rank=2.5 must be an integer"),
     ({"save_adapter": "yes"}, "must be true or false"),
     ({"warmup_ratio": 1.5}, r"warmup_ratio=1.5 must be in \[0, 1\)"),
     ({"targets": "some"}, "targets='some'"),
     ({"lr": float("nan")}, "finite")],
)
def test_bad_hyper_parameters_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_hparams("sst2", "lora", overrides)


def test_full_has_no_rank():
    with pytest.raises(ConfigError, match="unknown hyper-parameter"):
        resolve_hparams("sst2", "full", {"rank": 8})


def test_set_values_parse_like_yaml():
    assert parse_sets(["lr=1e-3", "rank=8", "save_adapter=false", "targets=[query, value]", "model=minilm"]) == {
        "lr": 1e-3, "rank": 8, "save_adapter": False, "targets": ["query", "value"], "model": "minilm"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_sets(["lr"])


def test_records_are_atomic_and_validated(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match="status"):
        records.write_atomic(path, {**records.new_record(minimal_run(), {}), "status": "running"})
    assert not path.exists() and not list(tmp_path.iterdir())
    failed = {**records.new_record(minimal_run(), {}), "status": "failed", "error": {"type": "X", "message": "m", "step": 1}}
    records.write_atomic(path, failed)
    assert records.read(path)["status"] == "failed"
    path.write_text('{"schema_version": 1, "status": "ok"')
    with pytest.raises(ValueError, match="not valid JSON.*rerun"):
        records.read(path)


def minimal_run():
    return {"task": "t", "variant": "v", "setting": "s", "model": "m", "seed": 0, "hparams": {}, "config_hash": "x"}


def tiny_data(tmp_path):
    return tiny_sst2(tmp_path / "data")


SMALL = {"max_steps": 4, "batch_size": 8, "timing_warmup_steps": 1, "log_every": 1, "threads": 1}


def test_run_writes_record_and_adapter(tmp_path):
    out = tmp_path / "seed0.json"
    record = run.execute("sst2", "lora", 0, "default", {**SMALL, "data_dir": str(tiny_data(tmp_path))}, out)
    stored = records.read(out)
    assert stored == json.loads(json.dumps(record))
    assert stored["status"] == "ok" and stored["eval"]["primary"] == "accuracy" and stored["eval"]["n"] == 8
    examples = stored["eval"]["examples"]  # what analysis.significance bootstraps: the accuracy to the example
    assert len(examples["prediction"]) == len(examples["label"]) == 8
    assert sum(p == y for p, y in zip(examples["prediction"], examples["label"])) / 8 == stored["eval"]["primary_value"]
    assert stored["params"]["adapter_bytes"] == Path(stored["params"]["adapter_path"]).stat().st_size
    assert 0 < stored["params"]["trainable"] < stored["params"]["total"]
    assert stored["train"]["timed_steps"] == 3 and stored["train"]["tokens_per_s"] > 0
    assert stored["meta"]["packages"]["torch"] and {"git_commit", "git_dirty", "device", "threads"} <= set(stored["meta"])


def test_same_seed_same_metrics(tmp_path):
    data = str(tiny_data(tmp_path))
    first = run.execute("sst2", "lora", 3, "default", {**SMALL, "data_dir": data, "save_adapter": False}, tmp_path / "a.json")
    second = run.execute("sst2", "lora", 3, "default", {**SMALL, "data_dir": data, "save_adapter": False}, tmp_path / "b.json")
    assert first["eval"]["metrics"] == second["eval"]["metrics"]
    assert first["train"]["loss_curve"] == second["train"]["loss_curve"]


def test_diverging_run_writes_failed_record(tmp_path):
    out = tmp_path / "seed0.json"
    record = run.execute("sst2", "full", 0, "default", {**SMALL, "lr": 1e30, "data_dir": str(tiny_data(tmp_path))}, out)
    assert record["status"] == "failed" and record["error"]["type"] == "DivergedError"
    assert "lower lr" in records.read(out)["error"]["message"]


def test_cli_input_errors_exit_2_without_record(tmp_path):
    env = {**os.environ, "LORABENCH_DATA": str(tiny_data(tmp_path))}
    for args, message in ((["--variant", "nope"], "known variants: "),
                          (["--variant", "lora", "--set", "rank=1000"], "rank=1000 is larger than layer"),
                          (["--variant", "lora", "--set", "lr=-1"], "lr=-1.0 must be > 0"),
                          (["--variant", "lora", "--set", "lr=-1", "--set", "max_steps=0"], "lr=-1.0 must be > 0")):  # --set repeats
        result = subprocess.run([sys.executable, "-m", "lorabench.run", "--task", "sst2", *args, "--results", str(tmp_path / "r")],
                                capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
    assert not (tmp_path / "r").exists()


def test_killed_run_leaves_no_record(tmp_path):
    env = {**os.environ, "LORABENCH_DATA": str(tiny_data(tmp_path))}
    out = tmp_path / "r" / "seed0.json"
    command = [sys.executable, "-m", "lorabench.run", "--task", "sst2", "--variant", "lora", "--out", str(out),
               "--set", "max_steps=100000", "batch_size=2", "threads=1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    while "lorabench: training" not in process.stderr.readline():
        assert process.poll() is None, "the run ended before training started"
    time.sleep(1)  # a few steps in
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_qlora_preset_runs_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    record = run.execute("sst2", "qlora", 0, "default", {**SMALL, "data_dir": str(tiny_data(tmp_path))}, tmp_path / "q.json")
    assert record["status"] == "ok" and record["run"]["hparams"]["quantize_base"] == "nf4"
    assert record["params"]["trainable"] == run.execute(
        "sst2", "lora", 0, "default", {**SMALL, "max_steps": 1, "data_dir": str(tiny_data(tmp_path / "l"))}, tmp_path / "l.json"
    )["params"]["trainable"]


def test_adalora_record_keeps_the_final_rank_of_every_layer(tmp_path):
    steps = 10  # the budget holds its final mask from step 10 - 4 = 6 (tfinal_ratio 0.4)
    record = run.execute("sst2", "adalora", 0, "default",
                         {**SMALL, "max_steps": steps, "save_adapter": False, "data_dir": str(tiny_data(tmp_path))}, tmp_path / "a.json")
    report = records.read(tmp_path / "a.json")["params"]["variant_report"]
    hparams = record["run"]["hparams"]
    assert len(report["ranks"]) > 1 and report["total_rank"] == sum(report["ranks"].values())
    assert report["total_rank"] == hparams["target_rank"] * len(report["ranks"]) < hparams["rank"] * len(report["ranks"])


def test_zero_steps_scores_the_untrained_model(tmp_path):
    data = str(tiny_data(tmp_path))
    record = run.execute("sst2", "lora", 0, "base", {**SMALL, "max_steps": 0, "save_adapter": False, "data_dir": data}, tmp_path / "b.json")
    assert record["status"] == "ok" and record["train"]["loss_curve"] == [] and record["train"]["timed_steps"] == 0
    assert 0 <= record["eval"]["primary_value"] <= 1


def test_epochs_set_the_number_of_steps_from_the_training_set(tmp_path):
    data = str(tiny_data(tmp_path))
    record = run.execute("sst2", "lora", 0, "default", {**SMALL, "epochs": 1.5, "save_adapter": False, "data_dir": data}, tmp_path / "e.json")
    examples = record["run"]["data"]["train"]
    assert record["train"]["steps"] == -(-3 * examples // (2 * SMALL["batch_size"])) > 0


def test_out_of_memory_after_training_still_writes_a_failed_record(tmp_path, monkeypatch):
    """Memory can run out past the training loop too (scoring, extraction, saving the adapter):
    the run still ends with a failed record naming it, so a DAG or a sweep sees the failure."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run.adapters, "save", out_of_memory)
    out = tmp_path / "seed0.json"
    record = run.execute("sst2", "lora", 0, "default", {**SMALL, "data_dir": str(tiny_data(tmp_path))}, out)
    assert record["status"] == "failed" and record["error"]["type"] == "OutOfMemoryError"
    assert records.read(out)["error"]["message"].startswith("CUDA out of memory")


def test_a_run_by_hand_writes_away_from_the_studys_records(monkeypatch, tmp_path):
    """The study's record path stays the study's: a hand run there would hide its job from Snakemake."""
    written = []
    monkeypatch.setattr(run, "execute", lambda task, variant, seed, setting, sets, out, selection: written.append(out) or
                        {"status": "failed", "error": {"type": "X", "message": "stopped here"}, "eval": None, "train": None})
    monkeypatch.chdir(tmp_path)
    run.main(["--task", "sst2", "--variant", "lora"])
    assert written == [records.record_path("results/manual", "sst2", "lora", "default", 0)]
    assert Path(written[0]).parts[:3] == ("results", "manual", "runs")


def test_validation_is_carved_from_long_rows_only_when_asked():
    import datasets
    texts = [" ".join(["word"] * (1 + row % 12)) for row in range(120)]
    splits = {"train": datasets.Dataset.from_dict({"sentence": texts, "label": [row % 2 for row in range(120)]}),
              "eval": datasets.Dataset.from_dict({"sentence": ["a b"], "label": [0]})}
    hparams = {"data_seed": 3, "val_size": 10, "train_size": 0, "eval_size": 0}
    plain = run.split_sizes(splits, hparams, text_columns=("sentence",))
    assert min(len(text.split()) for text in plain["val"]["sentence"]) < 10
    long_only = run.split_sizes(splits, {**hparams, "val_min_words": 10}, text_columns=("sentence",))
    assert len(long_only["val"]) == 10 and all(len(text.split()) >= 10 for text in long_only["val"]["sentence"])
    # nothing is lost: every row either validates or trains, once
    assert len(long_only["train"]) + len(long_only["val"]) == len(splits["train"])
    assert long_only["train"].num_rows == 110
    with pytest.raises(ConfigError, match="val_min_words=13: only 0"):
        run.split_sizes(splits, {**hparams, "val_min_words": 13}, text_columns=("sentence",))
