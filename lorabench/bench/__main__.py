"""The command, ``python -m lorabench.bench``: the package's docstring says what each section measures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lorabench import bench
from lorabench.bench import EXTRACTION_INTERVALS, METHODS, SECTIONS
from lorabench.bench.common import make_setup
from lorabench.bench.extraction import section_extraction
from lorabench.bench.jobs import section_jobs
from lorabench.bench.overhead import section_overhead
from lorabench.bench.peft import section_peft
from lorabench.bench.scoring import section_scoring
from lorabench.bench.trainer import section_trainer
from lorabench.bench.warm_start import section_warm_start

DEFAULTS = {"warmup": 3, "rounds": 25, "extraction_steps": 60, "threads": 0}
QUICK = {"warmup": 1, "rounds": 3, "extraction_steps": 20, "threads": 1}  # tiny models run fastest on one thread


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lorabench.bench", description=bench.__doc__.split("\n\n")[0])
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
    if "warmstart" in sections:
        figures["warmstart"] = section_warm_start(setup, args.extraction_steps, args.quick)
    if "trainer" in sections:
        figures["trainer"] = section_trainer(setup, args.extraction_steps)
    about["seconds"] = time.perf_counter() - started
    print(f"\n{about['seconds']:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
