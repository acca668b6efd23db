"""Section 2, ``overhead``: what an adapter costs over its base, in training and in inference."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import variants
from lorabench import adapters
from lorabench.bench import INFERENCE_TARGET, LORA_FLOOR
from lorabench.bench.common import Setup, lora_model, mark, ours, peft_config, same_weights, side_by_side, skip_reason
from lorabench.train import autocast


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
