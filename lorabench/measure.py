"""Measurements that belong in every run record: size, memory and throughput.

Peak memory is the CUDA allocator's maximum on GPU and the process's peak resident set size
on CPU (tracemalloc does not see tensor storage). Since one run is one process, the peak
belongs to that run alone; on Linux it is reset when training starts (``/proc/self/clear_refs``)
so that loading and tokenizing the data set do not mask what the variant itself costs.
Throughput counts non-padding tokens and excludes warm-up steps.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def parameter_counts(model: nn.Module) -> dict[str, int]:
    parameters = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "total": sum(p.numel() for p in parameters),
    }


def file_bytes(path: str | Path | None) -> int | None:
    return Path(path).stat().st_size if path is not None and Path(path).exists() else None


PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif PROC_CLEAR_REFS.exists():
        gc.collect()
        _return_freed_heap_to_os()
        PROC_CLEAR_REFS.write_text("5")  # resets VmHWM, the peak RSS, to the current RSS


def _return_freed_heap_to_os() -> None:
    """Without this, training reuses pages freed by data loading and its memory never shows."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(megabytes, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    if PROC_STATUS.exists():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "cpu_peak_rss"
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return kilobytes * scale / 2**20, "cpu_peak_rss"


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor],
                           loss: Callable[[nn.Module, dict], torch.Tensor] = lambda model, batch: model(**batch).loss) -> int:
    """Bytes autograd keeps from one forward pass for the backward pass: the activation memory
    a variant costs, exactly and on any device (peak RSS on CPU is too coarse to tell
    variants apart). Each storage counts once; the model's own weights and buffers, which
    autograd saves by reference, are not activations and do not count. Run it in the context
    the training forward runs in: under bf16 autocast the saved tensors are bf16, and the
    bf16 copies of the weights that autograd keeps count too (they live until the backward).
    With non-reentrant gradient checkpointing only each checkpointed layer's inputs are saved
    (torch saves them as ordinary saved tensors, so they count); the backward then recomputes
    one layer's activations at a time, which this does not count. ``loss`` is the training
    loss's function (lorabench.train.task_loss), which decides what the output layer keeps."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        value = loss(model, batch)
    del value
    return sum(storages.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Counts samples and tokens over timed steps; the first ``warmup_steps`` are not timed.

    ``pause``/``resume`` bracket work that is not training (evaluation), so that tokens/s
    describes training alone.
    """

    def __init__(self, device: torch.device, warmup_steps: int):
        self.device = device
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.seconds = 0.0
        self._timing = False
        self._since: float | None = None

    def begin(self) -> None:
        if self.warmup_steps == 0:
            self._start()

    def step_done(self, samples: int, tokens: int) -> None:
        """Call after each optimizer step with what that step consumed."""
        self.steps += 1
        if self._timing:
            self.samples += samples
            self.tokens += tokens
        elif self.steps == self.warmup_steps:
            self._start()

    def _start(self) -> None:
        synchronize(self.device)
        self._timing = True
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        if self._timing and self._since is None:
            self._since = time.perf_counter()

    def state(self) -> dict[str, float | int | bool]:
        """The counters so far, for a checkpoint; call it paused."""
        return {"steps": self.steps, "samples": self.samples, "tokens": self.tokens, "seconds": self.seconds, "timing": self._timing}

    def restore(self, state: dict[str, float | int | bool]) -> None:
        """Continue from a checkpoint's counters (then ``resume`` starts the clock again): the
        resumed run's tokens/s covers the timed steps of both processes."""
        self.steps, self.samples, self.tokens, self.seconds = state["steps"], state["samples"], state["tokens"], state["seconds"]
        self._timing = state["timing"]

    def summary(self) -> dict[str, float | int | None]:
        """Throughput over the timed steps; None (not measured) when no step was timed, as in a
        run no longer than its warm-up, so that no table shows 0 tokens/s as a measurement."""
        self.pause()
        timed_steps = max(self.steps - self.warmup_steps, 0)
        measured = timed_steps > 0 and self.seconds > 0
        return {
            "timed_steps": timed_steps,
            "timed_s": self.seconds if measured else None,
            "tokens_per_s": self.tokens / self.seconds if measured else None,
            "samples_per_s": self.samples / self.seconds if measured else None,
        }
