"""Parasitic extraction in anyone's training: a plain-loop API and a Hugging Face Trainer callback.

The extractor (lorabench/extract.py) needs nothing of lorabench's own loop: the weights after
each optimizer step, the step number, and the loss and validation scores its triggers read.
Three calls bring it into a plain PyTorch loop::

    extraction = Extraction(model, {"interval": 50, "threshold": 0.9})  # W0, before the first step
    for step in range(1, max_steps + 1):
        ...; optimizer.step(); optimizer.zero_grad()
        extraction.after_step(step, max_steps, loss.item())
    extraction.save("extracted")

and one to a ``transformers.Trainer``: ``Trainer(..., callbacks=[ParasiticExtraction({"interval":
50}, "extracted")])``. ``save`` (the callback calls it when training ends) writes:

- ``library.safetensors``: every kept adapter with its step, triggers, loss, validation score,
  ranks and task head (``adapters.load_library`` lists it, ``adapters.load`` attaches one);
- ``adapter/``: the last adapter (or the best by validation, ``which="best"``) at the threshold as
  a PEFT LoRA folder, ``adapter_model.safetensors`` and ``adapter_config.json`` with a
  ``rank_pattern`` (and ``alpha_pattern`` = the rank, so every layer's scale is 1), the task head
  as ``modules_to_save``: ``peft.PeftModel.from_pretrained(base_model, "extracted/adapter")`` gives
  the base model plus the truncated update. What the adapter leaves out: biases, norms and
  embeddings the fine-tune changed (only the targeted linear layers' updates are extracted);
- ``extraction.json``: each extraction, and the overhead: seconds and FLOPs of the SVDs and of
  forming the library's factors, against the training loop's seconds (and FLOPs where known).

The Trainer callback reads the loss the Trainer logs (the plateau trigger sees one loss per
``logging_steps``; its window counts logs) and the metric it evaluates (``metric_for_best_model``,
by default ``eval_loss``; ``greater_is_better`` as the Trainer reads it). Gradient accumulation
counts optimizer steps, as the Trainer does; mixed precision changes nothing (dW is formed in
float32). W0 is the weights as training starts (``on_train_begin``: after ``model_init``, on the
device and in the dtype they train in); a resumed run, whose checkpoint's weights are loaded by
then, keeps the snapshot taken when the Trainer was built (``on_init_end``), so give the callback
to the Trainer's constructor rather than ``add_callback`` when resuming. Each Trainer checkpoint
keeps the callback's state (``parasitic_extraction.safetensors``). A run stopped early extracts
at the step it stopped. Under DDP every process holds the same weights after a step: rank 0
extracts and saves, the others do nothing. Sharded weights (FSDP, DeepSpeed ZeRO-3, DTensors)
are refused when training starts: a shard's W - W0 is not the layer's update, and gathering every
layer at every extraction is not an overhead this design can claim.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorabench import adapters, extract, files, library

STATE_FILE = "parasitic_extraction.safetensors"  # inside each Trainer checkpoint folder
STATE_KEY = "lorabench.extraction_state"


class ExtractionError(ValueError):
    """A training setup the extractor cannot follow, or a save it cannot make; the message says why and what to do."""


def base_checkpoint(model: nn.Module) -> Path | None:
    """The local folder ``model`` was loaded from, whose safetensors W0 can be memory-mapped from
    (``extract.take_snapshot`` checks every tensor against the loaded one); None otherwise."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        return Path(name)
    try:  # a Hub id whose files are in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"], local_files_only=True)) if name else None
    except Exception:  # not cached, not a Hub id, or no hub client: W0 is copied instead
        return None


def save_peft(entry: library.Entry, folder: str | Path, base_model: str, rank: int | None = None) -> Path:
    """``entry`` (at its threshold's ranks, or ``rank``) as a PEFT LoRA adapter folder: each layer's
    rank in ``rank_pattern`` and its alpha equal to it (scale 1, as extracted), the entry's task
    head as ``modules_to_save``."""
    ranks = {name.removesuffix(".weight"): r for name, r in entry.ranks_at(rank).items()}
    layers = {layer: (A[: ranks[layer]], B[:, : ranks[layer]]) for layer, (B, A) in
              ((name.removesuffix(".weight"), factors) for name, factors in entry.factors.items())}
    top = max(ranks.values())
    Path(folder).mkdir(parents=True, exist_ok=True)
    return adapters.write_peft(folder, layers, entry.head, top, float(top), ranks, {name: float(r) for name, r in ranks.items()}, base_model)


