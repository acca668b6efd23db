"""The Snakemake DAG end to end on the smoke study, in a temporary folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import variants
from lorabench import records, study
from lorabench.run import ConfigError
from tests.helpers import shared_data, tiny_e2e, tiny_sst2

ROOT = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *args: str, snakefile: Path = ROOT / "Snakefile") -> subprocess.CompletedProcess:
    data = shared_data() or (workdir / "data" if (workdir / "data").exists() else tiny_e2e(tiny_sst2(workdir / "data", repeat=50)))
    env = {**os.environ, "LORABENCH_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)


def test_lint_is_clean():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_every_config_expands():
    from snakemake.utils import validate

    for path in sorted((ROOT / "config").glob("*.yaml")):
        if path.name == "schema.yaml":
            continue
        config = yaml.safe_load(path.read_text())
        validate(config, str(ROOT / "config" / "schema.yaml"))
        runs = study.expand(config)
        assert {run.variant for run in runs} == set(config["variants"]), path.name
        assert {run.task for run in runs} == set(config["tasks"]), path.name


def test_default_study_covers_every_variant_on_sst2_imdb_and_e2e_and_paper_all_of_glue():
    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    every_variant = set(variants.REGISTRY)
    assert set(default["tasks"]) == {"sst2", "imdb", "e2e"} and set(default["variants"]) == every_variant
    assert {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"} <= set(paper["tasks"])
    assert set(paper["variants"]) == every_variant


def test_bad_config_fails_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["hparams"]["variant"]["lora"]["rnak"] = 4
    with pytest.raises(ConfigError, match=r"setting 'default', task 'sst2', variant 'lora'.*rnak"):
        study.expand(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "hparams": {"all": {"lr": -1}}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"))
    assert result.returncode != 0 and "lr" in result.stdout + result.stderr


@pytest.mark.slow
def test_smoke_dag_end_to_end(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["settings"]["diverges"] = {"variants": ["full"], "hparams": {"lr": 1.0e30, "max_steps": 3, "save_adapter": False}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--configfile", str(tmp_path / "study.yaml"), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = tmp_path / "results"
    stored = records.read_all(results)
    assert sorted((r["run"]["task"], r["run"]["variant"], r["run"]["setting"], r["status"]) for r in stored) == [
        ("e2e", "full", "default", "ok"), ("e2e", "full", "diverges", "failed"), ("e2e", "lora", "base", "ok"), ("e2e", "lora", "default", "ok"),
        ("sst2", "full", "default", "ok"), ("sst2", "full", "diverges", "failed"), ("sst2", "lora", "base", "ok"), ("sst2", "lora", "default", "ok")]
    e2e = next(r for r in stored if r["run"]["task"] == "e2e" and r["run"]["setting"] == "default" and r["run"]["variant"] == "lora")
    assert {"bleu", "rouge_l", "perplexity", "forgetting"} <= set(e2e["eval"]["metrics"]) and e2e["run"]["model"] == "smollm2"
    report = (results / "report.md").read_text()
    for name in ("score_vs_params", "rank_vs_variance", "score_vs_rank", "overhead_vs_interval"):
        assert f"figures/{name}.png" in report and (results / "figures" / f"{name}.png").stat().st_size > 0
    assert "## Parasitic extraction" in report and "### Score retained at each explained-variance threshold" in report
    assert "lora" in report and "full" in report and "DivergedError" in report
    assert (results / "benchmarks" / "train" / "sst2" / "lora" / "default" / "seed0.tsv").exists()
    assert (results / "logs" / "train" / "sst2" / "lora" / "default" / "seed0.log").exists()

    nothing_to_do = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "study.yaml"))
    assert "Nothing to be done" in nothing_to_do.stdout + nothing_to_do.stderr

    # Editing analysis code reruns the analysis, and no training job. Snakemake compares
    # checksums of code inputs, so edit a copy of the workflow rather than the repository.
    copy = tmp_path / "workflow_copy"
    copy.mkdir()
    shutil.copy(ROOT / "Snakefile", copy)
    for folder in ("config", "analysis", "workflow", "profiles"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "analysis" / "plots.py", "a") as plots:
        plots.write("# an edit\n")
    dry = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "study.yaml"), snakefile=copy / "Snakefile")
    jobs = dry.stdout + dry.stderr
    assert "rule plots" in jobs and "rule report" in jobs and "rule train" not in jobs, jobs

    # A run interrupted during the study leaves no record (and no report yet): the next
    # invocation trains exactly the missing run.
    (results / "runs" / "sst2" / "lora" / "default" / "seed0.json").unlink()
    for analysis_output in ("tables", "figures"):
        shutil.rmtree(results / analysis_output)
    (results / "report.md").unlink()
    dry = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "study.yaml"))
    assert dry.stdout.count("rule train:") == 1 and "runs/sst2/lora/default/seed0.json" in dry.stdout, dry.stdout


def test_where_entries_apply_to_the_runs_they_name_and_refuse_unknown_names():
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["tasks"] = ["sst2", "imdb"]
    config["hparams"]["where"] = [{"tasks": ["imdb"], "variants": ["full"], "hparams": {"max_steps": 3}}]
    steps = {(run.task, run.variant): dict(run.overrides)["max_steps"] for run in study.expand(config) if run.setting == "default"}
    assert steps == {("sst2", "full"): 8, ("sst2", "lora"): 8, ("imdb", "full"): 3, ("imdb", "lora"): 8}
    config["hparams"]["where"][0]["tasks"] = ["imbd"]
    with pytest.raises(ConfigError, match=r"'hparams.where' entry 1: unknown tasks \['imbd'\]"):
        study.expand(config)
