"""lorabench: train every variant on every task, then tables, figures and a report.

    snakemake                                   # default study (profiles/default applies itself)
    snakemake --configfile config/smoke.yaml    # another study instead of the default one
    snakemake --forcerun aggregate              # rebuild tables, figures and report only
    snakemake --report results/report.html      # the HTML report, figures by category

Threads, memory and GPUs per job come from the profile; the study (what to run) from config.
"""

import json
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from lorabench import study

min_version("9.0")


envvars:
    "PATH",


# Jobs run the Python that runs Snakemake (say .venv/bin/python), whether or not it is activated.
search_path = os.environ["PATH"]
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), search_path])


# --configfile replaces the default study instead of being merged into it.
if not config:

    configfile: f"{workflow.basedir}/config/config.yaml"


validate(config, "config/schema.yaml")
# A tuned-rates file named relative to the workflow, as config files are.
if config.get("rates"):
    config["rates"] = os.path.join(workflow.basedir, config["rates"])

# Two training jobs at a time, each with half the cores: on a 2-core CPU two one-thread jobs get
# through the default study faster than one two-thread job (docs/performance.md). A cluster
# executor has no local cores to halve: there the profile's set-threads decides (profiles/slurm*).
try:
    HALF_THE_CORES = max(1, workflow.cores // 2)
except WorkflowError:
    HALF_THE_CORES = 1

RESULTS = config["results"]
STUDY = study.expand(config)
RECORDS = [run.record(RESULTS) for run in STUDY]
# Learning-rate sweeps (config lr_sweep): their runs, then one selection per swept setting.
SWEEPS = {sweep.key: sweep for sweep in study.expand_sweeps(config)}
RUNS = {run.key: run for run in STUDY + [run for sweep in SWEEPS.values() for run in sweep.runs]}
ROOT = workflow.basedir
ENV = f"{ROOT}/workflow/envs/lorabench.yaml"
ANALYSIS = [f"{ROOT}/analysis/{name}.py" for name in ("__init__", "aggregate", "extraction", "significance")]
SUMMARIES = [f"{RESULTS}/tables/{name}.{ext}" for name in ("summary", "leaderboard", "glue", "lr_selection", "significance") for ext in ("md", "tex")]
EXTRACTION_TABLES = [
    f"{RESULTS}/tables/{name}.csv" for name in ("extraction_layers", "extraction_spectrum", "extraction_scores", "extraction_overhead",
                                               "extraction_library", "extraction_library_choice")
]


report: "analysis/report/workflow.rst"


# Seconds of work each: on a cluster they run where Snakemake runs, not as jobs of their own.
localrules:
    all,
    select_lr,
    aggregate,
    plots,
    report,


wildcard_constraints:
    seed=r"\d+",
    folder=f"{study.RUNS}|{study.SWEEPS}",


rule all:
    input:
        f"{RESULTS}/report.md",


def run_of(wildcards):
    return RUNS[(wildcards.folder, wildcards.task, wildcards.variant, wildcards.setting, int(wildcards.seed))]


rule train:
    """One training run in its own process, so its peak memory and time are its own: a run of
    the study (runs/) or of a learning-rate sweep (sweeps/, scored on validation only). A swept
    setting's run waits for its sweep's selection and trains at the chosen rate."""
    input:
        unpack(lambda wildcards: run_of(wildcards).inputs(RESULTS)),
    output:
        f"{RESULTS}/{{folder}}/{{task}}/{{variant}}/{{setting}}/seed{{seed}}.json",
    log:
        f"{RESULTS}/logs/{{folder}}/{{task}}/{{variant}}/{{setting}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}/{{task}}/{{variant}}/{{setting}}/seed{{seed}}.tsv"
    params:
        sets=lambda wildcards: run_of(wildcards).cli_sets(),
        selection=lambda wildcards, input: f"--selection {input.selection}" if "selection" in input.keys() else "",
        rates=lambda wildcards: run_of(wildcards).cli_rates(),
        task_spec=lambda wildcards: run_of(wildcards).cli_task(),
    # A profile's set-threads (train=N) overrides this.
    threads: HALF_THE_CORES
    priority: lambda wildcards: run_of(wildcards).priority
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    shell:
        "python -m lorabench.run --task {wildcards.task} {params.task_spec} --variant {wildcards.variant}"
        " --setting {wildcards.setting} --seed {wildcards.seed} --out {output}"
        " {params.selection} {params.rates} --set threads={threads} {params.sets} > {log} 2>&1"


rule select_lr:
    """A swept setting's learning rate: the grid's best mean validation score (lorabench/sweep.py)."""
    input:
        lambda wildcards: SWEEPS[(wildcards.task, wildcards.variant, wildcards.setting)].records(RESULTS),
    output:
        f"{RESULTS}/{study.SWEEPS}/{{task}}/{{variant}}/{{setting}}/selected.json",
    log:
        f"{RESULTS}/logs/{study.SWEEPS}/{{task}}/{{variant}}/{{setting}}/select_lr.log",
    conda:
        ENV
    shell:
        "python -m lorabench.sweep --out {output} {input} > {log} 2>&1"


rule aggregate:
    """Run records -> tidy long-form tables (parquet, CSV) and summaries (Markdown, LaTeX)."""
    input:
        records=RECORDS,
        code=ANALYSIS,
    output:
        runs=f"{RESULTS}/tables/runs.parquet",
        runs_csv=f"{RESULTS}/tables/runs.csv",
        leaderboard=f"{RESULTS}/tables/leaderboard.csv",
        summary=f"{RESULTS}/tables/summary.csv",
        glue=f"{RESULTS}/tables/glue.csv",
        lr_selection=f"{RESULTS}/tables/lr_selection.csv",
        significance=f"{RESULTS}/tables/significance.csv",
        renderings=SUMMARIES,
        extraction=EXTRACTION_TABLES,
    log:
        f"{RESULTS}/logs/aggregate.log",
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(output.runs)),
    conda:
        ENV
    shell:
        "python -m analysis.aggregate {params.results} > {log} 2>&1"


