"""Checkpoint and resume: a run killed after a checkpoint and restarted ends exactly where an
uninterrupted run ends (metrics, curves, adapter); a checkpoint of another config is refused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import variants
from lorabench import adapters, checkpoint, records, run
from lorabench.train import TrainConfig, train
from tests.conftest import build_model
from tests.helpers import tiny_sst2
from tests.test_variant_contract import file_of

ROOT = Path(__file__).resolve().parent.parent
TINY_TASK = SimpleNamespace(name="tiny", causal=False)


def tiny_examples(count: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(1, 100, (length,), generator=generator).tolist(), "labels": index % 2}
            for index, length in enumerate(lengths)]


def train_tiny(variant, family: str, checkpointer, steps: int = 6) -> tuple[dict, dict]:
    """A fresh seeded tiny model with the variant attached, trained by the real loop in train
    mode (dropout on); its train section and every tensor it would checkpoint."""
    model = build_model(family)
    variant_cfg = variants.make_config(variant, {**variants.config_fields(variant), **variant.TEST_CONFIG})
    adapters.attach(model, variant, variant_cfg)
    cfg = TrainConfig(lr=5e-3, batch_size=4, max_steps=steps, warmup_ratio=0.2, log_every=1, timing_warmup_steps=1,
                      bucket_batches=2, precision="fp32", checkpoint_every=3)
    section = train(model, variant, variant_cfg, TINY_TASK, tiny_examples(), [], cfg, 0, torch.device("cpu"), 0, None, checkpointer)
    return section, {name: tensor.detach().clone() for name, tensor in checkpoint.model_tensors(model).items()}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", sorted(variants.REGISTRY))
def test_every_variant_resumes_exactly(name, family, tmp_path):
    """The checkpoint at step 3 of 6 is what a run killed after step 3 leaves; a run started
    afresh from it ends with the same losses and tensors as the run that wrote it."""
    variant = variants.REGISTRY[name]
    record = tmp_path / "seed0.json"
    first, first_tensors = train_tiny(variant, family, checkpoint.Checkpointer(record, "h", 3, torch.device("cpu"), "fp32"))
    assert first["resumed_from_step"] is None and checkpoint.read_state(checkpoint.path_for(record))["step"] == 3
    resumed, resumed_tensors = train_tiny(variant, family, checkpoint.Checkpointer(record, "h", 3, torch.device("cpu"), "fp32"))
    assert resumed["resumed_from_step"] == 3
    # A checkpoint keeps the trainable parameters, every lora_* tensor, and W where QUANTIZABLE_BASE = False (model_tensors).
    keep = (f"{file_of(variant)} must keep all state that forward, loss_penalty and on_step carry across steps in lora_* tensors "
            "(attributes are not checkpointed), and set QUANTIZABLE_BASE = False if on_step writes W")
    assert resumed["loss_curve"] == first["loss_curve"] and len(first["loss_curve"]) == 6, (
        f"the run resumed at step 3 has other losses than the run that wrote the checkpoint: {keep}")
    assert resumed["samples"] == first["samples"] and resumed["tokens"] == first["tokens"]
    assert resumed_tensors.keys() == first_tensors.keys()
    for key, tensor in first_tensors.items():
        assert torch.equal(resumed_tensors[key], tensor), f"{key} differs after resuming at step 3: {keep}"


def command(out: Path, variant: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "lorabench.run", "--task", "sst2", "--variant", variant, "--out", str(out), "--set", *sets]


def checkpoint_step(path: Path) -> int:
    """The step of the checkpoint at ``path``; -1 while there is none, or while the running job
    replaces it between the reader's opening the file and mapping it (safetensors then sees a
    header and a file size of two different checkpoints)."""
    try:
        return checkpoint.read_state(path)["step"]
    except checkpoint.CheckpointError:
        return -1


def kill_after_checkpoint(args: list[str], env: dict, path: Path, step: int, log: Path) -> int:
    """Start the run, SIGKILL it once its checkpoint has reached ``step``; the checkpoint's step."""
    with log.open("w") as stderr:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        while checkpoint_step(path) < step:
            assert process.poll() is None, f"the run ended before a checkpoint at step {step}:\n{log.read_text()[-2000:]}"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return checkpoint.read_state(path)["step"]


def assert_same_run(resumed: dict, reference: dict) -> None:
    assert resumed["eval"]["metrics"] == reference["eval"]["metrics"]
    for key in ("loss_curve", "val_curve", "steps", "samples", "tokens", "timed_steps"):
        assert resumed["train"][key] == reference["train"][key], key
    resumed_tensors, reference_tensors = load_file(resumed["params"]["adapter_path"]), load_file(reference["params"]["adapter_path"])
    assert resumed_tensors.keys() == reference_tensors.keys()
    for key, tensor in reference_tensors.items():
        assert torch.equal(resumed_tensors[key], tensor), key


