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