class Extraction:
    """Parasitic extraction in a plain training loop: create it before the first optimizer step
    (it snapshots W0), call :meth:`after_step` after each, :meth:`save` at the end."""

    def __init__(self, model: nn.Module, config: dict[str, Any] | extract.ExtractConfig | None = None, *, seed: int = 0,
                 higher_is_better: bool = True, warmup_steps: int = 0, base: str | Path | None = None):
        cfg = config if isinstance(config, extract.ExtractConfig) else extract.ExtractConfig.from_dict(dict(config or {}))
        if cfg.include_embeddings:
            raise ExtractionError("extract.include_embeddings: a PEFT LoRA folder holds linear layers' adapters; leave it off here")
        if cfg.keep == "none":
            raise ExtractionError("extract.keep=none: the adapter written at the end comes from the library; keep all, last:K or every:K")
        self.model = model
        # The base model's Hub id or folder: PEFT's base_model_name_or_path, and W0's memory map where it is a local folder.
        self.base = str(base) if base is not None else getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        checkpoint = Path(base) if base is not None and Path(base).is_dir() else base_checkpoint(model)
        device = next(model.parameters()).device
        self.extractor = extract.Extractor(model, cfg, checkpoint, device, warmup_steps, seed, higher_is_better)
        self.higher_is_better = higher_is_better
        self.loop_seconds = 0.0  # training time, the extractions' own seconds left out
        # The plain loop's time is the time between calls, from creation; the Trainer callback times
        # its steps itself (on_step_begin to on_step_end), leaving evaluation and logging out.
        self.last_call: float | None = time.perf_counter()

    def set_warmup(self, warmup_steps: int) -> None:
        """The initial trigger's step (the end of warm-up), when it is known only once training starts."""
        self.extractor.initial_step = self.extractor.cfg.initial_step or max(1, warmup_steps)

    def _timed(self, extract_now) -> bool:
        """Run ``extract_now``; the loop's time since the last call is counted, the extraction's is not."""
        if self.last_call is not None:
            self.loop_seconds += time.perf_counter() - self.last_call
        extracted = extract_now()
        if self.last_call is not None:
            self.last_call = time.perf_counter()
        return extracted

    def after_step(self, step: int, max_steps: int, loss: float | None = None, validation: float | None = None) -> bool:
        """After optimizer step ``step`` (from 1) of ``max_steps``: extract when a trigger fires or at
        the last step. ``loss`` feeds the plateau trigger, ``validation`` the validation trigger
        (None: not measured at this step). True when it extracted."""
        return self._timed(lambda: self.extractor.after_step(step, max_steps, loss, validation, self.higher_is_better))

    def after_validation(self, step: int, validation: float) -> bool:
        """A validation score measured after ``after_step(step, ...)`` was called."""
        return self._timed(lambda: self.extractor.after_validation(step, validation, self.higher_is_better))

    def finish(self, step: int, loss: float | None = None) -> bool:
        """The last extraction of a run that stopped before ``max_steps`` (early stopping), unless
        ``step`` extracted already. True when it extracted."""
        extractions = self.extractor.extractions
        if extractions and extractions[-1]["step"] == step:
            return False
        return self._timed(lambda: bool(self.extractor.extract(step, ["final"], loss)))

    def follow(self, model: nn.Module) -> None:
        """W0 onto the device and dtype of each weight as training holds it (a resumed run whose
        weights moved or were cast after the snapshot), and the sketches' generator with them."""
        extractor = self.extractor
        weights = dict(model.named_parameters())
        for name in extractor.matrices:
            now = weights[name]
            extractor.matrices[name] = now
            stored = extractor.snapshot.weights[name]
            if stored.device != now.device or stored.dtype != now.dtype:
                extractor.snapshot.weights[name] = stored.to(now.device, now.dtype)
        device = next(iter(extractor.matrices.values())).device
        if device != extractor.device:
            extractor.device = device
            extractor.generator = torch.Generator(device=device).manual_seed(extractor.generator.initial_seed())
            extractor.differences.clear()

    def overhead(self, train_flops: float | None = None) -> dict[str, Any]:
        """Seconds (and FLOPs, given the training's) of extraction against the loop's."""
        return self.extractor.summary(self.loop_seconds, train_flops or 0.0)["overhead"]

    def save(self, folder: str | Path, which: str = "last", rank: int | None = None, train_flops: float | None = None) -> Path:
        """Write ``library.safetensors``, the ``which`` (last or best) adapter as a PEFT folder
        ``adapter/`` (at the threshold, or at ``rank``) and ``extraction.json`` into ``folder``."""
        kept = self.extractor.library
        if not kept.entries:
            raise ExtractionError(f"nothing extracted yet: call after_step(step, max_steps, ...) up to step == max_steps before save({str(folder)!r})")
        if which not in ("last", "best"):
            raise ExtractionError(f"save(which={which!r}): use 'last' or 'best' (the highest validation score, ties to the earlier step)")
        entry = kept.entries[-1] if which == "last" else self._best(kept)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        kept.save(folder / "library.safetensors", {"model": self.base, "task": type(self.model).__name__})
        save_peft(entry, folder / "adapter", self.base, rank)
        summary = self.extractor.summary(self.loop_seconds, train_flops or 0.0)
        summary["adapter"] = {"which": which, "step": entry.step, "rank": rank, "mean_rank": sum(entry.ranks_at(rank).values()) / len(entry.ranks)}
        files.write_text_atomic(folder / "extraction.json", json.dumps(summary, indent=2, default=float) + "\n")
        return folder

    def _best(self, kept: library.Library) -> library.Entry:
        try:
            return library.choose(kept.entries, best=True, higher_is_better=self.higher_is_better)
        except library.LibraryError as error:
            raise ExtractionError("save(which='best'): no kept adapter has a validation score; pass validation= to after_step, "
                                  "or save the last one") from error

    # A checkpoint keeps the extractor's state (lorabench/checkpoint.py keeps the same for lorabench's own runs).
    def save_state(self, path: str | Path) -> None:
        state, tensors = self.extractor.state()
        state["loop_seconds"] = self.loop_seconds
        with files.atomic_path(path) as temporary:
            save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, temporary,
                      metadata={STATE_KEY: json.dumps(state, default=float)})

    def load_state(self, path: str | Path) -> None:
        with safe_open(str(path), framework="pt") as stored:
            state = json.loads(stored.metadata()[STATE_KEY])
            tensors = {key: stored.get_tensor(key) for key in stored.keys()}
        self.extractor.load_state(state, tensors)
        self.loop_seconds = state["loop_seconds"]


