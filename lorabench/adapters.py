"""Attach a variant to a model with forward hooks; save, load and merge the result.

The base model's modules are never replaced: each targeted ``nn.Linear`` gets the tensors
its variant asks for (``lora_*`` parameters and frozen buffers), a ``lora_config`` attribute
and a forward hook that returns ``variant.forward(layer, x, y)``. Task heads that the base
checkpoint lacks (``classifier``, ``score``) are trained by every variant, as PEFT's
``modules_to_save`` does. Adapters are stored as safetensors with their config as JSON
metadata and a sha256 of the tensors, which loading checks: loading never unpickles anything,
and refuses a file whose bytes changed or that holds NaN or inf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorabench import files, library, quantize

FORMAT_VERSION = "2"  # 2: a sha256 of the tensors in the metadata (CHECKSUM_KEY)
READABLE_VERSIONS = ("1", "2")  # version 1 files have no checksum; load still refuses their NaN and inf
CHECKSUM_KEY = "tensors_sha256"
CORRUPT_FIX = "the file is corrupt; retrain or re-export it"
TASK_HEADS = ("classifier", "score")


class AdapterError(ValueError):
    """A bad adapter file or an adapter that does not fit the model."""


@dataclass
class Attachment:
    """What attach() did to a model, kept on it so save/merge/detach can undo or store it.

    ``overrides`` maps a layer name to the config fields that differ there (an extracted
    adapter's rank per layer, PEFT's ``rank_pattern``); each layer's own config is its
    ``lora_config``."""

    variant: ModuleType
    config: Any
    layers: dict[str, nn.Linear]
    heads: list[str]
    hooks: list[Any] = field(default_factory=list)
    shared: nn.Module | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def task_heads(model: nn.Module) -> list[str]:
    return [name for name in TASK_HEADS if isinstance(getattr(model, name, None), nn.Module)]


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task heads' tensors by ``head.key`` (live, not copies): what a library entry keeps of its step."""
    return {f"{head}.{key}": tensor for head in task_heads(model) for key, tensor in getattr(model, head).state_dict().items()}


def find_targets(model: nn.Module, targets: str | list[str]) -> dict[str, nn.Linear]:
    """Linear layers to adapt: ``"all-linear"`` (every one outside the task and LM heads) or a
    list of name suffixes (``["query", "value"]`` matches ``...attention.self.query``)."""
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    excluded = tuple(task_heads(model)) + ("lm_head",)
    found = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module_name.split(".")[0] in excluded:
            continue
        if targets == "all-linear" or any(re.search(rf"(^|\.){re.escape(t)}$", module_name) for t in targets):
            found[module_name] = module
    if not found:
        raise AdapterError(
            f"targets={targets!r} matches no linear layer of {type(model).__name__}; "
            "use 'all-linear' or name suffixes such as ['query', 'value']"
        )
    return found


def attach(
    model: nn.Module,
    variant: ModuleType,
    cfg: Any,
    targets: str | list[str] = "all-linear",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Attachment:
    """Freeze the base (unless the variant trains it), add the variant's tensors and hooks.

    ``overrides`` gives some layers other config values (``{"...query": {"rank": 3}}``).
    Everything that can be checked is checked before the model changes; if a variant's own
    initialisation fails midway, the model is restored, so a failed attach changes nothing.
    """
    if hasattr(model, "lorabench_attachment"):
        raise AdapterError("the model already has an adapter attached; detach() or merge() it first")
    trains_base = getattr(variant, "TRAINS_BASE", False)
    overrides = {name: dict(values) for name, values in (overrides or {}).items()}
    layers, layer_configs = check_attachable(model, variant, cfg, targets, overrides)

    attachment = Attachment(variant, cfg, layers, task_heads(model), overrides=overrides)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.lorabench_attachment = attachment
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(trains_base)
        for head in attachment.heads:
            getattr(model, head).requires_grad_(True)
        for layer_name, layer in layers.items():
            _add_tensors(layer, variant, layer_configs[layer_name])
        if hasattr(variant, "group_init"):
            attachment.shared = _shared_container(model, layers)
            variant.group_init(attachment.shared, layers, cfg)
        for layer_name, layer in layers.items():
            if hasattr(variant, "init"):
                variant.init(layer, layer_configs[layer_name])
            attachment.hooks.append(layer.register_forward_hook(_hook(variant), with_kwargs=True))
    except BaseException:
        _undo(model, requires_grad)
        raise
    return attachment


def check_attachable(model: nn.Module, variant: ModuleType, cfg: Any, targets: str | list[str] = "all-linear",
                     overrides: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, nn.Linear], dict[str, Any]]:
    """The layers ``attach`` would adapt and each one's config, checked against the layer's
    shape; raises ``AdapterError`` naming the layer and the fix. Reads shapes only, so it runs
    on a model built on the meta device (``lorabench.sizing``) as well as on a loaded one."""
    trains_base = getattr(variant, "TRAINS_BASE", False)
    layers = {} if trains_base and not variant.param_specs(1, 1, cfg) else find_targets(model, targets)
    layer_configs = _layer_configs(variant, cfg, layers, overrides or {})
    for layer_name, layer in layers.items():
        _check_layer(layer_name, layer, variant, layer_configs[layer_name])
    return layers, layer_configs


