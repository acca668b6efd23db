"""The training loop, in one readable pass: batches, AdamW, schedule, clipping, evaluation.

Batches are length-bucketed (examples of similar length share a batch, then batches are
shuffled) and padded per batch, so little compute goes to padding. The learning rate warms
up linearly and decays linearly to zero. A diverging loss stops training with
``DivergedError``, which the run turns into a failed record: a non-finite one, or a finite
blow-up (``diverged``: the median of the last few step losses ``divergence_factor`` times the
first step's, which is the untrained model's loss).

``precision=bf16`` runs forward passes (training and evaluation) under bf16 autocast while
the weights, gradients and AdamW's moments stay float32; ``auto`` picks it on CUDA devices
that support it. ``gradient_checkpointing`` keeps only each transformer layer's input and
recomputes the rest in the backward pass. ``checkpoint_every`` saves the loop's whole state
(lorabench/checkpoint.py) so that a killed run resumes to the same result.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lorabench import measure
from lorabench.adapters import trainable_parameters


@dataclass
class TrainConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 600
    epochs: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int = 0
    # Scoring batches of 32 examples of similar length: on one CPU thread, batches of 128 scored
    # SST-2 dev in 5.8 s against 4.8, 500 IMDB reviews in 15.7 against 13.6 and E2E's references
    # in 18.6 against 14.4 (wider activations fall out of cache, longer batches pad more).
    eval_batch_size: int = 32
    log_every: int = 10
    timing_warmup_steps: int = 5
    bucket_batches: int = 50
    precision: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    divergence_factor: float = 10.0


PRECISIONS = ("auto", "fp32", "bf16")


class DivergedError(RuntimeError):
    def __init__(self, step: int, reason: str):
        super().__init__(f"{reason} at step {step}; lower lr or raise warmup_ratio")
        self.step = step


DIVERGENCE_WINDOW = 5  # step losses whose median is compared with the first step's
DIVERGENCE_FLOOR = 1.0  # nats: a first loss near 0 would make any wobble look like a blow-up


def diverged(losses: list[float], factor: float) -> str | None:
    """Why ``losses`` (every step's, from the first) have diverged, or None. Non-finite is
    diverged at once; a finite loss when the median of the last ``DIVERGENCE_WINDOW`` (at
    least three) exceeds ``factor`` times the first step's, floored at ``DIVERGENCE_FLOOR``:
    the median ignores one spike, and the first step's loss is the untrained model's, so a
    run that is merely slow or noisy stays far below it (DeLoRA's decoder run peaks at 2.2x).
    ``factor`` 0 checks only for non-finite losses."""
    if not math.isfinite(losses[-1]):
        return f"loss is {losses[-1]}"
    window = sorted(losses[-DIVERGENCE_WINDOW:])
    if not factor or len(window) < 3:
        return None
    median, limit = window[len(window) // 2], factor * max(losses[0], DIVERGENCE_FLOOR)
    if median > limit:
        return (f"loss diverged: the median of the last {len(window)} step losses, {median:.4g}, exceeds divergence_factor="
                f"{factor:g} x the first step's {losses[0]:.4g} (floored at {DIVERGENCE_FLOOR:g})")
    return None


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator, bucket_batches: int) -> list[list[int]]:
    """One epoch of batches: shuffle, sort each chunk of ``bucket_batches`` batches by length,
    cut it into batches, shuffle the batches. ``bucket_batches=0`` gives plain random batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * bucket_batches if bucket_batches > 0 else len(order)
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        if bucket_batches > 0:
            part.sort(key=lambda i: lengths[i], reverse=True)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def endless_batches(examples: list[dict], cfg: TrainConfig, generator: torch.Generator) -> Iterator[list[dict]]:
    lengths = [len(example["input_ids"]) for example in examples]
    while True:
        for batch in length_grouped_batches(lengths, cfg.batch_size, generator, cfg.bucket_batches):
            yield [examples[i] for i in batch]


IGNORE_INDEX = -100  # label of tokens that take no loss (padding, a generation task's prompt)


def collate(examples: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch; one label per example passes through, per-token
    labels (decoder tasks) are padded with IGNORE_INDEX."""
    width = max(len(example["input_ids"]) for example in examples)
    batch: dict[str, Any] = {"input_ids": [], "attention_mask": []}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = []
    for example in examples:
        pad = width - len(example["input_ids"])
        batch["input_ids"].append(example["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
        if "token_type_ids" in batch:
            batch["token_type_ids"].append(example["token_type_ids"] + [0] * pad)
    tensors = {key: torch.tensor(value, device=device) for key, value in batch.items()}
    labels = [example["labels"] for example in examples]
    if isinstance(labels[0], list):
        labels = [row + [IGNORE_INDEX] * (width - len(row)) for row in labels]
    tensors["labels"] = torch.tensor(labels, device=device)
    return tensors


def make_optimizer(model: nn.Module, variant, variant_cfg, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters. A variant's own groups (LoRA+'s learning-rate ratio)
    come first; every group decays weight on matrices only, not on biases, norms and vectors."""
    groups = variant.param_groups(model, cfg.lr, variant_cfg) if hasattr(variant, "param_groups") else []
    grouped = {id(p) for group in groups for p in group["params"]}
    groups.append({"params": [p for _, p in trainable_parameters(model) if id(p) not in grouped]})
    split = []
    for group in groups:
        for decays in (True, False):
            params = [p for p in group["params"] if (p.ndim >= 2) == decays]
            if params:
                split.append({**group, "params": params, "weight_decay": cfg.weight_decay if decays else 0.0})
    return torch.optim.AdamW(split, lr=cfg.lr)


def labelled_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's float32 logits at the positions that predict a labelled token, flattened, and
    those tokens. The output layer (SmolLM2: 49,152 columns, a fifth of a forward pass) runs
    only from the first position of the batch that predicts one (``logits_to_keep``), not on
    the prompts before it nor on the last position, which predicts nothing."""
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE_INDEX
    first = int(labelled.any(0).int().argmax())
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    keep = torch.arange(first, targets.shape[1], device=targets.device)
    logits = model(**inputs, logits_to_keep=keep).logits
    labelled = labelled[:, first:]
    return logits[labelled].float(), targets[:, first:][labelled]


def task_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own ``.loss``; a decoder's the same mean over labelled tokens, without
    logits where no token is predicted (``labelled_logits``)."""
    if batch["labels"].ndim == 1:
        return model(**batch).loss
    return nn.functional.cross_entropy(*labelled_logits(model, batch))


def training_loss(model: nn.Module, variant, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to minimise, the task loss): the task loss plus the variant's regulariser, if it
    has one (AdaLoRA's orthogonality penalty). Curves log the task loss alone, comparable
    across variants."""
    loss = task_loss(model, batch)
    if hasattr(variant, "loss_penalty"):
        return loss + variant.loss_penalty(model), loss
    return loss, loss


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` is bf16 on a CUDA device that supports it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context forward passes run in: bf16 autocast (on CPU too), or nothing for fp32.
    Backward passes, optimizer steps and variants' weight updates stay outside it."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant torch.utils.checkpoint around each transformer layer: the forward keeps the
    layer's inputs only, the backward runs the layer again (adapter hooks included, so their
    parameters get gradients; dropout repeats its masks). Active in training mode only."""
    with warnings.catch_warnings():  # every transformers 5 has this name; later 5.x deprecate it for activation_checkpointing_enable
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*deprecated", category=FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int, device: torch.device) -> tuple[list, list]:
    """Predictions and labels, batching examples of similar length together for speed."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    predictions: dict[int, Any] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate([examples[i] for i in indices], pad_id, device)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        values = logits.argmax(-1) if logits.shape[-1] > 1 else logits.squeeze(-1)
        predictions.update(zip(indices, values.tolist()))
    model.train(was_training)
    return [predictions[i] for i in range(len(examples))], [example["labels"] for example in examples]


def prompt_length(example: dict) -> int:
    """Tokens before the first labelled one: a generation task's prompt (0 for language modelling)."""
    return next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))


def shared_prompts(examples: list[dict]) -> tuple[list[list[int]], list[int]]:
    """(groups of two or more examples that share a prompt and label something after it, the
    indices of the rest)."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, example in enumerate(examples):
        length = prompt_length(example)
        if 0 < length < len(example["labels"]):
            by_prompt.setdefault(tuple(example["input_ids"][:length]), []).append(i)
    groups = [members for members in by_prompt.values() if len(members) > 1]
    grouped = {i for members in groups for i in members}
    return groups, [i for i in range(len(examples)) if i not in grouped]


def shared_prompt_loss(model: nn.Module, groups: list[list[dict]], pad_id: int, device: torch.device) -> tuple[float, int] | None:
    """(summed cross-entropy, labelled tokens) of ``groups`` of examples, each sharing one prompt:
    each prompt runs once (left-padded beside the others, positions counted from its first
    token) and its key-value cache serves every continuation of its group, which is what
    teacher forcing computes for each example anyway. A prompt's last position predicts each
    first labelled token; the continuations, right-padded, predict the rest. None for a model
    whose cache cannot be selected across a batch."""
    prompts = [group[0]["input_ids"][: prompt_length(group[0])] for group in groups]
    length = max(len(prompt) for prompt in prompts)
    prompt_mask = torch.tensor([[0] * (length - len(prompt)) + [1] * len(prompt) for prompt in prompts], device=device)
    head = model(input_ids=torch.tensor([[pad_id] * (length - len(prompt)) + prompt for prompt in prompts], device=device),
                 attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                 logits_to_keep=1)
    # transformers 5 renames past_key_values to cache (the old name is deprecated until 5.40)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = head.get(keyword)
    if not hasattr(cache, "batch_select_indices"):
        return None
    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)
    examples = [example for group in groups for example in group]
    starts = [len(prompts[g]) for g in owner.tolist()]
    rest = [example["input_ids"][start:] for example, start in zip(examples, starts)]
    width = max(len(ids) for ids in rest)
    labels = torch.tensor([example["labels"][start:] + [IGNORE_INDEX] * (width - len(ids))
                           for example, start, ids in zip(examples, starts, rest)], device=device)
    labelled = labels[:, 0] != IGNORE_INDEX
    total = nn.functional.cross_entropy(head.logits[owner, -1][labelled].float(), labels[:, 0][labelled], reduction="sum")
    count = int(labelled.sum())
    if width > 1:
        cache.batch_select_indices(owner)
        ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rest], device=device)
        mask = torch.cat([prompt_mask[owner], torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rest], device=device)], 1)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=torch.arange(width - 1, device=device), **{keyword: cache}).logits
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        total = total + nn.functional.cross_entropy(logits[labelled].float(), targets[labelled], reduction="sum")
        count += int(labelled.sum())
    return total.item(), count


def prompt_batches(groups: list[list[int]], examples: list[dict], batch_size: int) -> list[list[list[int]]]:
    """Groups (split where one holds more than ``batch_size`` examples) packed into batches of at
    most ``batch_size`` examples, prompts of similar length together."""
    chunks = [members[start : start + batch_size] for members in groups for start in range(0, len(members), batch_size)]
    chunks.sort(key=lambda members: prompt_length(examples[members[0]]))
    batches: list[list[list[int]]] = []
    for chunk in chunks:
        if not batches or sum(map(len, batches[-1])) + len(chunk) > batch_size:
            batches.append([])
        batches[-1].append(chunk)
    return batches


@torch.no_grad()
def perplexity(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int, device: torch.device,
               share_prompts: bool = True) -> dict[str, float]:
    """Mean cross-entropy per labelled token over ``examples`` (nats) and its exponential.
    Examples that share a prompt (E2E: the references of one meaning representation, 61% of
    their tokens) are scored from one pass over it (``shared_prompt_loss``), several prompts to
    a batch; the rest in length-sorted batches."""
    was_training = model.training
    model.eval()
    groups, alone = shared_prompts(examples) if share_prompts else ([], list(range(len(examples))))
    total, count = 0.0, 0
    batches = prompt_batches(groups, examples, batch_size)
    for position, batch in enumerate(batches):
        scored = shared_prompt_loss(model, [[examples[i] for i in chunk] for chunk in batch], pad_id, device)
        if scored is None:  # a cache this model cannot share: no later batch can either, so none pays a prompt pass more
            alone.extend(i for later in batches[position:] for chunk in later for i in chunk)
            break
        total += scored[0]
        count += scored[1]
    order = sorted(alone, key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        logits, targets = labelled_logits(model, collate([examples[i] for i in order[start : start + batch_size]], pad_id, device))
        total += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss)}


def evaluate(model, examples, task, pad_id, batch_size, device) -> dict[str, float]:
    if task.causal:
        return perplexity(model, examples, pad_id, batch_size, device)
    predictions, labels = predict(model, examples, pad_id, batch_size, device)
    return task.score(predictions, labels, [example.get("group") for example in examples])


def train(model, variant, variant_cfg, task, train_examples, val_examples, cfg: TrainConfig, pad_id: int, device: torch.device, seed: int,
          extractor=None, checkpointer=None) -> dict:
    """Train in place; return the record's ``train`` section (without memory, added by run).
    An ``extractor`` (lorabench.extract) sees the weights after every step, off the clock. A
    ``checkpointer`` (lorabench.checkpoint) holding a killed run's checkpoint resumes from it
    and saves one every ``cfg.checkpoint_every`` steps, off the clock too. ``cfg.precision``
    must be resolved (``resolve_precision``)."""
    generator = torch.Generator().manual_seed(seed)
    batches = endless_batches(train_examples, cfg, generator)
    optimizer = make_optimizer(model, variant, variant_cfg, cfg)
    schedule = make_schedule(optimizer, cfg)
    parameters = [p for _, p in trainable_parameters(model)]
    throughput = measure.Throughput(device, cfg.timing_warmup_steps)
    loss_curve, val_curve = [], []
    step_losses: list[float] = []  # the first step's and the last DIVERGENCE_WINDOW: what ``diverged`` reads
    samples_seen = tokens_seen = 0
    resumed_from = None
    if checkpointer is not None and checkpointer.resumed is not None:
        state = checkpointer.restore(model, optimizer, schedule, throughput, extractor)
        resumed_from = state["step"]
        loss_curve, val_curve, samples_seen, tokens_seen = state["loss_curve"], state["val_curve"], state["samples"], state["tokens"]
        step_losses = state["step_losses"]
        for _ in range(resumed_from * cfg.grad_accum):
            next(batches)  # the batch stream replayed: index lists drawn, nothing collated
        checkpointer.check_batches(generator)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    model.train()
    if resumed_from is None:
        throughput.begin()
    else:
        throughput.resume()
    done = resumed_from or 0
    interactive = sys.stderr.isatty()  # in a job log, a line a minute rather than a line per refresh
    progress = tqdm(range(done + 1, cfg.max_steps + 1), desc=f"{task.name}/{variant.name}", initial=done, total=cfg.max_steps,
                    mininterval=1 if interactive else 60, leave=interactive)
    for step in progress:
        step_loss = step_samples = step_tokens = 0
        for _ in range(cfg.grad_accum):
            batch = collate(next(batches), pad_id, device)
            with autocast(device, cfg.precision):
                loss, task_loss = training_loss(model, variant, batch)
            (loss / cfg.grad_accum).backward()
            step_loss += task_loss.item() / cfg.grad_accum
            step_samples += batch["input_ids"].shape[0]
            step_tokens += int(batch["attention_mask"].sum())
        step_losses = step_losses[:1] + step_losses[1:][-(DIVERGENCE_WINDOW - 1):] + [step_loss]
        reason = diverged(step_losses, cfg.divergence_factor)
        if reason:
            raise DivergedError(step, reason)
        torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        if hasattr(variant, "on_step"):
            variant.on_step(model, step, cfg.max_steps)
        optimizer.zero_grad(set_to_none=True)
        throughput.step_done(step_samples, step_tokens)
        samples_seen += step_samples
        tokens_seen += step_tokens

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            loss_curve.append([step, round(step_loss, 6)])
            progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        score = None
        if cfg.eval_every and val_examples and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            throughput.pause()
            with autocast(device, cfg.precision):
                score = evaluate(model, val_examples, task, pad_id, cfg.eval_batch_size, device)[task.val_metric]
            val_curve.append([step, score])
            throughput.resume()
        if extractor is not None:
            throughput.pause()
            extractor.after_step(step, cfg.max_steps, step_loss, score, higher_is_better=not task.causal)
            throughput.resume()
        if checkpointer is not None and checkpointer.due(step, cfg.max_steps):
            throughput.pause()
            checkpointer.save(model, optimizer, schedule, generator, throughput, extractor, {
                "step": step, "samples": samples_seen, "tokens": tokens_seen, "loss_curve": loss_curve, "val_curve": val_curve,
                "step_losses": step_losses})
            throughput.resume()
    progress.close()
    return {"steps": cfg.max_steps, "samples": samples_seen, "tokens": tokens_seen, **throughput.summary(), "precision": cfg.precision,
            "checkpoint_every": cfg.checkpoint_every, "resumed_from_step": resumed_from,
            "resumed_threads": checkpointer.resumed["threads"] if resumed_from is not None else None, "loss_curve": loss_curve, "val_curve": val_curve}
