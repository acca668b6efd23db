"""Performance, side by side: our hook-based variants against PEFT's implementations of the same
methods, what an adapter costs over its base, what parasitic extraction costs a full fine-tune,
and how the study's training jobs best share a CPU.

    python -m lorabench.bench                                  # every section: MiniLM, SST-2 sentences
    python -m lorabench.bench --only peft --method dora --profile
    python -m lorabench.bench --quick --json out.json          # a tiny BERT, a few rounds: the smoke test

Every figure is a ratio of two things measured in this one process, alternately (A B A B ...,
after warm-up calls of each), as the median over rounds of each round's ratio: a machine that
slows down, or another job on it, slows both sides alike, so the ratio holds where absolute
seconds would not. Milliseconds are printed beside the ratios for scale only.

Sections (``--only NAME``, repeatable):

``peft``        one training step (forward, backward, AdamW step, the method's after-step hook,
                zero_grad) of ours and of PEFT's, from the same weights (our tensors copied into
                PEFT's, one of them random so the adapter path is not trivially zero), on the same
                layers (every linear layer outside the task head, named to PEFT one by one), batch
                and AdamW settings (``train.make_optimizer``, for PEFT's model too). First a
                step-0 check: both losses (eval mode, fp32) agree within 1e-5, so that the two
                compute the same thing. Targets: tokens/s ours / PEFT >= 1.0 (DoRA >= 1.15),
                memory ours / PEFT <= 1.0. Memory is the activations (on CPU the bytes autograd
                still holds for backward when the forward ends, ``held_for_backward``; on CUDA the
                step's peak allocation above what was allocated before it), plus the tensors the
                method adds to the model (trained and frozen adapter tensors, PEFT's copy of the
                task head, AdaLoRA's importance averages), plus AdamW's state.
``overhead``    a LoRA step against a full fine-tuning step (the floor is about two thirds: a
                frozen W needs no weight gradient and no optimizer state), and inference (eval
                mode, no grad) of an unmerged r=8 LoRA against the same model merged: target <= 1.10;
                PEFT's unmerged LoRA with the same tensors against the merged model, for reference.
``extraction``  a short full fine-tune through ``train.train`` with an ``Extractor`` every 10
                steps: each warm-started extraction against the median step since the one before
                (the median of those ratios) gives the share of training time, with that of its
                FLOPs and of the floor (its two products with dW), at intervals 10, 50 and 200
                (target < 0.25% at 50); the first extraction, from a Gaussian sketch, apart; beside
                the W0 snapshot's memory (copied, or memory-mapped from the checkpoint).
``jobs``        the default profile's two training jobs at a time with half the cores each, against
                one job with all the cores: LoRA and full fine-tuning steps in separate processes
                (two half-core jobs together, one all-core job of as many steps, one half-core job
                alone, alternately): the throughput ratio, and how much the two slow each other.
``scoring``     a decoder's perplexity of E2E's test references as the default study scores them,
                the references of one prompt sharing one pass over it, against each reference
                teacher-forced in full (the same loss within float rounding).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import tasks
import variants
from lorabench import adapters, extract, measure, models, quantize
from lorabench.train import (
    IGNORE_INDEX,
    TrainConfig,
    autocast,
    collate,
    length_grouped_batches,
    make_optimizer,
    perplexity,
    resolve_precision,
    shared_prompts,
    train,
    training_loss,
)

SECTIONS = ("peft", "overhead", "extraction", "jobs", "scoring")
METHODS = ("lora", "dora", "vera", "pissa", "delora", "adalora", "qlora")
SPEED_TARGET = {"dora": 1.15}  # tokens/s ours / PEFT at least this; 1.0 for the others
MEMORY_TARGET = 1.0  # memory ours / PEFT at most this
LOSS_TOLERANCE = 1e-5  # step-0 losses of ours and PEFT's agree within this
INFERENCE_TARGET = 1.10  # unmerged / merged forward time at most this
EXTRACTION_INTERVALS = (10, 50, 200)
EXTRACTION_TARGET = (50, 0.25)  # at interval 50, under 0.25% of training time
SCORING_ROUNDS = 3  # rounds of the scoring section: one call of the real decoder's takes seconds
LORA_FLOOR = 2 / 3  # a LoRA step over a full step, counting the matmuls alone
TARGETS = "every linear layer outside the task head, named to PEFT one by one (PEFT trains the head as modules_to_save)"


# --- what every section measures on -------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """The model every section starts from, the batch, and how to time."""

    base: nn.Module  # the float base model, never trained: sections work on deep copies
    batch: dict[str, torch.Tensor]
    examples: list[dict]  # training examples, for the extraction section's short fine-tune
    pad_id: int
    checkpoint: Path | None  # where W0 can be re-read (the extractor's memory map)
    device: torch.device
    precision: str
    warmup: int
    rounds: int
    train_cfg: TrainConfig
    profile: bool = False
    about: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.batch["attention_mask"].sum())

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.base)


def tiny_bert() -> nn.Module:
    """The smoke test's model: a 2-layer, 32-wide BERT classifier built from a config (no download)."""
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def synthetic_examples(count: int, vocab: int, lengths: tuple[int, int], seed: int) -> list[dict]:
    """Random token ids of SST-2-like lengths with balanced labels, for when the data is absent."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (), generator=generator))
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "token_type_ids": [0] * length, "labels": i % 2})
    return examples


def sst2_examples(tokenizer, count: int, seed: int) -> list[dict] | None:
    """``count`` SST-2 training sentences drawn with ``seed``, tokenized as a run tokenizes them;
    None when LORABENCH_DATA holds no SST-2."""
    data_dir = os.environ.get("LORABENCH_DATA")
    if not data_dir or not (Path(data_dir) / "glue" / "SST-2" / "train.tsv").is_file():
        return None
    task = tasks.get("sst2")
    rows = task.load(data_dir, "local")["train"]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return task.encode(tokenizer, rows.select(order), max_length=128)


def typical_batch(examples: list[dict], batch_size: int) -> list[dict]:
    """The batch of median width among one epoch's batches as the training loop draws them
    (length-bucketed: sentences of similar length share a batch, so padding is small)."""
    lengths = [len(example["input_ids"]) for example in examples]
    batches = length_grouped_batches(lengths, batch_size, torch.Generator().manual_seed(0), TrainConfig.bucket_batches)
    batches = sorted((b for b in batches if len(b) == batch_size), key=lambda b: max(lengths[i] for i in b))
    return [examples[i] for i in batches[len(batches) // 2]]


def make_setup(args: argparse.Namespace) -> Setup:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        base, pad_id, checkpoint = tiny_bert(), 0, None
        examples, source = synthetic_examples(args.examples, 100, (4, 16), seed=0), "synthetic sequences"
        name = "tiny BERT (2 layers, hidden 32, from a BertConfig)"
    else:
        torch.manual_seed(0)  # the new classification head
        base, tokenizer = models.load_classifier(args.model, num_labels=2)
        pad_id, checkpoint = tokenizer.pad_token_id, models.checkpoint_folder(args.model)
        examples, source = sst2_examples(tokenizer, args.examples, seed=0), "SST-2 train sentences"
        if examples is None:
            examples = synthetic_examples(args.examples, len(tokenizer), (5, 40), seed=0)
            source = "synthetic sequences (no SST-2 in LORABENCH_DATA)"
        name = models.MODELS[args.model].about if args.model in models.MODELS else args.model
    base.to(device).eval()
    batch = collate(typical_batch(examples, args.batch_size), pad_id, device)
    precision = resolve_precision("auto", device)
    train_cfg = TrainConfig(batch_size=args.batch_size, precision=precision)  # AdamW as a run's: lr 5e-4, no weight decay
    setup = Setup(base, batch, examples, pad_id, checkpoint, device, precision, args.warmup, args.rounds, train_cfg, args.profile)
    setup.about = {
        "model": name, "device": str(device), "threads": torch.get_num_threads(), "precision": precision, "quick": args.quick,
        "batch": {"size": args.batch_size, "tokens": setup.tokens, "padded_to": batch["input_ids"].shape[1], "source": source,
                  "chosen": "the median-width batch of an epoch, length-bucketed as the training loop draws them"},
        "optimizer": f"AdamW lr {train_cfg.lr}, weight decay {train_cfg.weight_decay}",
        "warmup": args.warmup, "rounds": args.rounds, "versions": versions(),
    }
    return setup


def versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# --- timing and memory ------------------------------------------------------------------------------


def side_by_side(a: Callable[[], Any], b: Callable[[], Any], setup: Setup) -> dict[str, Any]:
    """Milliseconds per call of ``a`` and ``b``, called alternately (a b a b ...) after ``warmup``
    calls of each; ``ratio`` is the median over rounds of b's time over a's (> 1: a is faster)."""
    for _ in range(setup.warmup):
        a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    gc.collect()
    gc.disable()  # a collection inside one side's call would be charged to it alone
    try:
        for _ in range(setup.rounds):
            for call, out in ((a, times[0]), (b, times[1])):
                measure.synchronize(setup.device)
                started = time.perf_counter()
                call()
                measure.synchronize(setup.device)
                out.append(1e3 * (time.perf_counter() - started))
    finally:
        gc.enable()
    return {"a_ms": statistics.median(times[0]), "b_ms": statistics.median(times[1]),
            "ratio": statistics.median(tb / ta for ta, tb in zip(*times, strict=True)),
            "rounds_a_ms": times[0], "rounds_b_ms": times[1]}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied or shared tensor counts once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def model_bytes(model: nn.Module) -> int:
    return storage_bytes([*model.parameters(), *model.buffers()])


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes([value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)])


def held_for_backward(model: nn.Module, batch: dict[str, torch.Tensor], loss: Callable[[nn.Module, dict], torch.Tensor]) -> int:
    """Bytes of the tensors autograd still holds for the backward pass when the forward ends. As
    ``measure.saved_activation_bytes`` (the run record's figure), but a tensor saved by a graph
    that the forward itself discarded (PEFT's DoRA builds B A from an identity matrix with
    gradients on, then detaches it) is freed before the backward and does not count. ``loss`` is
    the side's own (a ``Trainee``'s): what it trains on is what it keeps."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: list[weakref.ref] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in owned:
            saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        value = loss(model, batch)
        alive = [tensor for tensor in (ref() for ref in saved) if tensor is not None]
        held = storage_bytes(alive)
    del value, alive
    return held


