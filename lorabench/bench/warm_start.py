"""Section ``warmstart``: what one product with dW per extraction, instead of two, would cost the
spectra parasitic extraction reads.

A warm-started extraction (``extract.subspace_svd`` from the last basis) makes two products with
dW of q = max_rank + oversample columns: one full iteration, right subspace to left to right.
Against training's 6 x weights x tokens those two alone are 4 q / (6 x tokens a step x interval)
of its FLOPs: at SST-2's 200 tokens a step and interval 50, 0.53% with q = 80. The one way under
half a percent there is fewer products, and the cheapest is one: each extraction takes half a step
of the iteration, alternating sides, and reads the spectrum off the subspace the last one left
(Rayleigh-Ritz on it: Y = dW V, its left side next time; Z = Q^T dW, its right side next time).
Along one full fine-tune this section scores both against the exact SVD at every extraction:
the largest and the mean, over matrices, of the largest error of EV(r) over r <= max_rank. The
one-product scheme starts from the run's first (cold) extraction, so the two part from the
second on."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

import tasks
import variants
from lorabench import adapters, extract, rates
from lorabench.bench import EXTRACTION_INTERVALS
from lorabench.bench.common import Setup, products_over_step
from lorabench.train import train

RATES = Path(__file__).resolve().parents[2] / "config" / "rates.yaml"  # the full fine-tune trains at its tuned SST-2 rate


def explained_error(S: torch.Tensor, exact: torch.Tensor, energy: float, max_rank: int) -> float:
    """The largest |EV(r) - exact EV(r)| over r <= max_rank (EV relative to ||dW||_F^2)."""
    if energy == 0.0:
        return 0.0
    ranks = min(max_rank, len(S), len(exact))
    estimated = torch.cumsum(S[:ranks].double().pow(2), 0) / energy
    true = torch.cumsum(exact[:ranks].pow(2), 0) / energy
    return float((true - estimated).abs().max())


def half_step(delta: torch.Tensor, side: str, basis: torch.Tensor) -> tuple[torch.Tensor, tuple[str, torch.Tensor]]:
    """Singular values of dW projected on ``basis`` (an orthonormal right or left subspace), one
    product with dW, and the other side's subspace for the next extraction."""
    if side == "right":
        Y = delta @ basis
        gram, following = Y.mT @ Y, ("left", extract.orthonormal(Y))
    else:
        Z = basis.mT @ delta
        gram, following = Z @ Z.mT, ("right", extract.orthonormal(Z.mT))
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt(), following


class ComparingExtractor(extract.Extractor):
    """The run's Extractor, which at each extraction also takes the one-product half step and the
    exact SVD of every matrix, and records both schemes' EV errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.half: dict[str, tuple[str, torch.Tensor]] = {}
        self.errors: list[dict[str, Any]] = []

    @torch.no_grad()
    def extract(self, step: int, triggers: list[str], loss: float | None = None, validation: float | None = None) -> dict[str, Any]:
        entry = super().extract(step, triggers, loss, validation)
        two, one = [], []
        for name, parameter in self.matrices.items():
            delta = self.difference(name, parameter).float()
            found = self.last[name]
            if found.basis is None:
                continue  # an exact SVD: no iteration to compare
            exact = torch.linalg.svdvals(delta.double())
            two.append(explained_error(found.S, exact, found.energy, self.cfg.max_rank))
            if name in self.half:
                S, self.half[name] = half_step(delta, *self.half[name])
                one.append(explained_error(S, exact, found.energy, self.cfg.max_rank))
            else:  # the cold extraction both share; the half steps go on from its right subspace
                self.half[name] = ("right", extract.orthonormal(found.basis))
                one.append(two[-1])
        if two:
            self.errors.append({"step": step, "two_max": max(two), "two_mean": sum(two) / len(two),
                                "one_max": max(one), "one_mean": sum(one) / len(one)})
        return entry


def section_warm_start(setup: Setup, steps: int, quick: bool) -> dict[str, Any]:
    interval = EXTRACTION_INTERVALS[1] if steps >= 4 * EXTRACTION_INTERVALS[1] else EXTRACTION_INTERVALS[0]
    print(f"\n== warmstart: {steps} steps of full fine-tuning, an extraction every {interval} steps, each scored against the "
          "exact SVD: two products with dW (the extractor's) and one (half a step, alternating sides) ==")
    full = variants.get("full")
    model = setup.fresh_model()
    adapters.attach(model, full, full.Config())
    lr = rates.selection_for(RATES, "sst2", "full")["lr"]
    cfg = dataclasses.replace(setup.train_cfg, max_steps=steps, lr=lr, weight_decay=0.01, log_every=steps)
    # The tiny model's matrices are 32 wide: a sketch narrower than that, so that it iterates at all.
    extract_cfg = extract.ExtractConfig(interval=interval, max_rank=8, oversample=4, exact_below=0) if quick \
        else extract.ExtractConfig(interval=interval)
    extractor = ComparingExtractor(model, extract_cfg, setup.checkpoint, setup.device,
                                   warmup_steps=math.ceil(cfg.warmup_ratio * steps), seed=0)
    trained = train(model, full, full.Config(), tasks.get("sst2"), setup.examples, [], cfg, setup.pad_id, setup.device, seed=0,
                    extractor=extractor)
    tokens = trained["tokens"] / steps
    width = extract_cfg.max_rank + extract_cfg.oversample
    step_flops = extract.training_flops(model, trained["tokens"]) / steps
    one_product = 100 * products_over_step(extractor.matrices.values(), width, step_flops) / (2 * interval)
    result = {"steps": steps, "interval": interval, "tokens_per_step": tokens, "width": width,
              "percent_flops_two_products": 2 * one_product, "percent_flops_one_product": one_product, "extractions": extractor.errors}
    print(f"{tokens:.0f} tokens a step, q = {width}: at interval {interval} two products with dW are {2 * one_product:.3f}% of "
          f"training's FLOPs, one {one_product:.3f}%")
    print("step   EV error, two products (max, mean)   one product (max, mean)")
    for row in extractor.errors:
        print(f"{row['step']:4d}   {row['two_max']:.4f}  {row['two_mean']:.4f}                    {row['one_max']:.4f}  {row['one_mean']:.4f}")
    return result
