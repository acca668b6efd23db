"""The extraction library: one adapter per extraction of a full fine-tune, kept with what the
run knew at that step, in one safetensors file beside the record (``seedN.library.safetensors``).

Each entry holds, per extracted layer, the factors B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T of the
update dW = W_t - W0 at the extraction's step, up to rank R = max(the rank the explained-variance
``threshold`` picks, the largest of ``library_ranks``): the threshold's adapter is the first
r_threshold columns, a fixed-rank adapter r <= R the first r (truncated SVDs nest). Beside them:
the step, the triggers that fired, the training loss, the validation score when validation ran
at that step, the rank and explained variance per layer, the seconds the extraction and the
forming of U and V took, and the task head as it was at that step: a full fine-tune trains its
head too, and an adapter extracted at step t is only meaningful with the head of step t (a later
head was fitted to a later body).

``keep`` bounds the entries: ``all``, ``last:K`` (the K latest) or ``every:K`` (the 1st, K+1-th,
... extraction, and always the latest). The file's header holds the entries as JSON
(``lorabench.library``), so ``load_library`` lists them without reading a tensor; nothing is
unpickled. A sha256 over the tensors, checked on load, catches bytes changed on disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorabench import files

FORMAT = "lorabench-library"
FORMAT_VERSION = "1"
HEADER_KEY = "lorabench.library"


class LibraryError(ValueError):
    """A library file that cannot be read or used; the message names the file and the reason."""


def parse_keep(keep: str) -> tuple[str, int]:
    """``all``, ``none``, ``last:K`` or ``every:K`` as (policy, K); ValueError naming the fix otherwise."""
    if keep in ("all", "none"):
        return keep, 0
    policy, _, count = keep.partition(":")
    if policy in ("last", "every") and count.isdigit() and int(count) >= 1:
        return policy, int(count)
    raise ValueError(f"extract.keep={keep!r}: use all, none, last:K or every:K with K >= 1 (last:3 keeps the three latest adapters)")


def factor_flops(d_out: int, d_in: int, width: int, formed: int, rank: int) -> int:
    """Floating-point operations of forming a randomized extraction's U and V (``extract.ritz_vectors``:
    the eigenvectors of the q x q Gram matrix, about 9 q^3; V = basis W, 2 n q^2; U = Q W at all
    ``formed`` = max_rank columns, 2 m q formed) and the factors B, A of ``rank`` (scaling by
    sqrt(S), (m + n) rank). An exact SVD has U and V already."""
    return 9 * width**3 + 2 * d_in * width**2 + 2 * d_out * width * formed + (d_out + d_in) * rank


@dataclass
class Entry:
    """One adapter of the library: its factors (layer -> (B, A), rank R) and what is known of it."""

    index: int  # the extraction's number in the run, from 0
    step: int
    triggers: list[str]
    loss: float
    validation: float | None
    ranks: dict[str, int]  # the threshold's rank per layer
    explained: dict[str, float]  # the explained variance at that rank
    seconds: float  # the extraction's SVDs
    factor_seconds: float  # forming U, V and the factors of this entry
    factor_flops: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    head: dict[str, torch.Tensor] = field(repr=False)  # the task head's tensors at this step
    scores: dict[str, float] = field(default_factory=dict)  # the adapter's own validation score, by "threshold" or "rank8"...

    def ranks_at(self, rank: int | None) -> dict[str, int]:
        """Rank per layer: the threshold's (None), or ``rank`` capped by what each layer stores."""
        if rank is None:
            return self.ranks
        return {name: min(rank, int(B.shape[1])) for name, (B, _) in self.factors.items()}

    def about(self) -> dict[str, Any]:
        """The entry's JSON for the file header and the record."""
        return {"index": self.index, "step": self.step, "triggers": self.triggers, "loss": self.loss, "validation": self.validation,
                "ranks": self.ranks, "explained": self.explained, "stored_rank": {name: int(b.shape[1]) for name, (b, _) in self.factors.items()},
                "seconds": self.seconds, "factor_seconds": self.factor_seconds, "factor_flops": self.factor_flops, "scores": self.scores}


