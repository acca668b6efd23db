"""Checkpoints: a run killed part-way resumes where it stopped, to the same result.

Every ``checkpoint_every`` optimizer steps the run writes one file beside its record
(``seed0.json`` -> ``seed0.ckpt.safetensors``): the tensors a fresh start cannot rebuild from
the base model and the seed, and, as JSON in the file's metadata, the rest of the loop's
state. One file, written under a temporary name and renamed, so that a kill leaves the old
checkpoint or the new one, never half of each. Tensors go through safetensors only: nothing
is unpickled.

The tensors: every trainable parameter; every tensor named ``lora_*``, buffers included,
persistent or not (AdaLoRA's importance averages, Delta-LoRA's previous factors); the weight of
each adapted layer of a variant that reads or writes W (``QUANTIZABLE_BASE = False``: Delta-
LoRA adds to it); AdamW's moments and steps; the torch (and CUDA) random state, the batch
generator's and the extractor's, and the bases its next warm-started SVDs start from. The JSON:
the step, the curves, samples and tokens seen, the throughput counters, the seconds and peak
memory so far, the schedule, the optimizer's groups, numpy's and Python's random states, the
extractor's findings, and the config hash and precision of the run.

A restarted run whose config hash matches rebuilds and attaches its model as a fresh run does,
loads all of that, and replays the batch stream (batches are index lists drawn from a seeded
generator: drawing as many as were trained, without collating them, puts it where it was, and
the generator's saved state confirms it). On the same machine with the same threads, the
resumed run's metrics, curves and adapter equal an uninterrupted run's. Its clocks and peak
memory span both processes; the steps it times after a restart include that process's
warm-up. A checkpoint of another config hash is refused (delete it to start afresh); the run
deletes its checkpoint once the record is written. Snakemake declares only the record as a
training job's output, so it leaves a killed job's checkpoint on disk and the rerun resumes.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorabench import files, measure
from lorabench.adapters import attachment_of

FORMAT = "lorabench-checkpoint"
FORMAT_VERSION = "4"  # 2: the extractor's warm-start bases; 3: the step losses divergence is judged on, the threads; 4: the library


class CheckpointError(ValueError):
    """A checkpoint that is not this run's or cannot be read; the message names the file and the fix."""


def path_for(record: str | Path) -> Path:
    """``.../seed0.json`` -> ``.../seed0.ckpt.safetensors``."""
    return Path(record).with_suffix(".ckpt.safetensors")


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (its step, config hash, curves, ...), without its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as error:  # RuntimeError: a truncated file
        raise CheckpointError(f"{path}: not a readable checkpoint ({error}); delete it to start the run afresh") from error
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a lorabench checkpoint of format version {FORMAT_VERSION}; delete it to start the run afresh")
    return json.loads(metadata["state"])


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a fresh start does not rebuild: trainable parameters, every ``lora_*``
    tensor (buffers too, persistent or not), and the weights of the adapted layers when the
    variant reads or writes them."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update({name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" in name})
    attachment = attachment_of(model)
    if not getattr(attachment.variant, "QUANTIZABLE_BASE", True):
        tensors.update({f"{name}.weight": layer.weight for name, layer in attachment.layers.items()})
    return tensors


