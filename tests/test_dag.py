"""The Snakemake DAG end to end on the smoke study, in a temporary folder."""

import json
import os
import re
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
        if path.name in ("schema.yaml", "rates.yaml"):  # the study schema and the tuned rates, not studies
            continue
        config = yaml.safe_load(path.read_text())
        validate(config, str(ROOT / "config" / "schema.yaml"))
        runs = study.expand(config)
        assert {run.variant for run in runs} == set(study.resolved(config)["variants"]), path.name
        assert {run.task for run in runs} == set(config["tasks"]), path.name


def test_default_study_covers_every_variant_on_sst2_imdb_and_e2e_and_paper_all_of_glue():
    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    assert set(default["tasks"]) == {"sst2", "imdb", "e2e"} and default["variants"] == paper["variants"] == "all"
    assert {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"} <= set(paper["tasks"])
    assert study.resolved(default)["variants"] == list(variants.REGISTRY)
    assert study.resolved({**default, "exclude_variants": ["vera"]})["variants"] == [name for name in variants.REGISTRY if name != "vera"]


def test_bad_config_fails_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["hparams"]["variant"]["lora"]["rnak"] = 4
    with pytest.raises(ConfigError, match=r"setting 'default', task 'sst2', variant 'lora'.*rnak"):
        study.expand(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "hparams": {"all": {"lr": -1}}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"))
    assert result.returncode != 0 and "lr" in result.stdout + result.stderr


def declared_reviews(folder: Path) -> dict:
    """A sentiment CSV of 200 rows (word lists that give the label away) and its datasets entry."""
    good, bad = ["great", "moving", "wonderful", "funny"], ["dull", "boring", "awful", "tedious"]
    rows = [(f"a {words[i % 4]} and {words[(i + 1) % 4]} film, take {i}", label) for i in range(100)
            for words, label in ((good, "positive"), (bad, "negative"))]
    (folder / "reviews.csv").write_text("review,sentiment\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    return {"kind": "classification", "train": str(folder / "reviews.csv"), "eval": str(folder / "reviews.csv"),
            "text": "review", "label": "sentiment", "metric": "f1"}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> Path:
    """The smoke study, plus a setting that diverges, run once by Snakemake for this module."""
    folder = tmp_path_factory.mktemp("smoke")
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["settings"]["diverges"] = {"variants": ["full"], "hparams": {"lr": 1.0e30, "max_steps": 3, "save_adapter": False}}
    config["datasets"] = {"reviews": declared_reviews(folder)}  # a task from a CSV, declared in the config alone
    config["tasks"].append("reviews")
    (folder / "study.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(folder, "--configfile", str(folder / "study.yaml"), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


FIGURES = ("score_vs_params", "cost_vs_full", "rank_vs_variance", "score_vs_rank", "overhead_vs_interval")


@pytest.mark.slow
def test_smoke_dag_end_to_end(smoke_study):
    tmp_path = smoke_study
    results = tmp_path / "results"
    stored = records.read_all(results)
    assert sorted((r["run"]["task"], r["run"]["variant"], r["run"]["setting"], r["status"]) for r in stored) == [
        ("e2e", "full", "default", "ok"), ("e2e", "full", "diverges", "failed"), ("e2e", "lora", "base", "ok"), ("e2e", "lora", "default", "ok"),
        ("reviews", "full", "default", "ok"), ("reviews", "full", "diverges", "failed"), ("reviews", "lora", "base", "ok"),
        ("reviews", "lora", "default", "ok"),
        ("sst2", "full", "default", "ok"), ("sst2", "full", "diverges", "failed"), ("sst2", "lora", "base", "ok"), ("sst2", "lora", "default", "ok")]
    e2e = next(r for r in stored if r["run"]["task"] == "e2e" and r["run"]["setting"] == "default" and r["run"]["variant"] == "lora")
    assert {"bleu", "rouge_l", "perplexity", "forgetting"} <= set(e2e["eval"]["metrics"]) and e2e["run"]["model"] == "smollm2"
    report = (results / "report.md").read_text()
    for name in FIGURES:
        assert f"figures/{name}.png" in report and (results / "figures" / f"{name}.png").stat().st_size > 0
    for section in ("## Leaderboard", "## Score vs trainable parameters", "## Memory and throughput relative to full fine-tuning",
                    "## Results per task", "## Parasitic extraction", "### Score retained at each explained-variance threshold",
                    "## Failed runs", "## Hyper-parameters"):
        assert section in report, section
    assert "lora" in report and "full" in report and "DivergedError" in report
    reviews = next(r for r in stored if r["run"]["task"] == "reviews" and r["run"]["setting"] == "default" and r["run"]["variant"] == "lora")
    assert reviews["eval"]["primary"] == "f1" and reviews["run"]["task_spec"]["train"].endswith("reviews.csv")
    leaderboard = (results / "tables" / "leaderboard.md").read_text()
    assert "reviews" in leaderboard and "reviews" in report  # the declared task is a column like any other
    for table in ("leaderboard", "summary", "glue"):
        assert all((results / "tables" / f"{table}.{ext}").exists() for ext in ("csv", "md", "tex"))
    assert (results / "benchmarks" / "runs" / "sst2" / "lora" / "default" / "seed0.tsv").exists()
    assert (results / "logs" / "runs" / "sst2" / "lora" / "default" / "seed0.log").exists()

    # The learning-rate sweep: validation-only runs, a selection, the final run at its rate.
    swept = [records.read(results / "sweeps" / "sst2" / "lora" / f"default.lr{lr}" / "seed0.json") for lr in ("0.0003", "0.001")]
    assert [r["eval"]["split"] for r in swept] == ["validation", "validation"] and all(r["params"]["adapter_path"] is None for r in swept)
    selected = json.loads((results / "sweeps" / "sst2" / "lora" / "default" / "selected.json").read_text())
    final = next(r for r in stored if r["run"]["task"] == "sst2" and r["run"]["variant"] == "lora" and r["run"]["setting"] == "default")
    assert final["run"]["hparams"]["lr"] == selected["chosen"] and final["run"]["selection"]["grid"] == [3e-4, 1e-3]
    assert "## Learning rates" in report and (results / "tables" / "lr_selection.csv").exists()

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
    # invocation trains exactly the missing run. What the check removes is put back after it,
    # so other tests of this module still see the whole study.
    aside = tmp_path / "aside"
    moved = [results / "runs" / "sst2" / "lora" / "default" / "seed0.json", results / "tables", results / "figures", results / "report.md"]
    aside.mkdir()
    for index, path in enumerate(moved):
        path.rename(aside / str(index))
    try:
        dry = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "study.yaml"))
        assert dry.stdout.count("rule train:") == 1 and "runs/sst2/lora/default/seed0.json" in dry.stdout, dry.stdout
    finally:
        for index, path in enumerate(moved):
            (aside / str(index)).rename(path)


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_html_report_shows_every_figure_in_headless_chromium(smoke_study, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    html = smoke_study / "results" / "report.html"
    result = snakemake(smoke_study, "--report", str(html), "--configfile", str(smoke_study / "study.yaml"))
    assert result.returncode == 0 and html.stat().st_size > 0, result.stdout[-3000:] + result.stderr[-3000:]

    errors, shown = [], {}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(html.as_uri())
        for category in ("Scores", "Costs", "Parasitic extraction"):
            page.locator("a", has=page.get_by_text(category, exact=True)).click()  # the menu entry, not the landing text
            for row in page.locator("tr", has_text="results/").all():
                name = row.locator("td").first.inner_text().strip()
                row.locator("a[iconname=eye]").click()
                image = page.locator(f"img[src*='filename={Path(name).name}']")
                image.wait_for(state="visible")
                shown[name] = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
                page.screenshot(path=tmp_path / f"{Path(name).stem}.png")
            page.goto(html.as_uri())
        browser.close()
    assert errors == []
    for figure in FIGURES:
        complete, width, height = shown[f"results/figures/{figure}.png"]
        assert complete and width > 0 and height > 0, figure
        assert (tmp_path / f"{figure}.png").stat().st_size > 0


def job_counts(dry_run: str) -> dict[str, int]:
    """The job-stats table of a dry run: rule -> count."""
    table = dry_run[dry_run.index("Job stats:") :]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.mark.parametrize("profile", ["--workflow-profile=profiles/slurm", "--profile=profiles/slurm", "--profile=profiles/default"])
def test_the_paper_study_lists_every_job_with_its_resources(profile, tmp_path):
    """Every run of the study (every variant x GLUE task x seed, the untrained references,
    LoRA's ranks, the cost settings) and of its learning-rate sweeps, one select_lr per sweep,
    and the four analysis jobs; counts derived from the registry through study.expand."""
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    sweeps = study.expand_sweeps(config)
    trained = len(study.expand(config)) + sum(len(item.runs) for item in sweeps)
    result = snakemake(tmp_path, "-n", profile, "--configfile", str(ROOT / "config" / "paper.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    expected = {"train": trained, "select_lr": len(sweeps), "aggregate": 1, "plots": 1, "report": 1, "all": 1}
    assert job_counts(output) == {**expected, "total": sum(expected.values())}, (
        "the paper study's dry run lists other jobs than study.expand: a rule or a config changed what a study runs")
    assert len(sweeps) == len(variants.REGISTRY) * len(config["tasks"])  # every variant swept on every task
    train_resources = re.findall(r"rule train:.*?resources: ([^\n]*)", output, re.DOTALL)
    assert len(train_resources) == trained
    if "slurm" in profile:
        assert all("gpu=1" in line and "cpus_per_gpu=8" in line and "mem_mb=32000" in line and "runtime=720" in line for line in train_resources)
    else:
        assert all("gpu=0" in line for line in train_resources)


def test_where_entries_apply_to_the_runs_they_name_and_refuse_unknown_names():
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["tasks"] = ["sst2", "imdb"]
    config["hparams"]["where"] = [{"tasks": ["imdb"], "variants": ["full"], "hparams": {"max_steps": 3}}]
    steps = {(run.task, run.variant): dict(run.overrides)["max_steps"] for run in study.expand(config) if run.setting == "default"}
    assert steps == {("sst2", "full"): 8, ("sst2", "lora"): 8, ("imdb", "full"): 3, ("imdb", "lora"): 8}
    config["hparams"]["where"][0]["tasks"] = ["imbd"]
    with pytest.raises(ConfigError, match=r"'hparams.where' entry 1: unknown tasks \['imbd'\]"):
        study.expand(config)


def test_seeds_come_from_the_setting_then_the_task_then_the_study():
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["task_seeds"] = {"sst2": [0, 1, 2]}
    config["settings"]["rank4"] = {"tasks": ["sst2"], "variants": ["lora"], "seeds": [5], "hparams": {"rank": 4}}
    seeds = {}
    for run in study.expand(config):
        seeds.setdefault((run.task, run.variant, run.setting), []).append(run.seed)
    for (task, variant, setting), found in seeds.items():
        expected = config["settings"][setting].get("seeds") or config["task_seeds"].get(task, config["seeds"])
        assert found == expected, (task, variant, setting)
    assert seeds["sst2", "lora", "rank4"] == [5] and seeds["sst2", "full", "default"] == [0, 1, 2] and seeds["e2e", "lora", "default"] == [0]
    config["task_seeds"] = {"sst": [0]}
    with pytest.raises(ConfigError, match=r"'task_seeds': unknown tasks \['sst'\]"):
        study.expand(config)


def test_the_default_study_has_three_seeds_on_sst2_for_every_variant():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    runs = [run for run in study.expand(config) if run.task == "sst2" and run.setting == "default"]
    assert {variant: sorted(run.seed for run in runs if run.variant == variant) for variant in variants.REGISTRY} == {
        variant: [0, 1, 2] for variant in variants.REGISTRY}