def refuse_sharded(args, model: nn.Module | None = None) -> None:
    """Raise ``ExtractionError`` for training that shards the weights (FSDP, by the Trainer's
    arguments or accelerate's launcher; DeepSpeed ZeRO-3; tensor-parallel DTensors)."""
    import os

    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ExtractionError("FSDP shards the weights: each process holds part of every layer, so W - W0 there is not the layer's "
                              "update. Extract from DDP or single-process training, or from the saved full checkpoints "
                              "(python -m lorabench.extract).")
    deepspeed = getattr(args, "hf_deepspeed_config", None)
    if deepspeed is not None and getattr(deepspeed, "is_zero3", lambda: False)():
        raise ExtractionError("DeepSpeed ZeRO-3 shards the weights: W - W0 on one process is not the layer's update. Use ZeRO-1 or "
                              "ZeRO-2 (whole weights on every process), or extract from the saved full checkpoints.")
    if model is not None and any(type(parameter).__name__ == "DTensor" for parameter in model.parameters()):
        raise ExtractionError("the model's weights are DTensors (tensor parallelism or FSDP2): each process holds a shard, so "
                              "W - W0 there is not the layer's update. Extract from DDP or single-process training.")


class ParasiticExtraction(transformers.TrainerCallback):
    """A ``transformers.Trainer`` callback: extracts on the configured triggers as the Trainer
    trains and writes the library, a PEFT adapter folder and the overhead into ``output_dir``
    when training ends (see the module's docstring). ``resume_from``: the checkpoint folder a
    resumed run starts from, when it is not ``output_dir/checkpoint-<step>``."""

    def __init__(self, config: dict[str, Any] | None = None, output_dir: str | Path = "extracted", which: str = "last",
                 base: str | Path | None = None, resume_from: str | Path | None = None):
        self.config = extract.ExtractConfig.from_dict(dict(config or {}))
        if which not in ("last", "best"):
            raise ExtractionError(f"ParasiticExtraction(which={which!r}): use 'last' or 'best' (the best validation score)")
        self.output_dir, self.which, self.base, self.resume_from = Path(output_dir), which, base, resume_from
        self.extraction: Extraction | None = None
        self.pending: int | None = None  # a step whose loss or evaluation the Trainer logs after on_step_end
        self.loss: float | None = None
        self.step_started: float | None = None

    def _start(self, args, state, model) -> None:
        if model is not None and state.is_world_process_zero:
            higher = bool(args.greater_is_better) if args.greater_is_better is not None else False
            self.extraction = Extraction(model, self.config, seed=args.seed, higher_is_better=higher, base=self.base)
            self.extraction.last_call = None  # the callback times the steps

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._start(args, state, model)  # W0 before a resumed run loads its checkpoint's weights

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded(args, model)
        if not state.is_world_process_zero:
            return
        if state.global_step == 0:
            # W0 as training starts: the model model_init built, on the device and in the dtype it trains in.
            self.extraction = None
            self._start(args, state, model)
        elif self.extraction is None:
            raise ExtractionError("resuming a Trainer run: the callback was added after the Trainer was built, so it never saw W0; "
                                  "pass it in Trainer(callbacks=[...])")
        else:
            self.extraction.follow(model)
            folder = Path(self.resume_from) if self.resume_from else Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (folder / STATE_FILE).is_file():
                raise ExtractionError(f"resuming at step {state.global_step}: {folder / STATE_FILE} is missing, so the extractions "
                                      "before it are lost; resume from a checkpoint the callback saved (ParasiticExtraction("
                                      "resume_from=...) names one outside output_dir), or start again")
            self.extraction.load_state(folder / STATE_FILE)
        self.extraction.set_warmup(args.get_warmup_steps(state.max_steps))

    def _flush(self, state) -> None:
        """The pending step, whose log or evaluation never came, before the weights move on."""
        if self.pending is not None:
            self.extraction.after_step(self.pending, state.max_steps, self.loss)
            self.pending, self.loss = None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.extraction is None:
            return
        self._flush(state)
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.extraction is None:
            return
        if self.step_started is not None:
            self.extraction.loop_seconds += time.perf_counter() - self.step_started
            self.step_started = None
        # The Trainer logs the loss and evaluates after on_step_end: wait for them where they come.
        if control.should_log or control.should_evaluate:
            self.pending = state.global_step
            return
        self.extraction.after_step(state.global_step, state.max_steps, None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.extraction is None or not logs:
            return
        if "loss" in logs and self.pending == state.global_step:
            if control.should_evaluate:
                self.loss = logs["loss"]  # the evaluation comes next
            else:
                self.extraction.after_step(state.global_step, state.max_steps, logs["loss"])
                self.pending = None
        overhead = self.extraction.overhead()
        if state.log_history and overhead["seconds"]:
            state.log_history[-1].update(extraction_seconds=round(overhead["seconds"], 4),
                                         extraction_percent_time=round(overhead["percent_time"] or 0.0, 4))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.extraction is None or not metrics:
            return
        name = args.metric_for_best_model or "loss"
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
        if self.pending == state.global_step:
            self.extraction.after_step(state.global_step, state.max_steps, self.loss, value)
            self.pending, self.loss = None, None
        elif value is not None:
            self.extraction.after_validation(state.global_step, value)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.extraction is None:
            return
        self._flush(state)
        if control.should_training_stop:  # stopped before max_steps (early stopping): the weights it stops with
            self.extraction.finish(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.extraction is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.extraction.save_state(folder / STATE_FILE)
        else:
            warnings.warn(f"ParasiticExtraction: no checkpoint folder {folder} to keep the extraction state in; a run resumed from "
                          "this checkpoint needs ParasiticExtraction(resume_from=...) naming the folder the state is in", stacklevel=2)

    def on_train_end(self, args, state, control, **kwargs):
        if self.extraction is None:
            return
        self._flush(state)
        self.extraction.finish(state.global_step)  # nothing when the last step extracted, as it does
        self.extraction.save(self.output_dir, self.which, train_flops=float(state.total_flos) or None)
