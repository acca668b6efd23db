"""Fine-tuning variants: the contract every method file follows, and its automatic discovery.

A variant is one module in this package (``variants/<name>.py``). It never replaces modules:
the engine (``lorabench.adapters``) registers the tensors the variant asks for, named
``lora_*``, on each targeted ``nn.Linear`` and a forward hook that calls the variant's
``forward(layer, x, y)`` to return the layer's new output.

Required module attributes
    ``name``               the registry key (the file name, by convention)
    ``Config``             a dataclass derived from ``VariantConfig``
    ``IDENTITY_AT_INIT``   True when the hooked model equals the base model at step 0
    ``TEST_CONFIG``        overrides the contract tests use on their tiny model
    ``param_specs(d_in, d_out, cfg) -> dict[str, ParamSpec]``   tensors added to each layer
    ``forward(layer, x, y) -> Tensor``   the layer's output; ``y`` is the base output ``W x + b``
    ``trainable_count(layer_shapes, cfg) -> int``   the docstring's formula, written out
        independently of ``param_specs`` so the contract tests can hold one against the other

Optional
    ``TRAINS_BASE = True``         the base weights are trained too (full fine-tuning)
    ``TRAIN_DEFAULTS``             recommended training hyper-parameters (e.g. ``{"lr": 4e-3}``),
        with their source in the docstring; a study config still overrides them
    ``init(layer, cfg)``           data-dependent initialisation after the tensors exist
    ``group_init(shared, layers, cfg)``  tensors shared across layers: register them on the
        module ``shared`` (``model.lora_shared``); layers reach it as ``layer.lora_shared``
    ``restore(layer)``             undo what ``init`` or training did to the base weight (detach,
        merge); ``RESTORES_BASE_EXACTLY = False`` says it does so only up to float rounding
    ``after_load(layer)``          rebuild what the stored tensors imply once ``adapters.load`` has
        copied them in (Delta-LoRA's base update); ``RELOADS_EXACTLY = False`` says the rebuilt
        model equals the trained one only up to float rounding
    ``delta_weight(layer) -> Tensor``    the dense update dW (d_out x d_in) for merge/export,
        relative to the base weight as loaded (before ``init``)
    ``param_groups(model, lr, cfg) -> list[dict]``   optimizer groups, each ``{"params", "lr"}``
        (LoRA+'s learning-rate ratio); the engine adds weight decay to every group alike
    ``loss_penalty(model) -> Tensor``    a regulariser added to the training loss (AdaLoRA)
    ``on_step(model, step, max_steps)``  called after every optimizer step, before gradients are
        cleared (Delta-LoRA's weight update, AdaLoRA's rank budget, which reads the gradients)
    ``report(model) -> dict``     what the run record should keep about the trained adapter
        (AdaLoRA's final rank per layer), stored as ``params.variant_report``
    ``QUANTIZABLE_BASE = False``   the method reads or writes W, so ``quantize_base`` (QLoRA's
        4-/8-bit frozen base) is refused for it; the docstring says why
    ``PEFT_LORA = True``           the update is LoRA's (alpha / r) B A on an unchanged W, stored
        as ``lora_A`` and ``lora_B``: ``adapters.export_peft`` writes it in PEFT's LoRA format
    ``RANK_BOUND_BY_LAYER = False``  the rank may exceed a layer's smaller dimension (VeRA's
        shared random projections); otherwise such a rank is refused before training

Adding a variant: copy ``_template.py`` to ``<name>.py`` and fill it in. Nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from lorabench.registry import lookup, public_modules

REQUIRED = ("name", "Config", "IDENTITY_AT_INIT", "TEST_CONFIG", "param_specs", "forward", "trainable_count")


@dataclass
class VariantConfig:
    """Knobs every adapter-style variant shares; variants subclass this with their own."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class ParamSpec:
    """One tensor a variant adds to a layer: its shape, how to fill it, and whether it trains.

    Frozen tensors are registered as buffers, so they never reach the optimizer; they are saved
    with the adapter unless ``persistent=False`` (tensors regenerated from a seed at load).
    """

    shape: tuple[int, ...]
    init: Callable[[torch.Tensor], Any]
    trainable: bool = True
    persistent: bool = True


def autocast_off(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device, for a computation that must stay in its own precision;
    a no-op on the meta device, which has no autocast and where lorabench.sizing runs variants."""
    if tensor.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def zeros(tensor: torch.Tensor) -> None:
    torch.nn.init.zeros_(tensor)


def kaiming_uniform(tensor: torch.Tensor) -> None:
    """nn.Linear's own default initialisation, which LoRA uses for A (as PEFT does)."""
    torch.nn.init.kaiming_uniform_(tensor, a=5**0.5)


def _discover() -> dict[str, ModuleType]:
    found = {}
    for stem, module in public_modules(__name__, __path__):
        missing = [attribute for attribute in REQUIRED if not hasattr(module, attribute)]
        if missing:
            raise TypeError(f"variants/{stem}.py lacks {missing}; see variants/_template.py")
        if module.name in found:
            raise TypeError(f"variants/{stem}.py: the name {module.name!r} is taken already")
        found[module.name] = module
    return dict(sorted(found.items()))


REGISTRY: dict[str, ModuleType] = _discover()


def get(name: str) -> ModuleType:
    return lookup(REGISTRY, name, "variant")


def config_fields(variant: ModuleType) -> dict[str, Any]:
    """Default values of a variant's config, by field name."""
    return {field.name: getattr(variant.Config(), field.name) for field in dataclasses.fields(variant.Config)}


def make_config(variant: ModuleType, values: dict[str, Any]) -> VariantConfig:
    """Build a variant's config from a flat dict, ignoring keys that belong to the engine."""
    known = config_fields(variant)
    cfg = variant.Config(**{key: value for key, value in values.items() if key in known})
    if isinstance(cfg, VariantConfig):
        if not isinstance(cfg.rank, int) or cfg.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {cfg.rank!r} (set rank=8, say)")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout!r}")
        if not cfg.alpha > 0:
            raise ValueError(f"alpha must be > 0 (the update is scaled by alpha / rank), got {cfg.alpha!r} (set alpha=16, say)")
    return cfg
