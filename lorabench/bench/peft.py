"""Section 1, ``peft``: one training step of ours against PEFT's implementation of the same method."""

from __future__ import annotations

import copy
from typing import Any

import variants
from lorabench import adapters, quantize
from lorabench.bench import LOSS_TOLERANCE, MEMORY_TARGET, SPEED_TARGET, TARGETS
from lorabench.bench.common import (
    Setup,
    Trainee,
    mark,
    model_bytes,
    no_hook,
    ours,
    peft_config,
    same_weights,
    side_by_side,
    skip_reason,
)
from lorabench.train import make_optimizer


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
