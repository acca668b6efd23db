"""The benchmark cannot rot: ``python -m lorabench.bench --quick`` runs every section on a tiny
BERT in seconds, exits 0, and writes a JSON file with every section and method and finite ratios;
its step-0 check shows ours and PEFT compute the same loss, so its timings compare like with like.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from lorabench import bench
from tests.helpers import ROOT

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(the JSON figures, the printed report) of one quick run of every section."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    completed = subprocess.run([sys.executable, "-m", "lorabench.bench", "--quick", "--json", str(out)], cwd=ROOT,
                               capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return json.loads(out.read_text()), completed.stdout


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_runs_every_section_with_finite_ratios(quick_run):
    figures, printed = quick_run
    assert set(bench.SECTIONS) <= set(figures)
    assert set(figures["peft"]) == set(bench.METHODS)
    skippable = set() if importlib.util.find_spec("bitsandbytes") else {"qlora"}
    for method, result in figures["peft"].items():
        if method in skippable:
            assert "skipped" in result and f"{method:8} skipped" in printed
            continue
        assert "skipped" not in result, f"{method}: {result.get('skipped')}"
        for key in ("ours_ms", "peft_ms", "tokens_per_s_ratio", "memory_ratio", "activation_ratio"):
            assert finite(result[key]), f"{method}.{key} = {result[key]!r}"
        assert result["trainable_ours"] == result["trainable_peft"], method
        assert any(line.startswith(method) and ("PASS" in line or "MISS" in line) for line in printed.splitlines()), method

    overhead = figures["overhead"]
    assert finite(overhead["train_step"]["lora_over_full"])
    assert finite(overhead["inference"]["unmerged_over_merged"])
    assert overhead["inference"]["max_logit_gap"] < 1e-4  # merged and unmerged are the same model
    theirs = overhead["inference"]["peft"]
    assert finite(theirs["unmerged_over_merged"]) and theirs["max_logit_gap"] < 1e-4  # and PEFT's, with our tensors
    assert "PEFT's         merged" in printed

    extraction = figures["extraction"]
    assert set(extraction["intervals"]) == {str(interval) for interval in bench.EXTRACTION_INTERVALS}
    for entry in extraction["intervals"].values():
        assert finite(entry["percent_time"]) and finite(entry["percent_flops"])
    assert "passed" in extraction["intervals"]["50"]
    assert 0 < extraction["products_floor_over_step"] and extraction["cold_extraction_over_step"] > 0
    assert extraction["snapshot"]["copied_mb"] + extraction["snapshot"]["mapped_mb"] > 0
    long = extraction["long_batch"]  # the realistic batch, against its own target
    assert long["tokens_per_step"] >= bench.LONG_BATCH[0] and long["intervals"]["50"]["target_percent"] == bench.LONG_BATCH_TARGET[1]

    jobs = figures["jobs"]
    assert jobs["threads_per_job"] == max(1, jobs["cores"] // 2)
    for workload in ("lora", "full"):
        for key in ("two_jobs_ms", "one_job_ms", "alone_ms", "throughput_two_over_one", "slowdown_together"):
            assert finite(jobs[workload][key]), f"jobs.{workload}.{key} = {jobs[workload][key]!r}"
        assert any(line.startswith(workload) and "two jobs train" in line for line in printed.splitlines()), workload

    scoring = figures["scoring"]
    assert scoring["shared_prompts"] == 4 and finite(scoring["shared_over_full"])
    assert scoring["relative_loss_gap"] < 1e-5  # sharing a prompt's pass changes what is computed, not the loss

    warm_start = figures["warmstart"]  # both schemes scored at every extraction; the first, cold, is shared
    rows = warm_start["extractions"]
    assert len(rows) >= 2 and rows[0]["one_max"] == rows[0]["two_max"]
    assert all(0 <= row[key] <= 1 for row in rows for key in ("two_max", "two_mean", "one_max", "one_mean"))
    assert warm_start["percent_flops_two_products"] == pytest.approx(2 * warm_start["percent_flops_one_product"])

    trainer = figures["trainer"]
    assert finite(trainer["with_over_plain"]) and finite(trainer["warm_extraction_over_step"]) and finite(trainer["percent_time_at_50"])
    assert all(finite(value) for value in trainer["logged_percent_time"]) and "Trainer with the callback / without" in printed


def test_ours_and_peft_agree_on_the_step0_loss(quick_run):
    figures, _ = quick_run
    for method, result in figures["peft"].items():
        if "skipped" in result:
            continue
        assert math.isfinite(result["loss_ours"]), method
        gap = abs(result["loss_ours"] - result["loss_peft"])
        assert gap <= bench.LOSS_TOLERANCE, (method, result["loss_ours"], result["loss_peft"])
        assert result["same_loss"], method