class Library:
    """The adapters a run's extractions produced, bounded by ``keep``."""

    def __init__(self, keep: str, threshold: float, min_rank: int, max_rank: int, library_ranks: tuple[int, ...] = (),
                 higher_is_better: bool = True):
        self.policy, self.count = parse_keep(keep)
        self.keep, self.threshold, self.min_rank, self.max_rank = keep, threshold, min_rank, max_rank
        self.higher_is_better = higher_is_better
        self.library_ranks = tuple(library_ranks)
        self.entries: list[Entry] = []
        self.extractions = 0

    def add(self, step: int, triggers: list[str], loss: float, validation: float | None, spectra: dict, head: dict[str, torch.Tensor],
            seconds: float, widths: dict[str, int]) -> Entry:
        """Form the adapter of this extraction from its spectra (parameter name -> ``extract.Spectrum``)
        and keep it, dropping what ``keep`` no longer keeps. ``widths``: each matrix's sketch width
        (0 for an exact SVD), which prices forming U and V."""
        started = time.perf_counter()
        factors, ranks, explained, flops = {}, {}, {}, 0
        for name, found in spectra.items():
            rank, ev = found.rank_for(self.threshold, self.min_rank, self.max_rank)
            stored = min(len(found.S), max(rank, *self.library_ranks)) if self.library_ranks else rank
            B, A = found.factors(stored)
            factors[name] = (B.detach().to("cpu", copy=True), A.detach().to("cpu", copy=True))
            ranks[name], explained[name] = rank, ev
            if widths.get(name):
                flops += factor_flops(B.shape[0], A.shape[1], widths[name], len(found.S), stored)
        entry = Entry(self.extractions, step, list(triggers), float(loss), validation, ranks, explained, seconds,
                      time.perf_counter() - started, flops, factors, {key: value.detach().to("cpu", copy=True) for key, value in head.items()})
        self.extractions += 1
        self.entries.append(entry)
        self.entries = [kept for kept in self.entries if self._keeps(kept)]
        return entry

    def _keeps(self, entry: Entry) -> bool:
        newest = entry.index == self.extractions - 1
        if self.policy == "last":
            return entry.index >= self.extractions - self.count
        if self.policy == "every":
            return entry.index % self.count == 0 or newest
        return True

    def nbytes(self) -> int:
        """Bytes the kept entries hold in memory (factors and heads)."""
        return sum(t.numel() * t.element_size() for entry in self.entries
                   for t in [*(x for pair in entry.factors.values() for x in pair), *entry.head.values()])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The kept entries' tensors by file key: ``{index}/{layer}.lora_B`` and ``.lora_A``, ``{index}/head/{key}``."""
        out = {}
        for entry in self.entries:
            for name, (B, A) in entry.factors.items():
                layer = name.removesuffix(".weight")
                out[f"{entry.index}/{layer}.lora_B"], out[f"{entry.index}/{layer}.lora_A"] = B.contiguous(), A.contiguous()
            for key, tensor in entry.head.items():
                out[f"{entry.index}/head/{key}"] = tensor.contiguous()
        return out

    def header(self, about: dict[str, str]) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "keep": self.keep, "threshold": self.threshold,
                "library_ranks": list(self.library_ranks), "higher_is_better": self.higher_is_better, "extractions": self.extractions, **about,
                "entries": [entry.about() for entry in self.entries]}

    def save(self, path: str | Path, about: dict[str, str]) -> Path:
        """Write the library (``about``: model, task, the record it belongs to) atomically."""
        from lorabench import adapters

        tensors = self.tensors()
        metadata = {HEADER_KEY: json.dumps(self.header(about)), adapters.CHECKSUM_KEY: adapters.tensor_checksum(tensors)}
        with files.atomic_path(path) as temporary:
            save_file(tensors, temporary, metadata=metadata)
        return Path(path)

    # A checkpoint (lorabench/checkpoint.py) keeps the library whole: its JSON and its tensors.
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.header({}), {f"extract.library.{key}": tensor for key, tensor in self.tensors().items()}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        stored = {key.removeprefix("extract.library."): tensor for key, tensor in tensors.items() if key.startswith("extract.library.")}
        self.extractions = state["extractions"]
        self.entries = [_entry(about, stored) for about in state["entries"]]


def _entry(about: dict[str, Any], stored: dict[str, torch.Tensor]) -> Entry:
    """An entry from its header JSON and the file's tensors."""
    prefix = f"{about['index']}/"
    factors = {f"{layer}.weight": (stored[f"{prefix}{layer}.lora_B"], stored[f"{prefix}{layer}.lora_A"])
               for layer in (name.removesuffix(".weight") for name in about["ranks"])}
    head = {key.removeprefix(f"{prefix}head/"): tensor for key, tensor in stored.items() if key.startswith(f"{prefix}head/")}
    return Entry(about["index"], about["step"], about["triggers"], about["loss"], about["validation"], about["ranks"], about["explained"],
                 about["seconds"], about["factor_seconds"], about["factor_flops"], factors, head, about.get("scores", {}))


