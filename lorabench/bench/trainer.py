"""Section 6, ``trainer``: what the Trainer callback (lorabench.integrations) costs a Hugging Face Trainer."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from lorabench import integrations
from lorabench.bench import EXTRACTION_INTERVALS
from lorabench.bench.common import Setup
from lorabench.train import collate


def trainer_run(setup: Setup, steps: int, folder: str, callback: integrations.ParasiticExtraction | None) -> float:
    """Seconds of ``trainer.train()``: a full fine-tune of the bench's model on its examples, with or without the callback."""
    import transformers

    args = transformers.TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=setup.train_cfg.batch_size,
                                          learning_rate=5e-5, logging_steps=10, save_strategy="no", report_to=[], seed=0,
                                          disable_tqdm=True, use_cpu=setup.device.type == "cpu", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=setup.fresh_model().train(), args=args, train_dataset=setup.examples,
                                   data_collator=lambda rows: collate(rows, setup.pad_id, torch.device("cpu")),
                                   callbacks=[callback] if callback else [])
    trainer.remove_callback(transformers.PrinterCallback)  # its log lines would bury the section's
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def section_trainer(setup: Setup, steps: int) -> dict[str, Any]:
    """Trainer runs with and without the callback, alternately: the runtime ratio (the callback's
    whole cost, hooks and W0's snapshot included), and from the callback's own clocks each warm
    extraction against the mean step, as a share of training time every 50 steps."""
    interval = EXTRACTION_INTERVALS[0]
    print(f"\n== trainer: a transformers.Trainer, {steps} steps of full fine-tuning, with ParasiticExtraction every {interval} "
          "steps and without, alternately ==")
    plain_s, with_s, shares, logged = [], [], [], []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as folder:
            plain_s.append(trainer_run(setup, steps, folder, None))
            callback = integrations.ParasiticExtraction({"interval": interval}, f"{folder}/extracted")
            with_s.append(trainer_run(setup, steps, folder, callback))
        extraction = callback.extraction
        step_s = extraction.loop_seconds / steps
        warm = [entry["seconds"] + entry.get("library", {}).get("factor_seconds", 0.0) for entry in extraction.extractor.extractions[1:]]
        shares.append(statistics.median(warm) / step_s)
        logged.append(extraction.overhead()["percent_time"])
    result = {"steps": steps, "interval": interval, "plain_s": plain_s, "with_callback_s": with_s,
              "with_over_plain": statistics.median(b / a for a, b in zip(plain_s, with_s)),
              "warm_extraction_over_step": statistics.median(shares), "percent_time_at_50": 100 * statistics.median(shares) / 50,
              "logged_percent_time": logged}
    print(f"Trainer with the callback / without: {result['with_over_plain']:.3f} (runtime, median of 2 pairs; "
          f"{statistics.median(with_s):.1f} s and {statistics.median(plain_s):.1f} s)")
    print(f"one warm extraction = {result['warm_extraction_over_step']:.3f} mean Trainer steps: every 50 steps "
          f"{result['percent_time_at_50']:.3f}% of training time; the callback logged extraction_percent_time "
          f"{statistics.median(logged):.3f}% at every {interval} (its own clocks: extractions against the loop between them)")
    return result
