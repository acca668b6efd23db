"""What several sections of the benchmark share: the model, batch and timing settings they measure
on, side-by-side timing and the memory counters, one side of a training comparison, PEFT's
counterpart of a method, our r=8 LoRA, and the PASS/MISS mark."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import os
import statistics
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import tasks
import variants
from lorabench import adapters, measure, models
from lorabench.train import (
    TrainConfig,
    autocast,
    collate,
    length_grouped_batches,
    make_optimizer,
    resolve_precision,
    training_loss,
)


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


def products_over_step(matrices, width: int, step_flops: float) -> float:
    """The two products with dW of ``width`` columns a warm extraction makes (2 m n q each, over
    every extraction matrix), in training steps' FLOPs: the floor of an extraction's cost."""
    return sum(4 * matrix.numel() * width for matrix in matrices) / step_flops


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


def mark(passed: bool) -> str:
    return "PASS" if passed else "MISS"


# --- PEFT's side of a method (sections peft and overhead) -----------------------------------------------

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


def skip_reason(method: str) -> str | None:
    for package, extra in (("peft", "peft"), ("bitsandbytes", "bnb")):
        if package == "bitsandbytes" and method != "qlora":
            continue
        try:
            __import__(package)
        except ImportError as error:
            return f"{package} does not import ({error}); pip install 'lorabench[{extra}]'"
    return None


# --- our LoRA at r=8 (sections overhead and jobs) ---------------------------------------------------------


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