def read_header(path: str | Path) -> dict[str, Any]:
    """The library's header (its entries without tensors), checked."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise LibraryError(f"{path}: not a readable safetensors library ({error}); the file is truncated or corrupt: "
                           "rerun the fine-tune that wrote it") from error
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise LibraryError(f"{path}: no {HEADER_KEY} header; not an extraction library (an adapter file loads with adapters.load)") from error
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise LibraryError(f"{path}: format {header.get('format')!r} version {header.get('format_version')!r}; this lorabench reads "
                           f"{FORMAT} version {FORMAT_VERSION}")
    return header


def read(path: str | Path) -> tuple[dict[str, Any], list[Entry]]:
    """The header and every entry, tensors checked against the checksum the file stores."""
    from lorabench import adapters

    header = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
    except (SafetensorError, OSError) as error:
        raise LibraryError(f"{path}: corrupt library file ({error}); rerun the fine-tune that wrote it") from error
    bad = sorted(name for name, tensor in stored.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))
    if bad:
        raise LibraryError(f"{path}: tensors {bad[:3]} hold NaN or infinite values; the file is corrupt or its run diverged")
    if adapters.tensor_checksum(stored) != metadata.get(adapters.CHECKSUM_KEY):
        raise LibraryError(f"{path}: the tensors' sha256 differs from the one in its header (bytes changed after it was written); "
                           "the file is corrupt: rerun the fine-tune that wrote it")
    try:
        return header, [_entry(about, stored) for about in header["entries"]]
    except (KeyError, TypeError) as error:
        raise LibraryError(f"{path}: entry tensors missing ({error}); the file is corrupt: rerun the fine-tune that wrote it") from error


def choose(entries: list[Entry], step: int | None = None, best: bool = False, higher_is_better: bool = True,
           path: str | Path = "library") -> Entry:
    """The entry at ``step``, or with ``best`` the best validation score (ties: the earlier step):
    the adapter's own at the threshold where the run scored its entries, else the fine-tune's at that step."""
    if (step is None) == (not best):
        raise LibraryError(f"{path}: name one entry: step=N or best=True")
    if best:
        scored = [(entry.scores.get("threshold", entry.validation), entry) for entry in entries]
        scored = [(value, entry) for value, entry in scored if value is not None and value == value]  # NaN: not a score
        if not scored:
            raise LibraryError(f"{path}: no entry has a validation score (validation did not run at an extraction step); "
                               "choose one with step=N")
        sign = 1 if higher_is_better else -1
        return max(scored, key=lambda pair: (sign * pair[0], -pair[1].step))[1]
    for entry in entries:
        if entry.step == step:
            return entry
    raise LibraryError(f"{path}: no entry at step {step}; its steps: {', '.join(str(entry.step) for entry in entries)}")


def attach_factors(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: dict[str, int],
                   dtype: torch.dtype = torch.float32, where: str = "extracted adapter"):
    """Attach ``factors`` (parameter name -> (B, A)) to a base ``model`` as a LoRA adapter with
    scale 1 and ``ranks`` (parameter name -> r <= the factors' rank) per layer; embedding tables,
    which LoRA's hooks do not adapt, are left out. A layer the model lacks, or of another shape,
    raises ``AdapterError`` naming ``where`` and leaves the model as it was."""
    import variants
    from lorabench import adapters

    linear = {}
    for name, (B, A) in factors.items():
        layer = name.removesuffix(".weight")
        try:
            module = model.get_submodule(layer)
        except AttributeError as error:
            raise adapters.AdapterError(f"{where}: the model has no layer {layer}; it was extracted from another model") from error
        if isinstance(module, torch.nn.Embedding):
            continue
        if not isinstance(module, torch.nn.Linear) or (B.shape[0], A.shape[1]) != (module.out_features, module.in_features):
            raise adapters.AdapterError(f"{where}: layer {layer} is {getattr(module, 'out_features', '?')} x {getattr(module, 'in_features', '?')} "
                                        f"here and {B.shape[0]} x {A.shape[1]} in the adapter; it was extracted from another model")
        linear[layer] = (B, A, ranks[name])
    top = max(rank for _, _, rank in linear.values())
    lora = variants.get("lora")
    cfg = variants.make_config(lora, {"rank": top, "alpha": float(top)})
    overrides = {name: {"rank": rank, "alpha": float(rank)} for name, (_, _, rank) in linear.items() if rank != top}
    attachment = adapters.attach(model, lora, cfg, targets=list(linear), overrides=overrides)
    with torch.no_grad():
        for name, (B, A, rank) in linear.items():
            layer = attachment.layers[name]
            layer.lora_B.copy_(B[:, :rank].to(layer.lora_B.device, dtype))
            layer.lora_A.copy_(A[:rank].to(layer.lora_A.device, dtype))
    return attachment