def no_hook(step: int) -> None:
    pass


@dataclasses.dataclass
class Trainee:
    """One side of a training comparison: a model, what it minimises, its optimizer and its
    after-step hook (called after the optimizer step, before gradients clear, as train.train does)."""

    model: nn.Module
    loss: Callable[[nn.Module, dict], torch.Tensor]
    optimizer: torch.optim.Optimizer
    after_step: Callable[[int], Any] = no_hook
    extra_state: Callable[[], list[torch.Tensor]] = list  # the method's tensors outside the model (PEFT's AdaLoRA averages)
    steps: int = 0

    def step(self, setup: Setup) -> None:
        self.steps += 1
        with autocast(setup.device, setup.precision):
            loss = self.loss(self.model, setup.batch)
        loss.backward()
        self.optimizer.step()
        self.after_step(self.steps)
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> float:
        """The loss in eval mode (no dropout) and fp32: the step-0 check."""
        self.model.eval()
        value = self.loss(self.model, batch).item()
        self.model.train()
        return value

    def memory(self, setup: Setup, base_bytes: int) -> dict[str, Any]:
        """Bytes: the activations (held for backward on CPU, and the run record's saved_activation_bytes
        beside it; on CUDA the step's peak above what was allocated before it), the tensors the method
        added to the base model, AdamW's state."""
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
            torch.cuda.reset_peak_memory_stats(setup.device)
            before = torch.cuda.memory_allocated(setup.device)
            self.step(setup)
            torch.cuda.synchronize(setup.device)
            activations, kind = torch.cuda.max_memory_allocated(setup.device) - before, "cuda_step_peak"
            saved = None
        else:
            with autocast(setup.device, setup.precision):
                activations, kind = held_for_backward(self.model, setup.batch, self.loss), "held_for_backward"
                saved = measure.saved_activation_bytes(self.model, setup.batch, self.loss)
        added = model_bytes(self.model) + storage_bytes(self.extra_state()) - base_bytes
        state = optimizer_bytes(self.optimizer)
        return {"activations": activations, "activations_kind": kind, "adapter": added, "optimizer": state,
                "total": activations + added + state, "saved_activation_bytes": saved}