def _layer_configs(variant: ModuleType, cfg: Any, layers: dict[str, nn.Linear], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each layer's config: the adapter's, with that layer's overrides applied."""
    unknown_layers = sorted(set(overrides) - set(layers))
    if unknown_layers:
        raise AdapterError(f"overrides name layers that are not targets: {unknown_layers[:3]}")
    fields = {f.name for f in dataclasses.fields(cfg)}
    configs = {}
    for name in layers:
        unknown = sorted(set(overrides.get(name, {})) - fields)
        if unknown:
            raise AdapterError(f"overrides for layer {name}: {unknown} are not fields of variants/{variant.name}.py's Config")
        configs[name] = dataclasses.replace(cfg, **overrides[name]) if name in overrides else cfg
    return configs


def _undo(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Remove a failed or refused attachment and give back every requires_grad flag."""
    _remove(model, attachment_of(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad[name])


def _shared_container(model: nn.Module, layers: dict[str, nn.Linear]) -> nn.Module:
    """One module, ``model.lora_shared``, holds tensors shared by all adapted layers, so each is
    stored, moved and optimised once; every layer reaches it as ``layer.lora_shared``."""
    shared = nn.Module()
    model.lora_shared = shared
    for layer in layers.values():
        layer.__dict__["lora_shared"] = shared  # a reference, not a second registration
    return shared


def _check_layer(layer_name: str, layer: nn.Linear, variant: ModuleType, cfg: Any) -> None:
    d_out, d_in = layer.out_features, layer.in_features
    rank = getattr(cfg, "rank", None)
    if rank is not None and getattr(variant, "RANK_BOUND_BY_LAYER", True) and rank > min(d_in, d_out):
        raise AdapterError(
            f"rank={rank} is larger than layer {layer_name} ({d_out} x {d_in}) allows; "
            f"set rank <= {min(d_in, d_out)} or narrow 'targets'"
        )
    bad = [key for key in variant.param_specs(d_in, d_out, cfg) if not key.startswith("lora_")]
    if bad:
        raise AdapterError(f"variants/{variant.name}.py: tensors {bad} must be named lora_*")


def _add_tensors(layer: nn.Linear, variant: ModuleType, cfg: Any) -> None:
    d_out, d_in = layer.out_features, layer.in_features  # a quantized weight is stored packed
    dtype = layer.weight.dtype if layer.weight.is_floating_point() else torch.float32
    layer.lora_config = cfg
    for key, spec in variant.param_specs(d_in, d_out, cfg).items():
        tensor = torch.empty(spec.shape, dtype=dtype, device=layer.weight.device)
        with torch.no_grad():
            spec.init(tensor)
        if spec.trainable:
            layer.register_parameter(key, nn.Parameter(tensor))
        else:
            layer.register_buffer(key, tensor, persistent=spec.persistent)


def _hook(variant: ModuleType):
    def hook(layer, args, kwargs, output):
        return variant.forward(layer, args[0] if args else kwargs["input"], output)

    return hook


def attachment_of(model: nn.Module) -> Attachment:
    try:
        return model.lorabench_attachment
    except AttributeError:
        raise AdapterError("no adapter is attached to this model; call attach() first") from None


def detach(model: nn.Module) -> nn.Module:
    """Remove hooks and adapter tensors, giving back the base model as it was before attach."""
    attachment = attachment_of(model)
    if hasattr(attachment.variant, "restore"):
        for layer in attachment.layers.values():
            attachment.variant.restore(layer)
    return _remove(model, attachment)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each layer's dW into W and detach: same outputs, no hooks, no extra cost."""
    attachment = attachment_of(model)
    if attachment.layers and not hasattr(attachment.variant, "delta_weight"):
        raise AdapterError(f"variant {attachment.variant.name!r} defines no delta_weight(), so it cannot be merged")
    quantized = [name for name, layer in attachment.layers.items() if not layer.weight.is_floating_point()]
    if quantized:
        raise AdapterError(f"layer {quantized[0]} holds a quantized weight, which a float update cannot be added to; "
                           "load the adapter onto the unquantized base model and merge there")
    for layer in attachment.layers.values():
        if hasattr(attachment.variant, "restore"):
            attachment.variant.restore(layer)
        layer.weight += attachment.variant.delta_weight(layer).to(layer.weight.dtype)
    return _remove(model, attachment)


def _remove(model: nn.Module, attachment: Attachment) -> nn.Module:
    for handle in attachment.hooks:
        handle.remove()
    for layer in attachment.layers.values():
        for key in [k for k in list(layer._parameters) + list(layer._buffers) if k.startswith("lora_")]:
            delattr(layer, key)
        layer.__dict__.pop("lora_config", None)
        layer.__dict__.pop("lora_shared", None)
    if attachment.shared is not None:
        del model.lora_shared
    del model.lorabench_attachment
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor needed to rebuild the fine-tuned model from its base checkpoint."""
    attachment = attachment_of(model)
    if getattr(attachment.variant, "TRAINS_BASE", False):
        return {name: p.detach() for name, p in model.named_parameters()}
    state = {}
    owners = dict(attachment.layers)
    if attachment.shared is not None:
        owners["lora_shared"] = attachment.shared
    for owner_name, owner in owners.items():
        for key, tensor in owner.state_dict(keep_vars=True).items():
            if key.startswith("lora_"):
                state[f"{owner_name}.{key}"] = tensor.detach()
    for head in attachment.heads:
        for key, tensor in getattr(model, head).state_dict().items():
            state[f"{head}.{key}"] = tensor.detach()
    return state


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


STORAGES = ("float", "int8")
INT8_SCALE = ".int8_scale"  # suffix of the per-row scale stored beside an int8 matrix


def save(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None, storage: str = "float") -> Path:
    """Write the adapter as safetensors. ``storage="int8"`` stores each adapter matrix as int8
    with one float32 scale (absmax / 127) per row or column, whichever are fewer (per rank
    component for LoRA's A and B), about a quarter of float32's bytes; task heads and vectors
    stay in float. ``load`` dequantizes."""
    if storage not in STORAGES:
        raise AdapterError(f"storage={storage!r}: use one of {', '.join(STORAGES)}")
    attachment = attachment_of(model)
    metadata = {
        "format": "lorabench-adapter",
        "format_version": FORMAT_VERSION,
        "variant": attachment.variant.name,
        "config": json.dumps(asdict(attachment.config)),
        "targets": json.dumps(list(attachment.layers)),
        "overrides": json.dumps(attachment.overrides, sort_keys=True),
        **(extra_metadata or {}),
    }
    tensors = {name: tensor.contiguous().cpu() for name, tensor in adapter_state(model).items()}
    metadata["storage"] = storage
    if storage == "int8":
        tensors = _to_int8(tensors)
    metadata[CHECKSUM_KEY] = tensor_checksum(tensors)
    with files.atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return Path(path)


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: ``save`` stores it
    so that ``load`` notices bytes that changed on disk, which safetensors itself never checks."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_integrity(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse NaN or inf in a float tensor (a flipped byte, or an adapter saved from a diverged
    run, would give NaN logits) and tensors whose checksum differs from the one ``save`` stored."""
    for name in sorted(tensors):
        if not tensors[name].is_floating_point():
            continue
        bad = int((~torch.isfinite(tensors[name])).sum())
        if bad:
            raise AdapterError(f"{path}: tensor {name} holds {bad} NaN or infinite values; {CORRUPT_FIX}")
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None and metadata["format_version"] != "1":
        raise AdapterError(f"{path}: metadata lacks {CHECKSUM_KEY}, which format_version {metadata['format_version']} "
                           f"always has; {CORRUPT_FIX}")
    if expected is not None and tensor_checksum(tensors) != expected:
        raise AdapterError(f"{path}: the tensors' sha256 differs from {CHECKSUM_KEY} in its metadata (bytes changed "
                           f"after it was written); {CORRUPT_FIX}")


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path}: not a readable safetensors adapter ({error})") from error
    if metadata.get("format") != "lorabench-adapter":
        raise AdapterError(f"{path}: metadata lacks format=lorabench-adapter; not a lorabench adapter file")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise AdapterError(f"{path}: adapter format_version {metadata.get('format_version')!r}; this lorabench reads "
                           f"{', '.join(READABLE_VERSIONS)}: load it with the lorabench version that wrote it")
    return metadata


def load_library(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an extraction library (``seedN.library.safetensors``): step, triggers,
    training loss, validation score, ranks and explained variance per layer, seconds; read from
    its header alone. A truncated or corrupt file raises ``AdapterError`` naming it."""
    try:
        return library.read_header(path)["entries"]
    except library.LibraryError as error:
        raise AdapterError(str(error)) from error


def load(model: nn.Module, path: str | Path, step: int | None = None, best: bool = False, rank: int | None = None,
         task: str | None = None) -> Attachment:
    """Attach the adapter stored at ``path`` to a freshly loaded base ``model``.

    The file is read and checked (finite tensors, the checksum ``save`` stored) before the model
    is touched, then against the model before anything is copied; a bad file raises
    ``AdapterError`` naming it and leaves the model as it was. From an extraction library, name
    the entry: ``step=N``, or ``best=True`` (the best validation score; ties go to the earlier
    step); ``rank`` loads it at a fixed rank (one of its ``library_ranks``) instead of its
    threshold's, and ``task`` refuses an entry extracted on another task. The entry's task head
    (as it was at its step) is loaded too.
    """
    import variants  # here, not at the top: variant files import this module

    if library.HEADER_KEY in _raw_metadata(path):
        return _load_library_entry(model, path, step, best, rank, task)
    if step is not None or best or rank is not None:
        raise AdapterError(f"{path}: an adapter file holds one adapter; step, best and rank choose an entry of an extraction library")
    metadata = read_metadata(path)
    try:
        variant = variants.get(metadata["variant"])
        cfg = variant.Config(**json.loads(metadata["config"]))
        targets = json.loads(metadata["targets"])
        overrides = json.loads(metadata.get("overrides", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{path}: bad adapter metadata ({error})") from error
    missing_layers = sorted(set(targets) - {name for name, _ in model.named_modules()})
    if missing_layers:
        raise AdapterError(f"{path}: the model has no layers {missing_layers[:3]}; was the adapter trained on another model?")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path}: corrupt adapter file ({error})") from error
    check_integrity(path, stored, metadata)
    if metadata.get("storage", "float") == "int8":
        stored = _from_int8(stored)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        attachment = attach(model, variant, cfg, targets=targets or "all-linear", overrides=overrides)
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{path}: {error}") from error
    try:
        expected = adapter_state(model)
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        if missing or unexpected:
            raise AdapterError(f"{path}: adapter tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, tensor in expected.items():
            if tensor.shape != stored[key].shape:
                raise AdapterError(f"{path}: tensor {key} has shape {tuple(stored[key].shape)}, the model needs {tuple(tensor.shape)}")
    except AdapterError:
        _undo(model, requires_grad)
        raise
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(stored[key])
        if hasattr(variant, "after_load"):
            for layer in attachment.layers.values():
                variant.after_load(layer)
    return attachment


def _raw_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path}: not a readable safetensors adapter or library ({error}); the file is truncated or corrupt") from error


def _load_library_entry(model: nn.Module, path: str | Path, step: int | None, best: bool, rank: int | None, task: str | None) -> Attachment:
    """One entry of an extraction library on ``model``, with its head; refused with the reason
    when it was extracted from another model or task."""
    try:
        header, entries = library.read(path)
        entry = library.choose(entries, step, best, header.get("higher_is_better", True), path)
    except library.LibraryError as error:
        raise AdapterError(str(error)) from error
    if header.get("base") == "nf4" and not any(quantize.is_quantized(layer) for layer in find_targets(model, "all-linear").values()):
        raise AdapterError(f"{path}: its adapters were extracted against an NF4 base (extract.base: nf4) and fit only that base; "
                           "quantize the model first: quantize.quantize_base(model, 'nf4')")
    if task is not None and header.get("task") not in (None, task):
        raise AdapterError(f"{path}: entries extracted on task {header['task']!r}, not {task!r}; load a library of {task!r}")
    if rank is None or rank in header.get("library_ranks", []):
        ranks = entry.ranks_at(rank)
    else:
        raise AdapterError(f"{path}: rank {rank} is not among its library_ranks {header.get('library_ranks', [])}; "
                           "load the threshold's adapter (rank=None) or extract with extract.library_ranks")
    wanted = head_tensors(model)
    if set(wanted) != set(entry.head) or any(wanted[key].shape != entry.head[key].shape for key in wanted):
        raise AdapterError(f"{path}: the entry's task head ({', '.join(f'{k} {tuple(v.shape)}' for k, v in entry.head.items()) or 'none'}) "
                           f"does not fit the model's ({', '.join(f'{k} {tuple(v.shape)}' for k, v in wanted.items()) or 'none'}); "
                           "it was extracted on another task or model")
    attachment = library.attach_factors(model, entry.factors, ranks, where=str(path))
    with torch.no_grad():
        for key, tensor in entry.head.items():
            wanted[key].copy_(tensor)
    return attachment


def _to_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if tensor.ndim == 2 and tensor.is_floating_point() and ".lora_" in f".{name}":
            along = 1 if tensor.shape[0] <= tensor.shape[1] else 0
            scale = tensor.float().abs().amax(dim=along, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
            out[name] = torch.round(tensor.float() / scale).to(torch.int8)
            out[name + INT8_SCALE] = scale
        else:
            out[name] = tensor
    return out


def _from_int8(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in stored.items():
        if name.endswith(INT8_SCALE):
            continue
        scale = stored.get(name + INT8_SCALE)
        out[name] = tensor.float() * scale if scale is not None else tensor
    return out


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def export_peft(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the attached adapter in PEFT's LoRA format (``adapter_model.safetensors`` and
    ``adapter_config.json``), loadable with ``peft.PeftModel.from_pretrained``.

    Only variants that declare ``PEFT_LORA = True`` (the update is ``(alpha / r) B A`` on an
    unchanged W) can be exported. Per-layer ranks become ``rank_pattern`` and
    ``alpha_pattern``; task heads are ``modules_to_save``.
    """
    attachment = attachment_of(model)
    variant = attachment.variant
    if not getattr(variant, "PEFT_LORA", False):
        raise AdapterError(f"variant {variant.name!r} is not a plain LoRA update (variants/{variant.name}.py sets no "
                           "PEFT_LORA = True), so PEFT's LoRA format cannot express it; merge() it instead")
    cfg = attachment.config
    heads = {f"{head}.{key}": tensor for head in attachment.heads for key, tensor in getattr(model, head).state_dict().items()}
    return write_peft(folder, {name: (layer.lora_A, layer.lora_B) for name, layer in attachment.layers.items()}, heads, cfg.rank, cfg.alpha,
                      {name: values["rank"] for name, values in attachment.overrides.items() if "rank" in values},
                      {name: values["alpha"] for name, values in attachment.overrides.items() if "alpha" in values},
                      base_model_name_or_path, cfg.dropout)


def write_peft(folder: str | Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], heads: dict[str, torch.Tensor], rank: int,
               alpha: float, rank_pattern: dict[str, int], alpha_pattern: dict[str, float], base_model_name_or_path: str | None,
               dropout: float = 0.0) -> Path:
    """PEFT's LoRA folder: ``layers`` (module name -> (lora_A (r, in), lora_B (out, r))) at ``rank`` and
    ``alpha`` except where the patterns say otherwise (PEFT scales each by alpha / r), the task
    heads' tensors (``head.key``) as ``modules_to_save``; a sequence classifier with heads, else a causal LM."""
    tensors = {}
    for name, (A, B) in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().contiguous().cpu()
    for key, tensor in heads.items():
        tensors[f"base_model.model.{key}"] = tensor.detach().contiguous().cpu()
    modules_to_save = sorted({key.split(".")[0] for key in heads})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if modules_to_save else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    folder = Path(folder)
    with files.atomic_path(folder / PEFT_WEIGHTS) as temporary:
        save_file(tensors, temporary, metadata={"format": "pt"})
    files.write_text_atomic(folder / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
