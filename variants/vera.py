"""VeRA: Vector-based Random Matrix Adaptation.

Kopiczko, Blankevoort, Asano (2024), arXiv:2310.11454.

Formula
    y = W x + b + Lambda_b B Lambda_d A dropout(x),   Lambda_b = diag(b), Lambda_d = diag(d)
    A in R^{r x d_in} and B in R^{d_out x r}: ONE pair of frozen random matrices shared by all
    adapted layers (sized to the largest layer; each layer uses the top-left slice), drawn
    Kaiming-uniform from a generator seeded with ``projection_seed``.
    d in R^r, init ``d_initial`` (0.1); b in R^{d_out}, init 0: the only trained tensors.

Claims
    - b = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Trainable parameters per adapted layer: r + d_out, an order of magnitude fewer than
      LoRA's r (d_in + d_out) at a much higher rank (the paper: r=1024 on RoBERTa-base GLUE
      with 10x fewer parameters than LoRA r=8, matching its score, Table 2).
    - A and B are regenerated from the seed, so a saved adapter stores only the vectors
      (the shared matrices are non-persistent buffers).
    - dW = Lambda_b B Lambda_d A merges into W.
    - The rank is not bounded by a layer's size: the paper's r = 1024 exceeds RoBERTa-base's
      768, and r = 256 exceeds SmolLM2's 192-wide key and value projections
      (RANK_BOUND_BY_LAYER = False); dW still has rank at most min(d_in, d_out).

Defaults: r = 256 and d_initial = 0.1 (PEFT's VeraConfig defaults; the paper's section 4
uses d_init = 0.1 and ranks 256-1024); projection_seed = 0 (PEFT's projection_prng_key).
alpha is unused: the vectors carry the scale. Learning rate 4e-3, the paper's for
RoBERTa-base on SST-2 (Table 8), about 8x LoRA's there (Hu et al.: 5e-4).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from variants import ParamSpec, VariantConfig, zeros

name = "vera"
IDENTITY_AT_INIT = True
RANK_BOUND_BY_LAYER = False
TEST_CONFIG = {"rank": 8}
TRAIN_DEFAULTS = {"lr": 4e-3}


@dataclass
class Config(VariantConfig):
    rank: int = 256
    d_initial: float = 0.1
    projection_seed: int = 0


def param_specs(d_in, d_out, cfg):
    return {
        "lora_lambda_d": ParamSpec((cfg.rank,), lambda tensor: tensor.fill_(cfg.d_initial)),
        "lora_lambda_b": ParamSpec((d_out,), zeros),
    }


def kaiming_uniform_seeded(shape, generator):
    """Kaiming-uniform (gain sqrt 2, fan-in) from a seeded generator, as PEFT draws VeRA's A, B."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def group_init(shared, layers, cfg):
    d_out = max(layer.out_features for layer in layers.values())
    d_in = max(layer.in_features for layer in layers.values())
    generator = torch.Generator(device="cpu").manual_seed(cfg.projection_seed)
    template = next(iter(layers.values())).weight
    dtype = template.dtype if template.is_floating_point() else torch.float32
    vera_a = kaiming_uniform_seeded((cfg.rank, d_in), generator)
    vera_b = kaiming_uniform_seeded((d_out, cfg.rank), generator)
    shared.register_buffer("lora_vera_A", vera_a.to(template.device, dtype), persistent=False)
    shared.register_buffer("lora_vera_B", vera_b.to(template.device, dtype), persistent=False)


def _projections(layer):
    return layer.lora_shared.lora_vera_A[:, : layer.in_features], layer.lora_shared.lora_vera_B[: layer.out_features, :]


def forward(layer, x, y):
    cfg = layer.lora_config
    if cfg.dropout:
        x = F.dropout(x, cfg.dropout, layer.training)
    vera_a, vera_b = _projections(layer)
    return torch.addcmul(y, layer.lora_lambda_b, F.linear(layer.lora_lambda_d * F.linear(x, vera_a), vera_b))  # y + b * (...), one pass


def delta_weight(layer):
    vera_a, vera_b = _projections(layer)
    return (layer.lora_lambda_b[:, None] * vera_b) @ (layer.lora_lambda_d[:, None] * vera_a)


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank + d_out for d_in, d_out in layer_shapes)
