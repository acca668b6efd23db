"""Section 5, ``scoring``: a decoder's perplexity of references, prompts shared against every
reference in full."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tasks
from lorabench import models
from lorabench.bench import SCORING_ROUNDS
from lorabench.bench.common import Setup, side_by_side
from lorabench.train import IGNORE_INDEX, autocast, perplexity, shared_prompts

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
