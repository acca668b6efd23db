"""Parasitic extraction in someone else's training: a Hugging Face Trainer with the callback and a
plain loop with the three calls, on the shipped MiniLM encoder, writing a library and a PEFT
adapter folder that PEFT loads back to the extracted model's logits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from lorabench import adapters, extract, integrations, library, models

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["a gem of a film", "a dull, lifeless mess", "warm, funny and wise", "tedious from start to end",
             "the best thing I saw this year", "I wanted my two hours back", "a quiet triumph", "clumsy and loud",
             "moving and beautifully acted", "an empty, joyless slog", "sharp writing, great cast", "it never comes alive"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]


def encoder():
    """The shipped MiniLM with a seeded new head: every call the same model."""
    torch.manual_seed(0)
    return models.load_classifier("minilm", 2)


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.rows = [{**tokenizer(text), "labels": label} for text, label in zip(SENTENCES, LABELS)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def trainer_for(tmp_path: Path, callback=None, max_steps: int = 6, **overrides) -> transformers.Trainer:
    model, tokenizer = encoder()
    values = dict(output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=3e-4, logging_steps=1, eval_strategy="steps", eval_steps=3, save_strategy="no", report_to=[],
                  use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    args = transformers.TrainingArguments(**{**values, **overrides})
    data = Sentences(tokenizer)
    return transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                data_collator=transformers.DataCollatorWithPadding(tokenizer), callbacks=[callback] if callback else [])


def logits_of(model, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits


def test_a_trainer_run_writes_a_library_and_a_peft_folder_that_peft_loads_to_the_extracted_logits(tmp_path):
    callback = integrations.ParasiticExtraction({"interval": 3, "threshold": 0.9, "max_rank": 16}, tmp_path / "extracted")
    trainer = trainer_for(tmp_path, callback)
    trainer.train()
    out = tmp_path / "extracted"
    entries = adapters.load_library(out / "library.safetensors")
    eval_losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    train_losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    # Optimizer steps (two batches each), with the loss and the evaluation the Trainer logged at each.
    assert [entry["step"] for entry in entries] == [3, 6] and entries[-1]["triggers"] == ["periodic", "final"]
    assert [entry["validation"] for entry in entries] == [eval_losses[3], eval_losses[6]]
    assert [entry["loss"] for entry in entries] == [train_losses[3], train_losses[6]]
    logged = [entry for entry in trainer.state.log_history if "extraction_seconds" in entry]
    assert logged and all(entry["extraction_seconds"] > 0 and entry["extraction_percent_time"] > 0 for entry in logged)

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    assert config["alpha_pattern"] == ranks and config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    base, tokenizer = encoder()
    assert set(ranks) == {name.removesuffix(".weight") for name in extract.extraction_matrices(base, callback.config)}
    assert config["r"] == max(ranks.values()) <= 16 and min(ranks.values()) >= 1

    adapters.load(base, out / "library.safetensors", step=6)
    ours = logits_of(base, tokenizer)
    theirs = logits_of(peft.PeftModel.from_pretrained(encoder()[0], str(out / "adapter")), tokenizer)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    tuned = logits_of(trainer.model, tokenizer)
    untouched = logits_of(encoder()[0], tokenizer)
    # The adapter carries the fine-tune: nearer to the tuned model than the base is (its head differs besides).
    assert (theirs - tuned).abs().mean() < (untouched - tuned).abs().mean()

    summary = json.loads((out / "extraction.json").read_text())
    assert summary["adapter"] == {"which": "last", "step": 6, "rank": None, "mean_rank": pytest.approx(sum(ranks.values()) / len(ranks))}
    assert summary["overhead"]["train_flops"] == pytest.approx(trainer.state.total_flos) and summary["overhead"]["percent_flops"] > 0


def test_under_bf16_mixed_precision_the_adapter_is_extracted_in_float32(tmp_path):
    callback = integrations.ParasiticExtraction({"interval": 3, "max_rank": 8}, tmp_path / "extracted")
    trainer = trainer_for(tmp_path, callback, max_steps=3, bf16=True, eval_strategy="no")
    trainer.train()
    (entry,) = library.read(tmp_path / "extracted" / "library.safetensors")[1]
    assert entry.step == 3 and all(B.dtype == A.dtype == torch.float32 and torch.isfinite(B @ A).all() for B, A in entry.factors.values())
    base, tokenizer = encoder()
    adapters.load(base, tmp_path / "extracted" / "library.safetensors", step=3)
    theirs = peft.PeftModel.from_pretrained(encoder()[0], str(tmp_path / "extracted" / "adapter"))
    torch.testing.assert_close(logits_of(theirs, tokenizer), logits_of(base, tokenizer), rtol=1e-5, atol=1e-5)


def test_the_validation_trigger_and_the_best_adapter_follow_the_trainers_metric(tmp_path):
    callback = integrations.ParasiticExtraction({"interval": 100, "triggers": ["validation"], "max_rank": 8}, tmp_path / "extracted",
                                                which="best")
    trainer = trainer_for(tmp_path, callback, max_steps=9, eval_steps=1, logging_steps=2)
    trainer.train()
    entries = adapters.load_library(tmp_path / "extracted" / "library.safetensors")
    losses = [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]
    improved = [step for i, (step, loss) in enumerate(losses) if i > 0 and loss < min(value for _, value in losses[:i])]
    assert [entry["step"] for entry in entries] == sorted(set(improved) | {9})
    best = min(entries, key=lambda entry: (entry["validation"], entry["step"]))
    assert json.loads((tmp_path / "extracted" / "extraction.json").read_text())["adapter"]["step"] == best["step"]


def test_a_resumed_trainer_run_keeps_the_extraction_state(tmp_path):
    config = {"interval": 2, "max_rank": 8}
    whole = trainer_for(tmp_path / "whole", integrations.ParasiticExtraction(config, tmp_path / "whole.out"), eval_strategy="no")
    whole.train()

    class StopAt3(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    first = trainer_for(tmp_path / "parts", integrations.ParasiticExtraction(config, tmp_path / "first.out"), eval_strategy="no",
                        save_strategy="steps", save_steps=3)
    first.add_callback(StopAt3())
    first.train()
    stopped = library.read(tmp_path / "first.out" / "library.safetensors")[1]  # stopped early: the weights it stopped with
    assert [(entry.step, entry.triggers) for entry in stopped] == [(2, ["periodic"]), (3, ["final"])]
    checkpoint = tmp_path / "parts" / "trainer" / "checkpoint-3"
    assert (checkpoint / integrations.STATE_FILE).is_file()
    second = trainer_for(tmp_path / "parts", integrations.ParasiticExtraction(config, tmp_path / "parts.out"), eval_strategy="no")
    second.train(resume_from_checkpoint=str(checkpoint))
    whole_entries = library.read(tmp_path / "whole.out" / "library.safetensors")[1]
    resumed_entries = library.read(tmp_path / "parts.out" / "library.safetensors")[1]
    assert [entry.step for entry in resumed_entries] == [entry.step for entry in whole_entries] == [2, 4, 6]
    for ours, theirs in zip(resumed_entries, whole_entries):
        assert ours.ranks == theirs.ranks
        for name, (B, A) in ours.factors.items():
            torch.testing.assert_close(B @ A, theirs.factors[name][0] @ theirs.factors[name][1], rtol=1e-4, atol=1e-6)

    late = trainer_for(tmp_path / "parts", eval_strategy="no")
    late.add_callback(integrations.ParasiticExtraction(config, tmp_path / "late.out"))
    with pytest.raises(integrations.ExtractionError, match="never saw W0; pass it in Trainer"):
        late.train(resume_from_checkpoint=str(checkpoint))


def test_sharded_weights_are_refused_with_the_reason():
    with pytest.raises(integrations.ExtractionError, match="FSDP shards the weights"):
        integrations.refuse_sharded(SimpleNamespace(fsdp=["full_shard"], hf_deepspeed_config=None))
    with pytest.raises(integrations.ExtractionError, match="ZeRO-3"):
        integrations.refuse_sharded(SimpleNamespace(fsdp=[], hf_deepspeed_config=SimpleNamespace(is_zero3=lambda: True)))
    integrations.refuse_sharded(SimpleNamespace(fsdp=[], hf_deepspeed_config=SimpleNamespace(is_zero3=lambda: False)))


def test_the_plain_loop_example_of_the_docs_runs_and_its_adapter_loads_in_peft(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "extract-your-own.md").read_text()
    example = re.search(r"## A plain loop.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(example.strip().splitlines()) <= 17
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/extract-your-own.md", "exec"), {})
    entries = adapters.load_library(tmp_path / "extracted" / "library.safetensors")
    assert [entry["step"] for entry in entries] == [5, 10]
    base, tokenizer = encoder()
    adapters.load(base, tmp_path / "extracted" / "library.safetensors", step=10)
    theirs = peft.PeftModel.from_pretrained(encoder()[0], str(tmp_path / "extracted" / "adapter"))
    torch.testing.assert_close(logits_of(theirs, tokenizer), logits_of(base, tokenizer), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "extracted" / "extraction.json").read_text())["overhead"]["percent_time"] > 0


def test_save_before_the_last_step_or_for_a_best_without_scores_says_what_to_do(tmp_path):
    model, _ = encoder()
    extraction = integrations.Extraction(model, {"interval": 5})
    with pytest.raises(integrations.ExtractionError, match="nothing extracted yet"):
        extraction.save(tmp_path)
    extraction.after_step(5, 10, 0.7)
    with pytest.raises(integrations.ExtractionError, match="no kept adapter has a validation score"):
        extraction.save(tmp_path, which="best")