class Checkpointer:
    """One run's checkpoint: read when the run starts (refused when another config wrote it),
    written every ``every`` optimizer steps (0: never), removed once the record is written.
    It also keeps the run's clock and peak memory across the processes of a resumed run."""

    def __init__(self, record: str | Path, config_hash: str, every: int, device: torch.device, precision: str):
        self.path = path_for(record)
        self.config_hash, self.every, self.device, self.precision = config_hash, every, device, precision
        self.resumed = read_state(self.path) if self.path.exists() else None
        self.batch_state: torch.Tensor | None = None  # the batch generator's, once restored
        self.started = time.perf_counter()
        if self.resumed is None:
            return
        if self.resumed["config_hash"] != config_hash:
            raise CheckpointError(f"{self.path} was written by a run with config hash {self.resumed['config_hash']}, not this run's "
                                  f"{config_hash} (its hyper-parameters differ); delete it to start afresh, or rerun with the "
                                  "hyper-parameters it was written with")
        if self.resumed["precision"] != precision:
            raise CheckpointError(f"{self.path} was trained in {self.resumed['precision']}, this run on {device} uses {precision}; "
                                  f"set precision={self.resumed['precision']} or delete the checkpoint to start afresh")
        if device.type == "cpu" and self.resumed["threads"] != torch.get_num_threads():
            # Threads are machine-local, as in the record: not in the config hash, so the run resumes, but
            # a CPU sums in another order with another thread count, and the record says so.
            print(f"lorabench: warning: {self.path} was written with {self.resumed['threads']} CPU threads, this process has "
                  f"{torch.get_num_threads()}; the resumed run's results may differ from an uninterrupted run's in the last "
                  f"bits (set threads={self.resumed['threads']} to resume exactly)", file=sys.stderr, flush=True)

    def begin(self) -> float:
        """Start the run's clock; returns its start on ``time.perf_counter``'s scale, moved back by
        the seconds a resumed run had already run."""
        self.started = time.perf_counter() - (self.resumed["seconds"] if self.resumed else 0.0)
        return self.started

    def peak_memory(self) -> tuple[float, str]:
        """``measure.peak_memory``, over every process of the run."""
        megabytes, kind = measure.peak_memory(self.device)
        return max(megabytes, self.resumed["peak_memory_mb"]) if self.resumed else megabytes, kind

    def due(self, step: int, max_steps: int) -> bool:
        """Whether to checkpoint after ``step``; never after the last, which the run always
        redoes (it extracts and records the final state)."""
        return bool(self.every) and step % self.every == 0 and step < max_steps

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, batch_generator: torch.Generator,
             throughput: measure.Throughput, extractor, progress: dict[str, Any]) -> Path:
        """Write the loop's state after ``progress["step"]``: ``progress`` holds the step, samples,
        tokens and curves so far."""
        tensors = {f"model.{name}": tensor for name, tensor in model_tensors(model).items()}
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            tensors.update({f"optimizer.{index}.{key}": value for key, value in values.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        tensors["rng.batches"] = batch_generator.get_state()
        numpy_state = np.random.get_state()
        python_state = random.getstate()
        state = {
            **progress,
            "config_hash": self.config_hash,
            "precision": self.precision,
            "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - self.started,
            "peak_memory_mb": self.peak_memory()[0],
            "throughput": throughput.state(),
            "optimizer_groups": optimizer_state["param_groups"],
            "schedule": schedule.state_dict(),
            "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
            "extractor": None,
        }
        if extractor is not None:
            state["extractor"], extractor_tensors = extractor.state()
            tensors.update(extractor_tensors)
        with files.atomic_path(self.path) as temporary:
            save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, temporary,
                      metadata={"format": FORMAT, "format_version": FORMAT_VERSION, "state": json.dumps(state)})
        return self.path

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, throughput: measure.Throughput,
                extractor) -> dict[str, Any]:
        """Load the checkpoint into a run built afresh (model attached, optimizer and schedule
        made, nothing trained); returns its JSON state (step, samples, tokens, curves, ...).
        The caller replays the batch stream, then ``check_batches``."""
        print(f"lorabench: resuming from {self.path} at step {self.resumed['step']}", file=sys.stderr, flush=True)
        with safe_open(str(self.path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        expected = model_tensors(model)
        stored = {name.removeprefix("model."): tensor for name, tensor in tensors.items() if name.startswith("model.")}
        if set(stored) != set(expected) or any(stored[name].shape != tensor.shape for name, tensor in expected.items()):
            raise CheckpointError(f"{self.path}: its tensors do not fit the model this run builds (missing "
                                  f"{sorted(set(expected) - set(stored))[:3]}, unexpected {sorted(set(stored) - set(expected))[:3]}); "
                                  "delete it to start afresh")
        for name, tensor in expected.items():
            tensor.copy_(stored[name])
        optimizer_state: dict[str, Any] = {"state": {}, "param_groups": self.resumed["optimizer_groups"]}
        for name, tensor in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[key] = tensor
        optimizer.load_state_dict(optimizer_state)
        schedule.load_state_dict(self.resumed["schedule"])
        throughput.restore(self.resumed["throughput"])
        if extractor is not None:
            extractor.load_state(self.resumed["extractor"], tensors)
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        name, keys, *rest = self.resumed["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        version, internal, gauss = self.resumed["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.batch_state = tensors["rng.batches"]
        return self.resumed

    def check_batches(self, batch_generator: torch.Generator) -> None:
        """After the replay: the batch generator must be where the checkpoint left it."""
        if not torch.equal(batch_generator.get_state(), self.batch_state):
            raise CheckpointError(f"{self.path}: replaying {self.resumed['step']} steps of batches does not reach the checkpoint's "
                                  "batch stream (were the training data changed?); delete it to start afresh")

    def remove(self) -> None:
        """Delete the checkpoint (and any temporary file a kill mid-write left): the record is written."""
        self.path.unlink(missing_ok=True)
        for temporary in self.path.parent.glob(files.temporary_pattern(self.path)):
            temporary.unlink(missing_ok=True)
