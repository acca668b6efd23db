"""LoTR: Low Tensor Rank Weight Adaptation.

Bershatsky, Cherniuk, Daulbaev, Mikhalev, Oseledets (2024), arXiv:2402.01376.

Formula
    y = W_s x + b_s + (alpha / r) L G_s R^T dropout(x),   s the adapted layer
    The updates of a group of layers form a 3-way tensor in Tucker-2 form: the factors
    L in R^{d_out x r} and R in R^{d_in x r} are ONE pair shared by every adapted layer of
    shape (d_out, d_in), trained; each layer has its own core G_s in R^{r x r}, trained.
    Init as the authors' code (github.com/daskol/lotr, ``make_lotr_init`` defaults): L and R
    drawn from N(0, 1), G_s = 0.
    The pairs live on ``model.lora_shared`` as ``lora_L_{d_out}x{d_in}`` and
    ``lora_R_{d_out}x{d_in}``; a layer finds its pair by its shape. On BERT, query, key, value
    and attention output share one pair, the MLP's in and out projections have one each.

Claims
    - G_s = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Trainable parameters: r (d_in + d_out) per distinct layer shape, plus r^2 per adapted
      layer. The core does not depend on the layer's size, so a deep model costs far fewer
      parameters than LoRA's r (d_in + d_out) per layer at the same rank (the paper's
      parameter-efficiency comparison on RoBERTa/GLUE).
    - dW_s = (alpha / r) L G_s R^T merges into W_s at no inference cost.
    - Grouping: the paper stacks the updates of one kind of weight across depth; the authors'
      example shares one pair between the query and value layers of every block. Sharing by
      shape is the coarsest grouping whose products type-check, and it needs no knowledge of
      the architecture's layer names.

Defaults: r = 8 as lora; alpha = 1, the authors' ``LoTRLinear(scale=1.0)`` (scale / rank
multiplies the term, as LoRA's alpha / r): the N(0, 1) factors are not divided by the fan-in,
so the term needs no extra gain. dropout 0. Learning rate: the engine's default (the authors'
scripts grid-search 1e-6..5e-3; no single recommendation).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from variants import ParamSpec, VariantConfig, zeros

name = "lotr"
IDENTITY_AT_INIT = True
TEST_CONFIG = {"rank": 4}


@dataclass
class Config(VariantConfig):
    alpha: float = 1.0  # the authors' LoTRLinear scale


def param_specs(d_in, d_out, cfg):
    return {"lora_G": ParamSpec((cfg.rank, cfg.rank), zeros)}


def factor_names(d_out: int, d_in: int) -> tuple[str, str]:
    return f"lora_L_{d_out}x{d_in}", f"lora_R_{d_out}x{d_in}"


def group_init(shared, layers, cfg):
    for layer in layers.values():
        left, right = factor_names(layer.out_features, layer.in_features)
        if hasattr(shared, left):
            continue
        dtype = layer.weight.dtype if layer.weight.is_floating_point() else torch.float32
        device = layer.weight.device
        shared.register_parameter(left, nn.Parameter(torch.randn(layer.out_features, cfg.rank).to(device, dtype)))
        shared.register_parameter(right, nn.Parameter(torch.randn(layer.in_features, cfg.rank).to(device, dtype)))


def factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (L, R) of this layer's shape."""
    left, right = factor_names(layer.out_features, layer.in_features)
    return getattr(layer.lora_shared, left), getattr(layer.lora_shared, right)


def forward(layer, x, y):
    cfg = layer.lora_config
    if cfg.dropout:
        x = F.dropout(x, cfg.dropout, layer.training)
    left, right = factors(layer)
    return y + (x @ right @ layer.lora_G.T @ left.T) * cfg.scaling


def delta_weight(layer):
    left, right = factors(layer)
    return (left @ layer.lora_G @ right.T) * layer.lora_config.scaling


def trainable_count(layer_shapes, cfg):
    shapes = set(layer_shapes)
    return sum(cfg.rank * (d_in + d_out) for d_in, d_out in shapes) + cfg.rank**2 * len(layer_shapes)
