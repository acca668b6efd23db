"""The cluster path, run for real: studies through the one-node SLURM of cluster/local-slurm
(profiles/slurm-local), with job submission, sacct's status polling, logs and a shared results
folder as a cluster has them. .ci/run starts the cluster; by hand, `sudo cluster/local-slurm start`
and `eval "$(cluster/local-slurm env)"` before the tests. Without a cluster that answers, every
test here is skipped with the reason.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorabench import records
from tests.helpers import shared_data, tiny_sst2

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "slurm-local"


def cluster_down() -> str | None:
    """Why no cluster can be used, or None when one answers."""
    if not os.environ.get("SLURM_CONF"):
        return 'no SLURM_CONF: start one with `sudo cluster/local-slurm start` and `eval "$(cluster/local-slurm env)"`'
    if not shutil.which("sinfo"):
        return "SLURM's commands are not installed (cluster/local-slurm start installs them)"
    answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if answer.returncode or "idle" not in answer.stdout and "mix" not in answer.stdout:
        return f"no idle SLURM node: sinfo says {answer.stdout.strip() or answer.stderr.strip()!r}"
    return None


pytestmark = [pytest.mark.cluster, pytest.mark.skipif(cluster_down() is not None, reason=str(cluster_down()))]


def data_dir(folder: Path) -> Path:
    return shared_data() or tiny_sst2(folder / "data", repeat=50)


def study(folder: Path, **changes) -> Path:
    """SST-2 from the smoke study: LoRA and full fine-tuning, one seed, a few steps."""
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config.update(tasks=["sst2"], variants=["lora", "full"], settings={"default": {}}, results="results")
    config["hparams"].pop("where", None)
    config.pop("lr_sweep", None)
    config.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(config))
    return folder / "study.yaml"


def snakemake(folder: Path, *args: str, slurm: bool = True, wait: bool = True):
    env = {**os.environ, "LORABENCH_DATA": str(data_dir(folder)), "HF_HUB_OFFLINE": "1"}
    profile = ["--workflow-profile", str(PROFILE)] if slurm else ["--cores", "2"]
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(folder),
               "--configfile", str(folder / "study.yaml"), *profile, *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)


def sacct_since(start: str) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "State", "Comment"]
    listing = subprocess.run(["sacct", "-X", "-n", "-P", "-S", start, "-o", ",".join(fields)], capture_output=True, text=True, check=True)
    return [dict(zip(fields, line.split("|"))) for line in listing.stdout.splitlines() if line]


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")


def metrics(results: Path) -> dict:
    return {(r["run"]["task"], r["run"]["variant"], r["run"]["setting"], r["run"]["seed"]): r["eval"]["metrics"]
            for r in records.read_all(results)}


def test_a_study_runs_as_slurm_jobs_and_scores_as_a_local_run(tmp_path):
    start = now()
    study(tmp_path / "slurm")
    done = snakemake(tmp_path / "slurm")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trained = [job for job in sacct_since(start) if "train" in job["Comment"]]
    assert len(trained) == 2 and {job["State"] for job in trained} == {"COMPLETED"}, trained
    assert (tmp_path / "slurm" / "results" / "report.md").is_file()

    study(tmp_path / "local")
    local = snakemake(tmp_path / "local", slurm=False)
    assert local.returncode == 0, local.stderr[-3000:]
    assert metrics(tmp_path / "slurm" / "results") == metrics(tmp_path / "local" / "results")  # to the last digit


def test_a_cancelled_job_resumes_from_its_checkpoint_on_the_next_run(tmp_path):
    long_run = {"max_steps": 120, "eval_every": 0, "checkpoint_every": 20}  # cancelled at its first checkpoint, about a sixth in
    config = study(tmp_path / "slurm", variants=["lora"])
    changed = yaml.safe_load(config.read_text())
    changed["hparams"]["all"].update(long_run)
    config.write_text(yaml.safe_dump(changed))
    checkpoint = tmp_path / "slurm" / "results" / "runs" / "sst2" / "lora" / "default" / "seed0.ckpt.safetensors"
    workflow = snakemake(tmp_path / "slurm", wait=False)
    try:
        for _ in range(300):
            if checkpoint.exists():
                break
            time.sleep(1)
        assert checkpoint.exists(), "the job never wrote a checkpoint"
        running = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout.split("\n")
        job = next(line.split()[0] for line in running if "train" in line)
        subprocess.run(["scancel", job], check=True)
        output, _ = workflow.communicate(timeout=300)
    finally:
        if workflow.poll() is None:
            workflow.kill()
    assert workflow.returncode != 0 and checkpoint.exists(), output[-3000:]

    again = snakemake(tmp_path / "slurm")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = records.read(tmp_path / "slurm" / "results" / "runs" / "sst2" / "lora" / "default" / "seed0.json")
    assert resumed["train"]["resumed_from_step"] > 0

    config_local = study(tmp_path / "local", variants=["lora"])
    config_local.write_text(yaml.safe_dump(changed))
    assert snakemake(tmp_path / "local", slurm=False).returncode == 0
    assert metrics(tmp_path / "slurm" / "results") == metrics(tmp_path / "local" / "results")


def test_a_job_past_its_time_limit_fails_and_the_workflow_says_so(tmp_path):
    config = study(tmp_path, variants=["lora"])
    changed = yaml.safe_load(config.read_text())
    changed["hparams"]["all"].update(max_steps=5000, eval_every=0)
    config.write_text(yaml.safe_dump(changed))
    start = now()
    done = snakemake(tmp_path, "--set-resources", "train:runtime=1")
    assert done.returncode != 0
    (job,) = [job for job in sacct_since(start) if "train" in job["Comment"]]
    assert job["State"] == "TIMEOUT", job
    logs = "".join(path.read_text(errors="replace") for path in (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert "TIME LIMIT" in logs or "TIMEOUT" in done.stdout + done.stderr
    assert not (tmp_path / "results" / "runs" / "sst2" / "lora" / "default" / "seed0.json").exists()