def ours(model: nn.Module, variant, cfg, setup: Setup, max_steps: int) -> Trainee:
    """Our side: the training loop's own loss (with the variant's penalty), optimizer and on_step."""
    on_step = (lambda step: variant.on_step(model, step, max_steps)) if hasattr(variant, "on_step") else no_hook
    return Trainee(model.train(), lambda m, batch: training_loss(m, variant, batch)[0],
                   make_optimizer(model, variant, cfg, setup.train_cfg), on_step)


# --- section 1: ours against PEFT ---------------------------------------------------------------------

# Our tensor -> PEFT's, per method. The first is made random (std below) where it starts at zero, so
# that the adapter path is not trivially zero at step 0; PiSSA's residual W is copied too.
PEFT_TENSORS: dict[str, dict[str, Callable[[nn.Module], torch.Tensor]]] = {
    "lora": {"lora_B": lambda m: m.lora_B["default"].weight, "lora_A": lambda m: m.lora_A["default"].weight},
    "dora": {"lora_B": lambda m: m.lora_B["default"].weight, "lora_A": lambda m: m.lora_A["default"].weight,
             "lora_magnitude": lambda m: m.lora_magnitude_vector["default"].weight},
    "pissa": {"lora_B": lambda m: m.lora_B["default"].weight, "lora_A": lambda m: m.lora_A["default"].weight,
              "weight": lambda m: m.base_layer.weight},
    "vera": {"lora_lambda_b": lambda m: m.vera_lambda_b["default"], "lora_lambda_d": lambda m: m.vera_lambda_d["default"]},
    "delora": {"lora_B": lambda m: m.delora_B["default"], "lora_A": lambda m: m.delora_A["default"],
               "lora_lambda": lambda m: m.delora_lambda["default"]},
    "adalora": {"lora_E": lambda m: m.lora_E["default"], "lora_A": lambda m: m.lora_A["default"],
                "lora_B": lambda m: m.lora_B["default"]},
}
RANDOM_STD = {"lora": 0.1, "dora": 0.1, "vera": 0.1, "delora": 0.1, "adalora": 1.0}


def peft_config(name: str, cfg, names: list[str], max_steps: int):
    """PEFT's config of the same method with the same settings as our ``cfg``."""
    import peft

    common = dict(target_modules=names, task_type=peft.TaskType.SEQ_CLS)
    lora = dict(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, **common) if name in ("lora", "dora", "pissa") else {}
    if name == "lora":
        return peft.LoraConfig(**lora)
    if name == "dora":
        return peft.LoraConfig(**lora, use_dora=True)
    if name == "pissa":
        return peft.LoraConfig(**lora, init_lora_weights="pissa")
    if name == "vera":
        return peft.VeraConfig(r=cfg.rank, projection_prng_key=cfg.projection_seed, d_initial=cfg.d_initial,
                               vera_dropout=cfg.dropout, **common)
    if name == "delora":
        return peft.DeloraConfig(r=cfg.rank, delora_lambda=cfg.lambda_init, module_dropout=cfg.dropout, **common)
    if name == "adalora":
        tinit, tfinal = variants.get("adalora").schedule_steps(cfg, max_steps)
        return peft.AdaLoraConfig(init_r=cfg.rank, target_r=cfg.target_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                  beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight, tinit=tinit,
                                  tfinal=tfinal, deltaT=cfg.delta_t, total_step=max_steps, **common)
    raise ValueError(f"no PEFT counterpart for {name!r}")


@torch.no_grad()
def same_weights(name: str, attachment, theirs, randomize: bool = True) -> None:
    """Copy our adapter's tensors into PEFT's, the first made random first where ``randomize``."""
    generator = torch.Generator().manual_seed(7)
    for layer_name, layer in attachment.layers.items():
        module = theirs.base_model.model.get_submodule(layer_name)
        for i, (key, theirs_tensor) in enumerate(PEFT_TENSORS[name].items()):
            tensor = getattr(layer, key)
            if randomize and i == 0 and name in RANDOM_STD:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * RANDOM_STD[name])
            theirs_tensor(module).copy_(tensor)


