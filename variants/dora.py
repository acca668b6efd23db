"""DoRA: Weight-Decomposed Low-Rank Adaptation.

Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen (2024), arXiv:2402.09353.

Formula
    y = diag(m / n) (W + s B A) x + b,   s = alpha / r
    n = ||W + s B A||_c: the norm of each output feature's weight row (d_out norms, as PEFT's
    get_weight_norm).
    m in R^{d_out}: the magnitude, init ||W||_c, trained. A in R^{r x d_in}, Kaiming-uniform
    init; B in R^{d_out x r}, zero init; both trained (LoRA on the direction W + s B A).
    The bias is not rescaled. As PEFT computes it, from the base output y0 = W x + b:
    y = y0 + (m / n - 1) W x + (m / n) s B A x,
    with W x = y0 - b (one subtraction instead of a second matmul, as PEFT); with dropout in
    training, both x of the last two terms are dropout(x) and W dropout(x) is computed afresh
    (PEFT's DoraLinearVariant.forward).

Claims
    - B = 0 and m = ||W||_c at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Decomposing W into magnitude and direction lets them change independently, a learning
      pattern closer to full fine-tuning than LoRA's (the paper's weight-decomposition analysis).
    - Trainable parameters per adapted layer: r (d_in + d_out) + d_out.
    - dW = (m / n) (W + s B A) - W merges into W at no inference cost.
    - n is treated as a constant (no gradient; the paper's section 4.3), so backward keeps no
      d_out x d_in graph: less training memory for a negligible accuracy change, the paper
      reports. n is still recomputed at every forward, as B and A change at every step, so
      nothing about it can be cached during training (W + s B A is built in one allocation
      and freed at once); PEFT's optional eval-time cache is left out, as a stale one would
      be a silent error.

Defaults: r = 8, alpha = 16, dropout 0, as lora (PEFT's LoraConfig with use_dora=True).
QUANTIZABLE_BASE is False: every forward reads W to take the norms.
"""

from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F

from variants import ParamSpec, VariantConfig, lora, zeros

name = "dora"
IDENTITY_AT_INIT = True
QUANTIZABLE_BASE = False
TEST_CONFIG = {"rank": 4, "alpha": 8.0}


@dataclass
class Config(VariantConfig):
    pass


def param_specs(d_in, d_out, cfg):
    return {**lora.param_specs(d_in, d_out, cfg), "lora_magnitude": ParamSpec((d_out,), zeros)}  # m: filled by init()


@torch.no_grad()
def init(layer, cfg):
    layer.lora_magnitude.copy_(torch.linalg.vector_norm(layer.weight, dim=1))


def adapted_weight(layer, factors):
    """W + s P, P the product of ``factors`` ([B, A] for DoRA), in one allocation."""
    return torch.addmm(layer.weight, reduce(torch.matmul, factors[:-1]), factors[-1], alpha=layer.lora_config.scaling)


def magnitude_scale(layer, factors):
    """m / ||W + s P||_c, the norm held constant (no graph through the d_out x d_in matrix)."""
    with torch.no_grad():
        norm = torch.linalg.vector_norm(adapted_weight(layer, factors), dim=1)
    return layer.lora_magnitude / norm


def output(layer, x, y, factors):
    """DoRA's layer output for the low-rank update s P, P the product of ``factors`` (leftmost
    first); EDoRA's too."""
    cfg = layer.lora_config
    if cfg.dropout and layer.training:
        x = F.dropout(x, cfg.dropout, training=True)
        base = F.linear(x, layer.weight)
    else:
        base = y if layer.bias is None else y - layer.bias
    update = x
    for factor in reversed(factors):
        update = F.linear(update, factor)
    scale = magnitude_scale(layer, factors)
    return y + (scale - 1) * base + scale * update * cfg.scaling


def merged_delta(layer, factors):
    """The dense dW = (m / n) (W + s P) - W such that W + dW reproduces ``output``."""
    return magnitude_scale(layer, factors)[:, None] * adapted_weight(layer, factors) - layer.weight


def forward(layer, x, y):
    return output(layer, x, y, [layer.lora_B, layer.lora_A])


def delta_weight(layer):
    return merged_delta(layer, [layer.lora_B, layer.lora_A])


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * (d_in + d_out) + d_out for d_in, d_out in layer_shapes)