rule plots:
    input:
        tables=rules.aggregate.output,
        code=ANALYSIS + [f"{ROOT}/analysis/plots.py"],
    output:
        png=report(
            f"{RESULTS}/figures/score_vs_params.png",
            caption="analysis/report/score_vs_params.rst",
            category="Scores",
        ),
        pdf=f"{RESULTS}/figures/score_vs_params.pdf",
        ratio_png=report(
            f"{RESULTS}/figures/cost_vs_full.png",
            caption="analysis/report/cost_vs_full.rst",
            category="Costs",
        ),
        ratio_pdf=f"{RESULTS}/figures/cost_vs_full.pdf",
        seeds_png=report(
            f"{RESULTS}/figures/seed_scores.png",
            caption="analysis/report/seed_scores.rst",
            category="Scores",
        ),
        seeds_pdf=f"{RESULTS}/figures/seed_scores.pdf",
        rank_png=report(
            f"{RESULTS}/figures/rank_vs_variance.png",
            caption="analysis/report/rank_vs_variance.rst",
            category="Parasitic extraction",
        ),
        rank_pdf=f"{RESULTS}/figures/rank_vs_variance.pdf",
        kept_png=report(
            f"{RESULTS}/figures/score_vs_rank.png",
            caption="analysis/report/score_vs_rank.rst",
            category="Parasitic extraction",
        ),
        kept_pdf=f"{RESULTS}/figures/score_vs_rank.pdf",
        cost_png=report(
            f"{RESULTS}/figures/overhead_vs_interval.png",
            caption="analysis/report/overhead_vs_interval.rst",
            category="Parasitic extraction",
        ),
        cost_pdf=f"{RESULTS}/figures/overhead_vs_interval.pdf",
        library_png=report(
            f"{RESULTS}/figures/library_curve.png",
            caption="analysis/report/library_curve.rst",
            category="Parasitic extraction",
        ),
        library_pdf=f"{RESULTS}/figures/library_curve.pdf",
    log:
        f"{RESULTS}/logs/plots.log",
    params:
        results=lambda wildcards, input: os.path.dirname(os.path.dirname(input.tables[0])),
    conda:
        ENV
    shell:
        "python -m analysis.plots {params.results} > {log} 2>&1"


rule report:
    """The Markdown report; `snakemake --report results/report.html` gives the HTML one."""
    input:
        tables=rules.aggregate.output,
        figures=rules.plots.output,
        code=ANALYSIS + [f"{ROOT}/analysis/report.py"],
    output:
        f"{RESULTS}/report.md",
    log:
        f"{RESULTS}/logs/report.log",
    params:
        results=lambda wildcards, output: os.path.dirname(output[0]),
        bars=shlex.quote(json.dumps(config.get("bars") or {}, sort_keys=True)),
    conda:
        ENV
    shell:
        "python -m analysis.report {params.results} --no-rebuild --bars {params.bars} > {log} 2>&1"