def peft_pair(method: str, setup: Setup, max_steps: int) -> tuple[Trainee, Trainee, int, str]:
    """(ours, PEFT's, the base model's bytes, a note) for ``method``, from the same weights."""
    import peft

    name = "lora" if method == "qlora" else method
    variant, base, note = variants.get(name), setup.fresh_model(), ""
    if method == "qlora":  # QLoRA is lora + quantize_base nf4: both sides get this one 4-bit base
        quantize.quantize_base(base, "nf4")
        note = f"one NF4 base for both, bitsandbytes {setup.device.type.upper()} kernels"
    cfg = variants.make_config(variant, {"tinit_ratio": 0.0} if name == "adalora" else {})
    if name == "adalora":
        note = f"in the budget phase, where both mask to the shrinking budget after every step (t_i = 0, T = {max_steps})"
    mine = copy.deepcopy(base)
    attachment = adapters.attach(mine, variant, cfg, "all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(name, cfg, list(attachment.layers), max_steps))
    same_weights(name, attachment, theirs)

    after_step, extra_state = no_hook, list
    allocator = getattr(theirs.base_model, "rankallocator", None)
    if allocator is not None:  # AdaLoRA: PEFT's loop calls update_and_allocate where ours calls on_step
        after_step = theirs.base_model.update_and_allocate
        extra_state = lambda: [t for store in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc)  # noqa: E731
                               for t in store.values()]
    peft_loss = lambda m, batch: m(**batch).loss  # noqa: E731 (PEFT's AdaLoRA adds its penalty to .loss itself)
    optimizer = make_optimizer(theirs, variant, cfg, setup.train_cfg)  # the variants compared define no param_groups
    theirs_side = Trainee(theirs.train(), peft_loss, optimizer, after_step, extra_state)
    return ours(mine, variant, cfg, setup, max_steps), theirs_side, model_bytes(base), note


