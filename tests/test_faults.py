"""Faults end in a clear error or a failed record: a finite blow-up of the loss, a resume with
another thread count, a run too short to time, a study whose runs no job could start."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
import yaml
from snakemake.utils import validate

import variants
from lorabench import adapters, checkpoint, measure, records, run, sizing, study
from lorabench.run import ConfigError
from lorabench.train import DIVERGENCE_WINDOW, DivergedError, TrainConfig, diverged, train
from tests.conftest import SEED, build_model, llama_config
from tests.helpers import tiny_sst2

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("bert", "llama", "llama-lm")  # an encoder and a decoder classifier, and a decoder trained as a language model


def build(kind: str) -> torch.nn.Module:
    if kind != "llama-lm":
        return build_model(kind)
    torch.manual_seed(SEED)
    return transformers.LlamaForCausalLM(llama_config()).eval()


def tiny_examples(kind: str, count: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    examples = []
    for index in range(count):
        ids = torch.randint(1, 100, (int(torch.randint(3, 9, (1,), generator=generator)),), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids if kind == "llama-lm" else index % 2})
    return examples


def train_tiny(kind: str, name: str = "lora", checkpointer=None, **settings) -> dict:
    model = build(kind)
    variant = variants.REGISTRY[name]
    variant_cfg = variants.make_config(variant, {**variants.config_fields(variant), **variant.TEST_CONFIG})
    adapters.attach(model, variant, variant_cfg)
    cfg = TrainConfig(**{"lr": 5e-3, "batch_size": 4, "max_steps": 6, "warmup_ratio": 0.0, "log_every": 1, "timing_warmup_steps": 1,
                         "precision": "fp32", **settings})
    task = SimpleNamespace(name="tiny", causal=kind == "llama-lm")
    return train(model, variant, variant_cfg, task, tiny_examples(kind), [], cfg, 0, torch.device("cpu"), 0, None, checkpointer)


def test_divergence_is_a_sustained_blow_up_not_a_spike():
    assert diverged([0.7, 0.6, 50.0, 0.5], 10) is None  # one spike: the median ignores it
    assert diverged([0.7, 30.0, 40.0], 10) is not None  # two of three far above the first step's
    assert diverged([0.7, 30.0, 40.0], 0) is None  # factor 0: only non-finite losses
    assert "loss is nan" in diverged([0.7, float("nan")], 0)
    assert diverged([0.05, 3.0, 3.0, 3.0], 10) is None  # the floor: a near-zero first loss is not the yardstick
    assert diverged([2.78, 6.04, 5.0, 4.0, 3.0], 10) is None  # DeLoRA's decoder run: its loss doubles, then falls
    long = [0.7] + [0.5] * 20 + [40.0] * (DIVERGENCE_WINDOW // 2 + 1)
    assert diverged(long, 10) is not None


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(("kind", "name"), [(kind, name) for kind in MODELS for name in ("lora", "full")
                                           if (kind, name) != ("llama-lm", "lora")])  # its loss sits at chance at lr=10
def test_a_finite_blow_up_stops_training_on_either_kind_of_model(kind, name):
    """lr=10 sends the loss to hundreds of nats, and keeps it there, without a NaN: the run
    fails with the reason. (At lr=1e3 the tiny Llama's loss spikes once, then sits at chance:
    its RMSNorm saturates; a ruined model, but no blow-up for the loss to show.)"""
    with pytest.raises(DivergedError, match="loss diverged: the median of the last .* lower lr") as caught:
        train_tiny(kind, name, lr=10.0, max_steps=20)
    assert 3 <= caught.value.step < 20
    section = train_tiny(kind, name, max_steps=6)  # the same run at a sane rate trains to the end
    assert len(section["loss_curve"]) == 6


@pytest.mark.usefixtures("single_thread")
def test_a_resume_with_other_threads_warns_and_the_record_says_so(tmp_path, capsys):
    record = tmp_path / "seed0.json"
    train_tiny("bert", checkpointer=checkpoint.Checkpointer(record, "h", 3, torch.device("cpu"), "fp32"), checkpoint_every=3)
    assert checkpoint.read_state(checkpoint.path_for(record))["threads"] == 1
    torch.set_num_threads(2)
    resumed = train_tiny("bert", checkpointer=checkpoint.Checkpointer(record, "h", 3, torch.device("cpu"), "fp32"), checkpoint_every=3)
    assert resumed["resumed_from_step"] == 3 and resumed["resumed_threads"] == 1
    warning = capsys.readouterr().err
    assert "written with 1 CPU threads, this process has 2" in warning and "set threads=1" in warning


def test_a_run_with_no_timed_step_measures_no_throughput():
    throughput = measure.Throughput(torch.device("cpu"), warmup_steps=3)
    throughput.begin()
    for _ in range(3):
        throughput.step_done(4, 40)
    summary = throughput.summary()
    assert summary["timed_steps"] == 0 and summary["tokens_per_s"] is None and summary["samples_per_s"] is None
    assert summary["timed_s"] is None


def test_a_run_that_blows_up_writes_a_failed_record_with_the_reason(tmp_path):
    """The issue's case: MiniLM at lr=1e3 ends 5 steps at a loss in the hundreds of thousands,
    finite, and was recorded as ok."""
    data = tiny_sst2(tmp_path / "data")
    out = tmp_path / "seed0.json"
    sets = {"max_steps": 5, "batch_size": 4, "lr": 1e3, "warmup_ratio": 0.0, "threads": 1, "data_dir": str(data)}
    record = run.execute("sst2", "lora", 0, "default", sets, out)
    assert record["status"] == "failed" and records.read(out)["status"] == "failed"
    assert record["error"]["type"] == "DivergedError" and 3 <= record["error"]["step"] <= 5
    assert "divergence_factor=10" in record["error"]["message"]


# --- one validation for the command line and the study -----------------------------------------

BAD_VALUES = [("alpha", -16), ("alpha", 0), ("rank", 0), ("dropout", 1.0), ("lr", 0), ("batch_size", 0), ("warmup_ratio", 1.0),
              ("max_length", 0), ("max_steps", -1), ("precision", "fp8"), ("score_split", "test"), ("targets", []),
              ("extract", "yes"), ("divergence_factor", -1), ("memory_limit_mb", -5)]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_the_command_line_and_the_study_refuse_the_same_values_with_the_same_words(key, value, capsys):
    variant = "full" if key == "extract" else "lora"
    assert run.main(["--task", "sst2", "--variant", variant, "--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]) == 2
    refused = capsys.readouterr().err.removeprefix("lorabench.run: error: ").strip()
    assert key in refused
    config = {"tasks": ["sst2"], "variants": [variant], "seeds": [0], "settings": {"default": {"hparams": {key: value}}}}
    validate(config, str(ROOT / "config" / "schema.yaml"))  # the schema checks structure; values are resolve_hparams' alone
    with pytest.raises(ConfigError) as caught:
        study.expand(config)
    assert str(caught.value).endswith(refused)


# --- rank against the layers' shapes, when the DAG is built -------------------------------------


def test_a_rank_no_layer_takes_fails_the_dry_run_naming_the_layer(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["hparams"]["variant"]["lora"]["rank"] = 1_000_000_000
    with pytest.raises(ConfigError, match=r"variant 'lora'.*rank=1000000000 is larger than layer .* allows; set rank <= \d+"):
        study.expand(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(tmp_path / "bad.yaml")], capture_output=True, text=True)
    assert result.returncode != 0 and "rank=1000000000 is larger than layer" in result.stdout + result.stderr


def test_a_rank_the_variant_may_exceed_passes_the_shape_check():
    """VeRA's rank is not bound by a layer (RANK_BOUND_BY_LAYER = False): the paper's r=1024
    exceeds RoBERTa-base's 768."""
    assert run.resolve_hparams("sst2", "vera", {"rank": 1024})["rank"] == 1024


