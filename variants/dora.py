"""DoRA: Weight-Decomposed Low-Rank Adaptation.

Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen (2024), arXiv:2402.09353.

Formula
    y = diag(m / n) (W + s B A) x + b,   s = alpha / r
    n = ||W + s B A||_c: the norm of each output feature's weight row (d_out norms, as PEFT's
    get_weight_norm).
    m in R^{d_out}: the magnitude, init ||W||_c, trained. A in R^{r x d_in}, Kaiming-uniform
    init; B in R^{d_out x r}, zero init; both trained (LoRA on the direction W + s B A).
    The bias is not rescaled. As PEFT computes it, from the base output y0 = W x + b:
    y = y0 + (m / n - 1) W x + (m / n) s B A x = (m / n) (y0 + s B A x) + (1 - m / n) b,
    the second form computed (two passes over the output, no second matmul); with dropout in
    training, both x of the first form's last two terms are dropout(x) and W dropout(x) is
    computed afresh (PEFT's DoraLinearVariant.forward).

Claims
    - B = 0 and m = ||W||_c at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Decomposing W into magnitude and direction lets them change independently, a learning
      pattern closer to full fine-tuning than LoRA's (the paper's weight-decomposition analysis).
    - Trainable parameters per adapted layer: r (d_in + d_out) + d_out.
    - dW = (m / n) (W + s B A) - W merges into W at no inference cost.
    - n is treated as a constant (no gradient; the paper's section 4.3), so backward keeps no
      d_out x d_in graph: less training memory for a negligible accuracy change, the paper
      reports. n is still recomputed at every forward, as B and A change at every step, so
      only W's own row norms can be cached (W is frozen; init() computes them): n^2 is their
      sum with two terms of r columns each (magnitude_scale), never W + s B A itself. PEFT
      builds W + s B A at every forward; its optional eval-time cache is left out, as a stale
      one would be a silent error.

Defaults: r = 8, alpha = 16, dropout 0, as lora (PEFT's LoraConfig with use_dora=True).
QUANTIZABLE_BASE is False: every forward reads W to take the norms.
"""

from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F

from variants import ParamSpec, VariantConfig, autocast_off, lora, zeros

name = "dora"
IDENTITY_AT_INIT = True
QUANTIZABLE_BASE = False
TEST_CONFIG = {"rank": 4, "alpha": 8.0}


@dataclass
class Config(VariantConfig):
    pass


def param_specs(d_in, d_out, cfg):
    return {**lora.param_specs(d_in, d_out, cfg), **magnitude_specs(d_out)}


def magnitude_specs(d_out):
    """m, trained, and ||W||_c^2, frozen and not saved (init() takes both from W, which stays frozen)."""
    return {"lora_magnitude": ParamSpec((d_out,), zeros),
            "lora_weight_norm_sq": ParamSpec((d_out,), zeros, trainable=False, persistent=False)}


@torch.no_grad()
def init(layer, cfg):
    norm = torch.linalg.vector_norm(layer.weight, dim=1)
    layer.lora_magnitude.copy_(norm)
    layer.lora_weight_norm_sq.copy_(norm.square())  # whose square root is norm exactly: m / n = 1 while P = 0


def adapted_weight(layer, factors):
    """W + s P, P the product of ``factors`` ([B, A] for DoRA), in one allocation."""
    return torch.addmm(layer.weight, reduce(torch.matmul, factors[:-1]), factors[-1], alpha=layer.lora_config.scaling)


def magnitude_scale(layer, factors):
    """m / ||W + s P||_c, the norm held constant (no graph through it), from P = L A (A the last
    factor) as ||W_i + s P_i||^2 = ||W_i||^2 + 2 s sum(L * W A^T)_i + s^2 sum(L A A^T * L)_i:
    one read of W for r columns, W's own row norms from init(), and no d_out x d_in matrix
    built (the direct form writes W + s P and reads it again), in float32 under autocast too."""
    s = layer.lora_config.scaling
    with torch.no_grad(), autocast_off(layer.weight):
        left, right = reduce(torch.matmul, factors[:-1]), factors[-1]
        cross = (left * (layer.weight @ right.T)).sum(1)
        own = ((left @ (right @ right.T)) * left).sum(1)
        norm = (layer.lora_weight_norm_sq + 2 * s * cross + s * s * own).clamp_min(0).sqrt()
    return layer.lora_magnitude / norm


def output(layer, x, y, factors):
    """DoRA's layer output for the low-rank update s P, P the product of ``factors`` (leftmost
    first); EDoRA's too. Without dropout, y = W x + b gives the output as
    (m / n) (y + s P x) + (1 - m / n) b: one fused multiply-add into y and one fused scaling,
    two passes over the output where the formula term by term takes about seven."""
    cfg = layer.lora_config
    scale = magnitude_scale(layer, factors)
    if cfg.dropout and layer.training:
        x = F.dropout(x, cfg.dropout, training=True)
        update = x
        for factor in reversed(factors):
            update = F.linear(update, factor)
        return y + (scale - 1) * F.linear(x, layer.weight) + scale * update * cfg.scaling
    low = x
    for factor in reversed(factors[1:]):
        low = F.linear(low, factor)
    adapted = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), factors[0].T, alpha=cfg.scaling).view_as(y)
    if layer.bias is None:
        return adapted * scale
    return torch.addcmul((1 - scale) * layer.bias, adapted, scale)


def merged_delta(layer, factors):
    """The dense dW = (m / n) (W + s P) - W such that W + dW reproduces ``output``."""
    return magnitude_scale(layer, factors)[:, None] * adapted_weight(layer, factors) - layer.weight


def forward(layer, x, y):
    return output(layer, x, y, [layer.lora_B, layer.lora_A])


def delta_weight(layer):
    return merged_delta(layer, [layer.lora_B, layer.lora_A])


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * (d_in + d_out) + d_out for d_in, d_out in layer_shapes)
