"""A run sized before its model loads: its layers' shapes and its memory, from the config alone.

The model is built on PyTorch's meta device, where every tensor has a shape and a dtype and no
storage: SmolLM2-135M so built takes a fraction of a second and no memory. On it:

- ``check_shapes``: every adapted layer takes the variant's config (a rank no larger than the
  layer, where the variant is bound by it), what ``adapters.attach`` checks, for each run of a
  study when the DAG is built, so that no job fails on it an hour in;
- ``estimate``: the adapter attached on the meta device and one training forward of a run's
  longest batch, counting what autograd saves for the backward (the activations); with the
  model's parameters and buffers, and the gradient and AdamW's two moments of each trainable
  parameter. Not counted: the framework, the data, the evaluation, extraction's W0 copy, the
  allocator's slack; so the estimate is a floor, and ``guard`` refuses a run only when that
  floor exceeds the device's memory: a run that cannot fit, not one that might not.

A model whose config cannot be read here (a Hub id offline) is not sized; its job sizes itself.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import tasks
from lorabench import adapters, models

ADAM_COPIES = 3  # per trainable parameter: its gradient and AdamW's two moments
QUANTIZED_BYTES = {"nf4": 0.5, "int8": 1.0}  # bytes a quantized base weight takes (lorabench.quantize)


class SizingError(ValueError):
    """A run that cannot fit the device; the message has the estimate and the fix."""


@functools.lru_cache(maxsize=None)
def _config(model: str, source: str, num_labels: int | None):
    try:
        return models.load_config(model, source, **({"num_labels": num_labels} if num_labels else {}))
    except (OSError, ValueError):  # a Hub id with no network, say: the job sizes itself once it has the model
        return None


def skeleton(task: tasks.Task, hparams: dict[str, Any]) -> nn.Module | None:
    """The run's model on the meta device, built from its config alone; None when the config
    cannot be read here."""
    config = _config(hparams["model"], hparams["model_source"], None if task.causal else task.num_labels)
    if config is None:
        return None
    model_class = transformers.AutoModelForCausalLM if task.causal else transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        return model_class.from_config(config)


def check_shapes(task: tasks.Task, variant, variant_cfg, hparams: dict[str, Any]) -> None:
    """Raise ``AdapterError`` when a layer of the run's model refuses the variant's config."""
    model = _skeleton_shapes(task.name, hparams["model"], hparams["model_source"])
    if model is not None:
        adapters.check_attachable(model, variant, variant_cfg, hparams["targets"])


@functools.lru_cache(maxsize=None)
def _skeleton_shapes(task_name: str, model: str, source: str) -> nn.Module | None:
    """One skeleton per task and model, for shape checks (which never change it)."""
    return skeleton(tasks.get(task_name), {"model": model, "model_source": source})


@dataclass
class Estimate:
    parameters_mb: float  # weights and buffers, the base's quantized where it is
    optimizer_mb: float  # gradients and AdamW's moments of the trainable parameters
    activation_mb: float | None  # what one training forward of the longest batch saves; None: the model would not run on meta
    batch: tuple[int, int]  # (sequences, tokens each) of that batch

    @property
    def total_mb(self) -> float:
        return self.parameters_mb + self.optimizer_mb + (self.activation_mb or 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"parameters_mb": self.parameters_mb, "optimizer_mb": self.optimizer_mb, "activation_mb": self.activation_mb,
                "total_mb": self.total_mb, "batch": list(self.batch)}


def estimate(task: tasks.Task, variant, variant_cfg, hparams: dict[str, Any], batch: tuple[int, int]) -> Estimate | None:
    """The run's memory floor (see the module's docstring) for a training step on a ``batch`` of
    (sequences, tokens each), or None when the model's config cannot be read here. The random
    number generators are left as they were, so sizing a run changes none of its results."""
    with torch.random.fork_rng(devices=[]):
        model = skeleton(task, hparams)
        if model is None:
            return None
        with torch.device("meta"):
            adapters.attach(model, variant, variant_cfg, hparams["targets"])
        parameters = sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])
        quantized = QUANTIZED_BYTES.get(hparams["quantize_base"])
        if quantized is not None:
            weights = [layer.weight for layer in adapters.find_targets(model, hparams["targets"]).values()]
            parameters -= sum(weight.numel() * (weight.element_size() - quantized) for weight in weights)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        activations = _saved_bytes(model, batch, task.causal)
    return Estimate(parameters / 2**20, ADAM_COPIES * trainable / 2**20, None if activations is None else activations / 2**20, batch)


def _saved_bytes(model: nn.Module, batch: tuple[int, int], causal: bool) -> int | None:
    """Bytes autograd saves in one training forward on the meta device (``measure.
    saved_activation_bytes`` on storages that have no address), or None when the model or the
    variant cannot run there. No attention mask (the model would read its values to decide
    whether it needs one) and, for a decoder, the output layer at one position only (the
    run's keeps the positions that predict a labelled token): a floor, as the estimate is."""
    owned = {tensor.untyped_storage()._cdata for tensor in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in owned:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    input_ids = torch.zeros(batch, dtype=torch.long, device="meta")
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            if causal:
                logits = model(input_ids=input_ids, logits_to_keep=1).logits[:, -1]
                nn.functional.cross_entropy(logits.float(), input_ids[:, -1])
            else:
                model(input_ids=input_ids, labels=torch.zeros(batch[0], dtype=torch.long, device="meta"))
    except (RuntimeError, NotImplementedError):
        return None
    return sum(storages.values())


def device_memory_mb(device: torch.device) -> float:
    """What the device has: a GPU's total memory; on CPU, the machine's memory or the
    container's limit (cgroup v2), whichever is smaller."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        total = min(total, int(limit.read_text()))
    return total / 2**20


def guard(found: Estimate | None, device: torch.device, limit_mb: float, what: str) -> None:
    """Refuse the run when its memory floor exceeds ``limit_mb`` (0: the device's memory)."""
    if found is None:
        return
    limit = limit_mb or device_memory_mb(device)
    if found.total_mb <= limit:
        return
    activations = "not estimated" if found.activation_mb is None else f"{found.activation_mb:,.0f} MB"
    raise SizingError(
        f"{what} needs at least {found.total_mb:,.0f} MB (parameters {found.parameters_mb:,.0f} MB, gradients and AdamW moments "
        f"{found.optimizer_mb:,.0f} MB, activations of its longest batch, {found.batch[0]} x {found.batch[1]} tokens: {activations}), "
        f"more than the {limit:,.0f} MB {'of memory_limit_mb' if limit_mb else f'{device} has'}; lower rank, batch_size or max_length "
        "(or set memory_limit_mb, if the device has more than it tells)")