def profile(trainee: Trainee, setup: Setup, rows: int = 15) -> str:
    """torch.profiler's table of three training steps, the operators taking most time first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = setup.device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        for _ in range(3):
            trainee.step(setup)
    return profiler.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)


def compare_with_peft(method: str, setup: Setup) -> dict[str, Any]:
    max_steps = 4 * (setup.warmup + setup.rounds + 2)  # AdaLoRA's T: every step timed falls in its budget phase
    mine, theirs, base_bytes, note = peft_pair(method, setup, max_steps)
    loss_ours, loss_peft = mine.eval_loss(setup.batch), theirs.eval_loss(setup.batch)
    timed = side_by_side(lambda: mine.step(setup), lambda: theirs.step(setup), setup)
    memory_ours, memory_peft = mine.memory(setup, base_bytes), theirs.memory(setup, base_bytes)
    speed, memory = timed["ratio"], memory_ours["total"] / memory_peft["total"]
    result = {
        "targets": TARGETS, "note": note,
        "ours_ms": timed["a_ms"], "peft_ms": timed["b_ms"], "tokens_per_s_ratio": speed,
        "ours_tokens_per_s": 1e3 * setup.tokens / timed["a_ms"], "peft_tokens_per_s": 1e3 * setup.tokens / timed["b_ms"],
        "speed_target": SPEED_TARGET.get(method, 1.0), "speed_pass": speed >= SPEED_TARGET.get(method, 1.0),
        "memory_ratio": memory, "memory_target": MEMORY_TARGET, "memory_pass": memory <= MEMORY_TARGET,
        "activation_ratio": memory_ours["activations"] / memory_peft["activations"],
        "memory_ours": memory_ours, "memory_peft": memory_peft,
        "loss_ours": loss_ours, "loss_peft": loss_peft, "loss_diff": abs(loss_ours - loss_peft),
        "same_loss": abs(loss_ours - loss_peft) <= LOSS_TOLERANCE,
        "trainable_ours": sum(p.numel() for p in mine.model.parameters() if p.requires_grad),
        "trainable_peft": sum(p.numel() for p in theirs.model.parameters() if p.requires_grad),
        "rounds_ours_ms": timed["rounds_a_ms"], "rounds_peft_ms": timed["rounds_b_ms"],
    }
    if setup.profile:
        result["profile_ours"], result["profile_peft"] = profile(mine, setup), profile(theirs, setup)
    return result


def skip_reason(method: str) -> str | None:
    for package, extra in (("peft", "peft"), ("bitsandbytes", "bnb")):
        if package == "bitsandbytes" and method != "qlora":
            continue
        try:
            __import__(package)
        except ImportError as error:
            return f"{package} does not import ({error}); pip install 'lorabench[{extra}]'"
    return None


def mark(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def section_peft(setup: Setup, methods: list[str]) -> dict[str, Any]:
    print("\n== peft: one training step (forward, backward, AdamW step, after-step hook, zero_grad), ours and PEFT's, "
          "alternately ==")
    print(f"{'method':8} {'ours ms':>8} {'PEFT ms':>8}  {'tokens/s ours/PEFT':>20}  {'memory ours/PEFT':>18}  "
          f"{'activations':>11}  {'MB ours/PEFT':>13}  step-0 loss ours, PEFT, |diff|")
    results = {}
    for method in methods:
        reason = skip_reason(method)
        if reason is None:
            try:
                results[method] = compare_with_peft(method, setup)
            except Exception as error:  # a benchmark reports what it could not measure, and goes on
                reason = f"{type(error).__name__}: {error}"
        if reason is not None:
            results[method] = {"skipped": reason}
            print(f"{method:8} skipped: {reason}")
            continue
        r = results[method]
        speed = f"{r['tokens_per_s_ratio']:.3f} {mark(r['speed_pass'])} (>={r['speed_target']:.2f})"
        memory = f"{r['memory_ratio']:.3f} {mark(r['memory_pass'])} (<={r['memory_target']:.2f})"
        megabytes = f"{r['memory_ours']['total'] / 2**20:.1f}/{r['memory_peft']['total'] / 2**20:.1f}"
        loss = f"{r['loss_ours']:.6f}, {r['loss_peft']:.6f}, {r['loss_diff']:.1e} {'same' if r['same_loss'] else 'DIFFERENT'}"
        print(f"{method:8} {r['ours_ms']:8.1f} {r['peft_ms']:8.1f}  {speed:>20}  {memory:>18}  {r['activation_ratio']:11.3f}  "
              f"{megabytes:>13}  {loss}")
        for side in ("ours", "peft"):
            if f"profile_{side}" in r:
                print(f"--- {method}, {side}: three steps under torch.profiler ---\n{r[f'profile_{side}']}")
    print(f"adapted layers: {TARGETS}" + "".join(f"; {m}: {r['note']}" for m, r in results.items() if r.get("note")))
    print("memory = activations (held for backward at the end of the forward on CPU, the step's peak on CUDA) + tensors the "
          "method adds + AdamW state")
    return results


# --- section 2: what an adapter costs over its base -------------------------------------------------------


def lora_model(setup: Setup, seed: int = 0) -> tuple[nn.Module, Any]:
    """(the base with our LoRA at r=8 on every linear layer, its config); B random, so merging changes W."""
    lora = variants.get("lora")
    model, cfg = setup.fresh_model(), variants.make_config(lora, {"rank": 8, "alpha": 16.0})
    torch.manual_seed(seed)
    attachment = adapters.attach(model, lora, cfg, "all-linear")
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_B.normal_(0, 0.01)
    return model, cfg


def lora_against_full(setup: Setup) -> dict[str, Any]:
    """A LoRA training step against a full fine-tuning step on the same model and batch."""
    lora, full = variants.get("lora"), variants.get("full")
    full_model = setup.fresh_model()
    adapters.attach(full_model, full, full.Config())
    full_side = ours(full_model, full, full.Config(), setup, max_steps=1)
    lora_net, lora_cfg = lora_model(setup)
    lora_side = ours(lora_net, lora, lora_cfg, setup, max_steps=1)
    timed = side_by_side(lambda: full_side.step(setup), lambda: lora_side.step(setup), setup)
    return {"full_ms": timed["a_ms"], "lora_ms": timed["b_ms"], "lora_over_full": timed["ratio"], "floor": LORA_FLOOR,
            "over_floor": timed["ratio"] / LORA_FLOOR, "rounds_full_ms": timed["rounds_a_ms"],
            "rounds_lora_ms": timed["rounds_b_ms"]}


def unmerged_against_merged(setup: Setup) -> dict[str, Any]:
    """Inference (eval mode, no grad) of the r=8 adapter on its hooks against the same adapter merged;
    PEFT's unmerged LoRA with the same tensors against the merged model too, for reference."""
    (unmerged, cfg), merged = lora_model(setup), adapters.merge(lora_model(setup)[0]).eval()
    unmerged.eval()
    inputs = {key: value for key, value in setup.batch.items() if key != "labels"}

    def forward(model: nn.Module) -> torch.Tensor:
        with torch.no_grad(), autocast(setup.device, setup.precision):
            return model(**inputs).logits

    reference = forward(merged)

    def against_merged(model: nn.Module) -> dict[str, Any]:
        timed = side_by_side(lambda: forward(merged), lambda: forward(model), setup)
        return {"merged_ms": timed["a_ms"], "unmerged_ms": timed["b_ms"], "unmerged_over_merged": timed["ratio"],
                "max_logit_gap": (forward(model) - reference).abs().max().item(),
                "rounds_merged_ms": timed["rounds_a_ms"], "rounds_unmerged_ms": timed["rounds_b_ms"]}

    result = against_merged(unmerged)
    result |= {"target": INFERENCE_TARGET, "pass": result["unmerged_over_merged"] <= INFERENCE_TARGET}
    reason = skip_reason("lora")
    if reason is not None:
        return result | {"peft": {"skipped": reason}}
    import peft

    attachment = adapters.attachment_of(unmerged)
    theirs = peft.get_peft_model(setup.fresh_model(), peft_config("lora", cfg, list(attachment.layers), max_steps=1))
    same_weights("lora", attachment, theirs, randomize=False)
    return result | {"peft": against_merged(theirs.eval())}


def section_overhead(setup: Setup) -> dict[str, Any]:
    print("\n== overhead: a LoRA step against a full fine-tuning step; an unmerged adapter against merged; alternating ==")
    step = lora_against_full(setup)
    print(f"training step  full {step['full_ms']:7.1f} ms  lora {step['lora_ms']:7.1f} ms  "
          f"lora/full {step['lora_over_full']:.3f}  "
          f"(floor ~{LORA_FLOOR:.2f}: no weight gradient and no AdamW state for W; {step['over_floor']:.2f}x the floor)")
    inference = unmerged_against_merged(setup)
    print(f"inference      merged {inference['merged_ms']:5.1f} ms  unmerged r=8 {inference['unmerged_ms']:5.1f} ms  "
          f"unmerged/merged {inference['unmerged_over_merged']:.3f} {mark(inference['pass'])} (<={INFERENCE_TARGET:.2f})  "
          f"(same logits within {inference['max_logit_gap']:.1e})")
    theirs = inference["peft"]
    if "skipped" in theirs:
        print(f"PEFT's unmerged LoRA skipped: {theirs['skipped']}")
    else:
        print(f"PEFT's         merged {theirs['merged_ms']:5.1f} ms  unmerged r=8 {theirs['unmerged_ms']:5.1f} ms  "
              f"unmerged/merged {theirs['unmerged_over_merged']:.3f}  (same tensors; logits within {theirs['max_logit_gap']:.1e})")
    return {"train_step": step, "inference": inference}


# --- section 3: parasitic extraction's cost -------------------------------------------------------------


