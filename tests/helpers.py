"""Data for tests: the shared offline copies when present, else rows the test writes."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shared_data() -> Path | None:
    """``LORABENCH_DATA``, else ``../shared/data`` beside the checkout; None when neither exists."""
    for candidate in (os.environ.get("LORABENCH_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate, "glue").is_dir():
            return Path(candidate)
    return None


def write_sst2(folder: Path, train_rows: list[str], dev_rows: list[str]) -> Path:
    """GLUE's SST-2 layout (``sentence<TAB>label`` with a header) under ``folder/glue/SST-2``."""
    glue = folder / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text("sentence\tlabel\n" + "".join(row + "\n" for row in train_rows))
    (glue / "dev.tsv").write_text("sentence\tlabel\n" + "".join(row + "\n" for row in dev_rows))
    return folder


def tiny_sst2(folder: Path, repeat: int = 4) -> Path:
    """A learnable toy SST-2: 8 distinct sentences, repeated ``repeat`` times in train."""
    positive = ["a great , moving film", "wonderful and funny", "the best of the year", "a joy"]
    negative = ["dull , boring mess", "awful and tedious", "the worst of the year", "a bore"]
    rows = [f"{text}\t1" for text in positive] + [f"{text}\t0" for text in negative]
    return write_sst2(folder, rows * repeat, rows)


def tiny_e2e(folder: Path) -> Path:
    """E2E's CSV layout with a few meaning representations (two references each), and a short
    Tiny Shakespeare, the reference text of a decoder run's forgetting."""
    rows = [(f"name[Place {i}], food[{food}]", f"Place {i} serves {food} food.") for i, food in enumerate(["Thai", "French", "Greek"] * 4)]
    rows += [(mr, ref.replace("serves", "has")) for mr, ref in rows]
    body = "mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in rows)
    (folder / "e2e").mkdir(parents=True, exist_ok=True)
    for name in ("devset.csv", "testset_w_refs.csv"):
        (folder / "e2e" / name).write_text(body)
    (folder / "tinyshakespeare").mkdir(exist_ok=True)
    (folder / "tinyshakespeare" / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 200)
    return folder


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from lorabench import models

    return AutoTokenizer.from_pretrained(models.locate("minilm", "package"))


def same_loss_then_backward(ours, theirs, batch, atol: float = 1e-6) -> None:
    """Our model and PEFT's give the same loss on ``batch``; both then backpropagate it."""
    import torch

    ours_loss, theirs_loss = ours(**batch).loss, theirs(**batch).loss
    torch.testing.assert_close(ours_loss, theirs_loss, atol=atol, rtol=0)
    ours_loss.backward()
    theirs_loss.backward()


PEFT_PREFIX = "base_model.model."


def peft_targets(peft_model) -> set[str]:
    """Names (without PEFT's prefix) of the layers PEFT put LoRA on."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def lora_and_peft(family: str, targets, variant, rank: int = 4, alpha: float = 8.0, base=None):
    """Our ``variant`` (any with LoRA's lora_A / lora_B) and PEFT's LoRA on deep copies of one
    tiny base model, with equal A and B; B is random so the adapter path is not trivially zero."""
    import copy

    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    import variants
    from lorabench import adapters
    from tests.conftest import build_model

    base = build_model(family) if base is None else base
    ours = copy.deepcopy(base)
    cfg = variants.make_config(variant, {"rank": rank, "alpha": alpha, "dropout": 0.0})
    attachment = adapters.attach(ours, variant, cfg, targets)
    names = list(attachment.layers)
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, task_type=TaskType.SEQ_CLS),
    )
    assert peft_targets(theirs) == set(names)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            module = theirs.base_model.model.get_submodule(name)
            assert module.scaling["default"] == cfg.scaling
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
    return ours, theirs, attachment


def step_each(pairs, batch) -> None:
    """One optimizer step of each (model, optimizer) on ``batch``, gradients cleared after."""
    for model, optimizer in pairs:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