# --- memory, estimated before the model loads ----------------------------------------------------


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", sorted(variants.REGISTRY))
def test_the_meta_device_estimate_of_activations_is_what_a_real_step_saves(family, name):
    """The estimate's activations come from a forward on the meta device; on a real model the
    same forward saves the same bytes (each storage once; weights excluded): exactly on BERT,
    11% more on the tiny Llama (its meta forward keeps apart storages that the real one shares)."""
    variant = variants.REGISTRY[name]
    cfg = variants.make_config(variant, {**variants.config_fields(variant), **variant.TEST_CONFIG})
    real = build_model(family)
    adapters.attach(real, variant, cfg)
    real.train()
    batch = {"input_ids": torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 1, 0])}
    measured = measure.saved_activation_bytes(real, batch)
    with torch.device("meta"):
        skeleton = type(real)(real.config)
        adapters.attach(skeleton, variant, cfg)
    estimated = sizing._saved_bytes(skeleton, (4, 8), causal=False)
    assert estimated == measured if family == "bert" else estimated == pytest.approx(measured, rel=0.15)


def test_a_run_that_cannot_fit_is_refused_before_its_model_loads(tmp_path, capsys, monkeypatch):
    """The issue's case: VeRA at rank 100000 trained 5 steps for 880 s in 6.6 GB on SST-2's
    short batches; its longest batch there would need 29 GB of activations (here, on a few
    short sentences, a few GB: the limit is set below that)."""
    data = tiny_sst2(tmp_path / "data")
    loaded = []
    monkeypatch.setattr(run, "load_model", lambda *args: loaded.append(args))
    out = tmp_path / "seed0.json"
    code = run.main(["--task", "sst2", "--variant", "vera", "--out", str(out), "--set", "rank=100000", "max_steps=5",
                     f"data_dir={data}", "memory_limit_mb=2000"])
    error = capsys.readouterr().err
    assert code == 2 and not loaded and not out.exists()
    assert re.search(r"sst2/vera needs at least [\d,]+ MB \(parameters [\d,]+ MB, .* activations of its longest batch, 32 x \d+ tokens: "
                     r"[\d,]+ MB\), more than the 2,000 MB of memory_limit_mb; lower rank, batch_size or max_length", error), error
    assert run.main(["--task", "sst2", "--variant", "lora", "--out", str(out), "--set", "max_steps=5", f"data_dir={data}",
                     "memory_limit_mb=100"]) == 2
    assert "sst2/lora needs at least" in capsys.readouterr().err and not loaded


def test_the_record_keeps_the_estimate_beside_the_measurement(tmp_path):
    data = tiny_sst2(tmp_path / "data")
    record = run.execute("sst2", "lora", 0, "default", {"max_steps": 2, "batch_size": 4, "threads": 1, "data_dir": str(data)},
                         tmp_path / "seed0.json")
    estimate = record["params"]["memory_estimate"]
    assert estimate["batch"][0] == 4 and estimate["total_mb"] > estimate["parameters_mb"] > 80  # MiniLM's 22.7M floats
    assert estimate["activation_mb"] == pytest.approx(record["train"]["activation_mb"], rel=0.05)