class TimedExtractor(extract.Extractor):
    """The run's Extractor, also noting when the loop hands it each step: the time from one call's
    end to the next call's start is one training step, so each extraction can be set against the
    steps just before it (side by side, as the other sections), not against a whole-run mean."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, float, bool]] = []  # (start, end, extracted) of each after_step

    def after_step(self, *args, **kwargs) -> bool:
        measure.synchronize(self.device)
        started = time.perf_counter()
        extracted = super().after_step(*args, **kwargs)
        measure.synchronize(self.device)
        self.calls.append((started, time.perf_counter(), extracted))
        return extracted

    def paired(self) -> list[tuple[float, float]]:
        """(an extraction's seconds, the median step since the one before), for each extraction."""
        extractions = iter(self.extractions)
        if self.calls and self.calls[0][2]:
            next(extractions)  # one right after the first step has no timed step before it
        pairs, steps = [], []
        for (_, end_before, _), (start, _, extracted) in zip(self.calls, self.calls[1:], strict=False):
            steps.append(start - end_before)
            if extracted:
                pairs.append((next(extractions)["seconds"], statistics.median(steps)))
                steps = []
        return pairs


def section_extraction(setup: Setup, steps: int) -> dict[str, Any]:
    interval = EXTRACTION_INTERVALS[0]
    print(f"\n== extraction: {steps} steps of full fine-tuning (train.train) with an Extractor every {interval} steps ==")
    full = variants.get("full")
    model = setup.fresh_model()
    adapters.attach(model, full, full.Config())
    cfg = dataclasses.replace(setup.train_cfg, max_steps=steps, lr=5e-5, log_every=steps)  # lr: a full fine-tune's
    extract_cfg = extract.ExtractConfig(interval=interval)
    extractor = TimedExtractor(model, extract_cfg, setup.checkpoint, setup.device,
                               warmup_steps=math.ceil(cfg.warmup_ratio * steps), seed=0)
    trained = train(model, full, full.Config(), tasks.get("sst2"), setup.examples, [], cfg, setup.pad_id, setup.device, seed=0,
                    extractor=extractor)
    pairs = extractor.paired()
    cold, warm = pairs[0][0] / pairs[0][1], statistics.median(seconds / step for seconds, step in pairs[1:])
    step_flops = extract.training_flops(model, trained["tokens"]) / steps
    warm_flops = sum(extract.svd_flops(*p.shape, extract_cfg.max_rank, extract_cfg.oversample, extract_cfg.niter,
                                       extract_cfg.exact_below, warm=True) for p in extractor.matrices.values())
    width = extract_cfg.max_rank + extract_cfg.oversample
    products = sum(4 * p.numel() * width for p in extractor.matrices.values()) / step_flops  # the two passes over dW alone
    snapshot = extractor.snapshot
    spectra = storage_bytes([t for found in extractor.last.values() for t in (found.U, found.S, found.V, found.basis) if t is not None]
                            + list(extractor.differences.values()))
    result = {
        "steps": steps, "tokens_per_step": trained["tokens"] / steps, "matrices": len(extractor.matrices),
        "extractions": len(extractor.extractions), "extraction_over_step": warm, "cold_extraction_over_step": cold,
        "products_floor_over_step": products,
        "extraction_ms": 1e3 * statistics.median(seconds for seconds, _ in pairs[1:]), "cold_extraction_ms": 1e3 * pairs[0][0],
        "step_ms": 1e3 * statistics.median(step for _, step in pairs),
        "rounds_extraction_ms": [1e3 * seconds for seconds, _ in pairs], "rounds_step_ms": [1e3 * step for _, step in pairs],
        "loop_mean_step_ms": 1e3 * trained["timed_s"] / trained["timed_steps"],
        "snapshot": {"kind": snapshot.kind, "copied_mb": snapshot.copied_bytes / 2**20,
                     "mapped_mb": snapshot.mapped_bytes / 2**20},
        "spectra_mb": spectra / 2**20, "intervals": {},
    }
    print(f"one warm-started extraction of {result['matrices']} matrices = {warm:.3f} training steps (median over "
          f"{len(pairs) - 1} extractions of each against the median step before it; {result['extraction_ms']:.1f} ms and "
          f"{result['step_ms']:.1f} ms, {result['tokens_per_step']:.0f} tokens a step); the first, from a Gaussian sketch, "
          f"{cold:.3f} steps ({result['cold_extraction_ms']:.1f} ms)")
    print(f"the floor: the two products with dW of {width} columns each warm extraction needs are {products:.3f} training "
          f"steps' FLOPs (4 x {width} / (6 x tokens a step))")
    target_interval, target_percent = EXTRACTION_TARGET
    for every in EXTRACTION_INTERVALS:
        entry = {"percent_time": 100 * warm / every, "percent_flops": 100 * warm_flops / (every * step_flops),
                 "percent_floor": 100 * products / every}
        verdict = ""
        if every == target_interval:
            entry.update(target_percent=target_percent, passed=entry["percent_time"] < target_percent)
            verdict = f"  {mark(entry['passed'])} (< {target_percent}%)"
        result["intervals"][str(every)] = entry
        print(f"every {every:3d} steps: {entry['percent_time']:6.3f}% of training time, {entry['percent_flops']:6.3f}% of its "
              f"FLOPs, floor {entry['percent_floor']:6.3f}%{verdict}")
    print(f"extra memory: W0 snapshot by {snapshot.kind}, {result['snapshot']['copied_mb']:.1f} MB copied, "
          f"{result['snapshot']['mapped_mb']:.1f} MB memory-mapped; the last spectra and bases and the dW buffers kept {result['spectra_mb']:.1f} MB")
    return result


# --- section 4: how the study's job slots share a CPU -----------------------------------------------------


def job_worker(connection, setup: Setup, threads: int) -> None:
    """One training job's process for ``section_jobs``: a LoRA and a full fine-tune of the bench's
    model, trained ``steps`` steps at a time on command, with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    lora_net, lora_cfg = lora_model(setup)
    full, full_net = variants.get("full"), setup.fresh_model()
    adapters.attach(full_net, full, full.Config())
    trainees = {"lora": ours(lora_net, variants.get("lora"), lora_cfg, setup, max_steps=1),
                "full": ours(full_net, full, full.Config(), setup, max_steps=1)}
    for trainee in trainees.values():
        for _ in range(setup.warmup):
            trainee.step(setup)
    connection.send("ready")
    while (command := connection.recv()) is not None:
        workload, steps = command
        for _ in range(steps):
            trainees[workload].step(setup)
        connection.send("done")


def timed_together(connections: list, workload: str, steps: int) -> float:
    """Milliseconds from telling every job to train ``steps`` steps to the last one's answer."""
    started = time.perf_counter()
    for connection in connections:
        connection.send((workload, steps))
    for connection in connections:
        connection.recv()
    return 1e3 * (time.perf_counter() - started)


def section_jobs(setup: Setup, steps: int = 2) -> dict[str, Any]:
    """The default profile's choice of two training jobs at a time with half the cores each,
    against one job at a time with all of them: the same training steps, in separate processes
    (as Snakemake runs jobs), alternately: two half-core jobs of ``steps`` steps each together,
    one all-core job of 2 x ``steps``, one half-core job of ``steps`` alone. A throughput ratio
    above 1 means the two jobs get through more steps; the last side shows what the two jobs
    cost each other (memory bandwidth, shared caches)."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    half = max(1, cores // 2)
    print(f"\n== jobs: two training jobs with {half} thread(s) each against one with {cores}, separate processes, alternating ==")
    if setup.device.type != "cpu":
        print(f"skipped: on {setup.device.type} a training job holds a whole device (profiles/slurm: one GPU per job)")
        return {"skipped": f"device {setup.device.type}"}
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for threads in (half, half, cores):
        parent, child = context.Pipe()
        process = context.Process(target=job_worker, args=(child, setup, threads), daemon=True)
        process.start()
        pipes.append(parent)
        processes.append(process)
    try:
        for connection in pipes:
            connection.recv()
        result: dict[str, Any] = {"cores": cores, "threads_per_job": half, "steps_per_job": steps}
        for workload in ("lora", "full"):
            two, one, alone = [], [], []
            for _ in range(setup.rounds):
                two.append(timed_together(pipes[:2], workload, steps))
                one.append(timed_together(pipes[2:], workload, 2 * steps))
                alone.append(timed_together(pipes[:1], workload, steps))
            entry = {"two_jobs_ms": statistics.median(two), "one_job_ms": statistics.median(one),
                     "alone_ms": statistics.median(alone),
                     "throughput_two_over_one": statistics.median(b / a for a, b in zip(two, one, strict=True)),
                     "slowdown_together": statistics.median(a / c for a, c in zip(two, alone, strict=True)),
                     "rounds_two_jobs_ms": two, "rounds_one_job_ms": one, "rounds_alone_ms": alone}
            result[workload] = entry
            print(f"{workload:5} two {half}-thread jobs x {steps} steps {entry['two_jobs_ms']:7.1f} ms, one {cores}-thread job x "
                  f"{2 * steps} steps {entry['one_job_ms']:7.1f} ms: two jobs train {entry['throughput_two_over_one']:.3f}x as "
                  f"many steps a second; each runs {entry['slowdown_together']:.3f}x as long as alone")
    finally:
        for connection in pipes:
            connection.send(None)
        for process in processes:
            process.join(timeout=30)
    return result


# --- section 5: a decoder's scoring -------------------------------------------------------------------------

SCORING_EVAL_SIZE = 100  # references, as the default study scores E2E (config/config.yaml)


def tiny_llama() -> nn.Module:
    """The smoke test's decoder: a 2-layer, 32-wide Llama built from a config (no download)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def synthetic_references(prompts: int, references: int, vocab: int, seed: int) -> list[dict]:
    """E2E-like examples of random tokens: ``references`` continuations of 20-30 tokens for each of
    ``prompts`` prompts of 40-50, the prompt unlabelled."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        return torch.randint(1, vocab, (int(torch.randint(low, high + 1, (), generator=generator)),), generator=generator).tolist()

    examples = []
    for _ in range(prompts):
        prompt = tokens(40, 50)
        for _ in range(references):
            reference = tokens(20, 30)
            examples.append({"input_ids": prompt + reference, "labels": [IGNORE_INDEX] * len(prompt) + reference})
    return examples


def e2e_references(tokenizer) -> list[dict] | None:
    """The E2E test references the default study scores (whole meaning representations, about
    100 references), encoded as a run encodes them; None when LORABENCH_DATA holds no E2E."""
    from lorabench import run

    data_dir = os.environ.get("LORABENCH_DATA")
    if not data_dir or not (Path(data_dir) / "e2e" / "testset_w_refs.csv").is_file():
        return None
    task = tasks.get("e2e")
    hparams = run.resolve_hparams("e2e", "lora", {"eval_size": SCORING_EVAL_SIZE, "data_dir": data_dir})
    splits = run.split_sizes(task.load(data_dir, "local"), hparams, task.sample_by)
    return task.encode(tokenizer, splits["eval"], hparams["max_length"], hparams["truncation"])


def section_scoring(setup: Setup, decoder: str, quick: bool) -> dict[str, Any]:
    """A decoder's perplexity of references, the references of one prompt sharing one pass over it
    (``train.perplexity``), against every reference teacher-forced in full: the same loss, less
    compute (E2E's prompts are 61% of its references' tokens)."""
    if quick:
        model, pad_id, name = tiny_llama(), 0, "tiny Llama (2 layers, hidden 32, from a LlamaConfig)"
        examples, source = synthetic_references(4, 3, 100, seed=0), "synthetic prompts and references"
    else:
        model, tokenizer = models.load_causal_lm(decoder)
        pad_id, name = tokenizer.pad_token_id, models.MODELS[decoder].about if decoder in models.MODELS else decoder
        examples, source = e2e_references(tokenizer), "E2E test references"
        if examples is None:
            examples, source = synthetic_references(15, 7, len(tokenizer), seed=0), "synthetic prompts and references (no E2E in LORABENCH_DATA)"
    model.to(setup.device).eval()
    batch_size = tasks.get("e2e").defaults["eval_batch_size"]  # as a run scores E2E
    groups, alone = shared_prompts(examples)
    print(f"\n== scoring: {name}, perplexity of {len(examples)} {source} ({len(groups)} shared prompts, {len(alone)} alone), "
          "prompts shared against every reference in full; alternating ==")

    def score(share: bool) -> float:
        with autocast(setup.device, setup.precision):
            return perplexity(model, examples, pad_id, batch_size, setup.device, share_prompts=share)["loss"]

    full_loss, shared_loss = score(False), score(True)
    timing = dataclasses.replace(setup, warmup=min(setup.warmup, 1), rounds=min(setup.rounds, SCORING_ROUNDS))
    timed = side_by_side(lambda: score(False), lambda: score(True), timing)
    result = {"model": name, "examples": len(examples), "source": source, "shared_prompts": len(groups),
              "full_ms": timed["a_ms"], "shared_ms": timed["b_ms"], "shared_over_full": timed["ratio"],
              "loss_full": full_loss, "loss_shared": shared_loss, "relative_loss_gap": abs(shared_loss - full_loss) / full_loss,
              "rounds": timing.rounds, "rounds_full_ms": timed["rounds_a_ms"], "rounds_shared_ms": timed["rounds_b_ms"]}
    print(f"every reference in full {result['full_ms']:8.1f} ms  prompts shared {result['shared_ms']:8.1f} ms  "
          f"shared/full {result['shared_over_full']:.3f} (median of {timing.rounds} rounds)  "
          f"losses {full_loss:.6f} and {shared_loss:.6f} (relative gap {result['relative_loss_gap']:.1e})")
    return result


# --- the command ---------------------------------------------------------------------------------------

DEFAULTS = {"warmup": 3, "rounds": 25, "extraction_steps": 60, "threads": 0}
QUICK = {"warmup": 1, "rounds": 3, "extraction_steps": 20, "threads": 1}  # tiny models run fastest on one thread


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lorabench.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run this section only (repeatable; default: all)")
    parser.add_argument("--method", action="append", choices=METHODS, help="peft section: this method only (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a tiny BERT, synthetic tokens, few rounds: the smoke test")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--model", default="minilm", help="a named model, Hub id or checkpoint folder (default: minilm)")
    parser.add_argument("--decoder", default="smollm2", help="scoring section: a named decoder, Hub id or checkpoint folder "
                        "(default: smollm2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads (default: torch's; --quick: {QUICK['threads']})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, help=f"untimed calls of each side first (default {DEFAULTS['warmup']}; --quick: "
                        f"{QUICK['warmup']})")
    parser.add_argument("--rounds", type=int, help=f"timed rounds, one call of each side per round (default "
                        f"{DEFAULTS['rounds']}; --quick: {QUICK['rounds']})")
    parser.add_argument("--extraction-steps", type=int, help=f"steps of the extraction section's fine-tune (default "
                        f"{DEFAULTS['extraction_steps']}; --quick: {QUICK['extraction_steps']})")
    parser.add_argument("--profile", action="store_true", help="peft section: print torch.profiler's top operators of each side")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.extraction_steps < 2 * EXTRACTION_INTERVALS[0]:
        parser.error(f"--extraction-steps {args.extraction_steps}: need at least {2 * EXTRACTION_INTERVALS[0]}, for a cold "
                     "extraction and a warm-started one")
    args.examples = max(8, args.extraction_steps) * args.batch_size  # the fine-tune sees each example about once
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)  # PEFT asks
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    setup = make_setup(args)
    about, batch = setup.about, setup.about["batch"]
    print(f"lorabench.bench: {about['model']}; {about['device']}, {about['threads']} threads, {about['precision']}; "
          + ", ".join(f"{package} {version}" for package, version in about["versions"].items()))
    print(f"batch: {batch['size']} {batch['source']} (the median-width batch of the loop's length buckets), {batch['tokens']} "
          f"tokens, padded to {batch['padded_to']}; {about['optimizer']}; {about['warmup']} warm-up + {about['rounds']} timed "
          "rounds per figure; each ratio is the median of the rounds' ratios")
    figures: dict[str, Any] = {"about": about}
    sections = args.only or list(SECTIONS)
    if "peft" in sections:
        figures["peft"] = section_peft(setup, args.method or list(METHODS))
    if "overhead" in sections:
        figures["overhead"] = section_overhead(setup)
    if "extraction" in sections:
        figures["extraction"] = section_extraction(setup, args.extraction_steps)
    if "jobs" in sections:
        figures["jobs"] = section_jobs(setup)
    if "scoring" in sections:
        figures["scoring"] = section_scoring(setup, args.decoder, args.quick)
    about["seconds"] = time.perf_counter() - started
    print(f"\n{about['seconds']:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
