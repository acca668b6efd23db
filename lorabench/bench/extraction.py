"""Section 3, ``extraction``: what parasitic extraction costs a full fine-tune."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import tasks
import variants
from lorabench import adapters, extract, measure
from lorabench.bench import EXTRACTION_INTERVALS, EXTRACTION_TARGET, LONG_BATCH, LONG_BATCH_TARGET
from lorabench.bench.common import Setup, mark, products_over_step, storage_bytes, synthetic_examples
from lorabench.train import train


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
                entry = next(extractions)  # the SVDs, and forming the library's adapter when it keeps one
                pairs.append((entry["seconds"] + entry.get("library", {}).get("factor_seconds", 0.0), statistics.median(steps)))
                steps = []
        return pairs


def section_extraction(setup: Setup, steps: int) -> dict[str, Any]:
    """The extraction overhead on the bench's batches, then on a realistic long batch (``LONG_BATCH``,
    synthetic tokens: the cost depends on shapes, not values) over the fewest steps that give
    warm extractions, each against its own target."""
    result = measure_extraction(setup, steps, setup.examples, setup.train_cfg.batch_size, EXTRACTION_TARGET)
    tokens, length = LONG_BATCH
    length = min(length, setup.base.config.max_position_embeddings)
    size = math.ceil(tokens / length)
    vocab = setup.base.config.vocab_size
    long_steps = 3 * EXTRACTION_INTERVALS[0]
    examples = synthetic_examples(long_steps * size, vocab, (length, length), seed=0)
    result["long_batch"] = measure_extraction(setup, long_steps, examples, size, LONG_BATCH_TARGET)
    return result


def measure_extraction(setup: Setup, steps: int, examples: list[dict], batch_size: int, target: tuple[int, float]) -> dict[str, Any]:
    interval = EXTRACTION_INTERVALS[0]
    print(f"\n== extraction: {steps} steps of full fine-tuning (train.train) on batches of {batch_size}, with an Extractor "
          f"every {interval} steps ==")
    full = variants.get("full")
    model = setup.fresh_model()
    adapters.attach(model, full, full.Config())
    cfg = dataclasses.replace(setup.train_cfg, max_steps=steps, lr=5e-5, log_every=steps, batch_size=batch_size)  # lr: a full fine-tune's
    extract_cfg = extract.ExtractConfig(interval=interval)
    extractor = TimedExtractor(model, extract_cfg, setup.checkpoint, setup.device,
                               warmup_steps=math.ceil(cfg.warmup_ratio * steps), seed=0)
    trained = train(model, full, full.Config(), tasks.get("sst2"), examples, [], cfg, setup.pad_id, setup.device, seed=0,
                    extractor=extractor)
    pairs = extractor.paired()
    cold, warm = pairs[0][0] / pairs[0][1], statistics.median(seconds / step for seconds, step in pairs[1:])
    step_flops = extract.training_flops(model, trained["tokens"]) / steps
    warm_flops = sum(extract.svd_flops(*p.shape, extract_cfg.max_rank, extract_cfg.oversample, extract_cfg.niter,
                                       extract_cfg.exact_below, warm=True) for p in extractor.matrices.values())
    width = extract_cfg.max_rank + extract_cfg.oversample
    products = products_over_step(extractor.matrices.values(), width, step_flops)  # the two passes over dW alone
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
    target_interval, target_percent = target
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
