"""A new variant is one file: the template filled in and dropped into a copy of the repository, with no other edit, it is
discovered, passes the contract tests, is scheduled by the default study's dry run, gets its
README row from `make test`'s docs step (python -m lorabench.docs --write), and a row of a
study's report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import shared_data

ROOT = Path(__file__).resolve().parent.parent
NAME = "template_lora"
DOCSTRING = '''"""Template LoRA: LoRA as the template writes it, under a new name.

Nobody (2026), arXiv:2601.00001.

Formula
    y = W x + b + (alpha / r) B A x,   A: (r, d_in) Kaiming-uniform, B: (d_out, r) zeros, trainable

Claims
    - The model is unchanged at step 0: B = 0.
    - r (d_in + d_out) trainable parameters per adapted layer.
"""
'''


def filled_template() -> str:
    """variants/_template.py as a contributor fills it in: a docstring and a name."""
    template = (ROOT / "variants" / "_template.py").read_text()
    body = template[template.index('"""', 3) + 3 :]
    return DOCSTRING + body.replace('name = "template_do_not_register"', f'name = "{NAME}"')


def test_a_variant_file_alone_is_discovered_tested_scheduled_and_documented(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "results", ".snakemake", "__pycache__",
                                                             "*.egg-info", ".pytest_cache"))
    (copy / "variants" / f"{NAME}.py").write_text(filled_template())
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"}
    if shared_data():
        env["LORABENCH_DATA"] = str(shared_data())

    def python(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"python {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    found = python("-c", "import variants; print(variants.__file__); print(*variants.REGISTRY)").stdout.splitlines()
    assert found[0].startswith(str(copy)) and NAME in found[1].split()

    python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", NAME, "tests/test_variant_contract.py")

    python("-m", "lorabench.docs", "--write")  # what make test runs first
    assert f"| `{NAME}` |" in (copy / "README.md").read_text()
    python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_docs.py", "tests/test_rates.py",
           "tests/test_dag.py::test_every_config_expands", "tests/test_dag.py::test_default_study_covers_every_variant_on_sst2_imdb_and_e2e_and_paper_all_of_glue")

    config = yaml.safe_load((copy / "config" / "config.yaml").read_text())
    planned = python("-m", "snakemake", "-n", "--configfile", "config/config.yaml").stdout
    for task in config["tasks"]:
        for seed in config.get("task_seeds", {}).get(task, config["seeds"]):
            record = f"{config['results']}/runs/{task}/{NAME}/default/seed{seed}.json"
            assert record in planned, f"the default study's dry run schedules no {record}"

    # ... and to a row of the report: the smoke study's SST-2 part, the new variant beside LoRA.
    smoke = yaml.safe_load((copy / "config" / "smoke.yaml").read_text())
    smoke.update(tasks=["sst2"], variants=[NAME, "lora"], settings={"default": {}}, results="results/contributed")
    smoke["hparams"].pop("where", None)
    smoke.pop("lr_sweep", None)
    (copy / "contributed.yaml").write_text(yaml.safe_dump(smoke))
    python("-m", "snakemake", "--configfile", "contributed.yaml", "--cores", "2")
    leaderboard = (copy / "results" / "contributed" / "tables" / "leaderboard.md").read_text()
    assert f"{NAME}" in leaderboard and NAME in (copy / "results" / "contributed" / "report.md").read_text()