LORA = ["max_steps=16", "batch_size=4", "threads=1", "checkpoint_every=2", "log_every=1", "val_size=8", "eval_every=4",
        "timing_warmup_steps=1"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    data = tiny_sst2(tmp_path / "data")
    env = {**os.environ, "LORABENCH_DATA": str(data)}
    out = tmp_path / "r" / "seed0.json"
    saved = checkpoint.path_for(out)
    step = kill_after_checkpoint(command(out, "lora", LORA), env, saved, 4, tmp_path / "killed.log")
    assert not out.exists() and 4 <= step < 16

    # The checkpoint belongs to this configuration: another learning rate is refused, naming the file.
    assert run.main(["--task", "sst2", "--variant", "lora", "--out", str(out), "--set", *LORA, "lr=1e-3", f"data_dir={data}"]) == 2
    error = capsys.readouterr().err
    assert str(saved) in error and "config hash" in error and "delete it" in error
    assert saved.exists() and not out.exists()
    # The config hash leaves out the data folder; other training data fail the batch stream's replay.
    with pytest.raises(checkpoint.CheckpointError, match="replaying .* training data changed"):
        run.execute("sst2", "lora", 0, "default", {**run.parse_sets(LORA), "data_dir": str(tiny_sst2(tmp_path / "other", repeat=5))}, out)
    assert saved.exists() and not out.exists()

    result = subprocess.run(command(out, "lora", LORA), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {saved} at step {step}" in result.stderr
    assert not saved.exists()
    resumed = records.read(out)
    reference = run.execute("sst2", "lora", 0, "default", {**run.parse_sets(LORA), "data_dir": str(data)}, tmp_path / "ref" / "seed0.json")
    assert not checkpoint.path_for(tmp_path / "ref" / "seed0.json").exists()
    assert resumed["train"]["resumed_from_step"] == step and reference["train"]["resumed_from_step"] is None
    assert resumed["train"]["checkpoint_every"] == 2 and resumed["run"]["config_hash"] == reference["run"]["config_hash"]
    assert len(resumed["train"]["val_curve"]) == 4
    assert_same_run(resumed, reference)


# Randomized SVDs on the tiny model's matrices (exact_below 0, 6 columns), so that the resumed run
# must restore the warm-start bases and the extractor's random generator, not only its spectra.
FULL = ["max_steps=10", "batch_size=4", "threads=1", "checkpoint_every=4", "log_every=1", "timing_warmup_steps=1",
        "extract={interval: 2, max_rank: 4, eval_ranks: [2], eval_thresholds: [], svd: {exact_below: 0, oversample: 2}}"]


def test_full_run_with_extraction_resumes_exactly(tmp_path):
    data = tiny_sst2(tmp_path / "data")
    env = {**os.environ, "LORABENCH_DATA": str(data)}
    out = tmp_path / "r" / "seed0.json"
    step = kill_after_checkpoint(command(out, "full", FULL), env, checkpoint.path_for(out), 4, tmp_path / "killed.log")
    assert not out.exists() and checkpoint.read_state(checkpoint.path_for(out))["extractor"]["extractions"]
    result = subprocess.run(command(out, "full", FULL), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = records.read(out)
    reference = run.execute("sst2", "full", 0, "default", {**run.parse_sets(FULL), "data_dir": str(data)}, tmp_path / "ref" / "seed0.json")
    assert resumed["train"]["resumed_from_step"] == step
    assert_same_run(resumed, reference)
    found, expected = resumed["extraction"], reference["extraction"]
    assert [(e["step"], e["triggers"]) for e in found["extractions"]] == [(e["step"], e["triggers"]) for e in expected["extractions"]]
    assert [untimed(e) for e in found["extractions"]] == [untimed(e) for e in expected["extractions"]]
    assert found["evaluations"] == expected["evaluations"] and found["evaluations"]
    assert [untimed(e) for e in found["library"]["entries"]] == [untimed(e) for e in expected["library"]["entries"]]
    assert found["library"].get("best") == expected["library"].get("best")


def untimed(entry: dict) -> dict:
    """An extraction or library entry without its clock readings, which no two runs share."""
    return {key: untimed(value) if isinstance(value, dict) else value for key, value in entry.items()
            if key not in ("seconds", "factor_seconds")}


def test_unreadable_checkpoint_is_refused(tmp_path):
    checkpoint.path_for(tmp_path / "seed0.json").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=r"seed0.ckpt.safetensors: not a readable checkpoint .*delete it"):
        checkpoint.Checkpointer(tmp_path / "seed0.json", "h", 2, torch.device("cpu"), "fp32")
