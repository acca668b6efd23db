"""DeLoRA: Decoupling Angles and Strength in Low-rank Adaptation.

Bini, Girrbach, Akata (2025), arXiv:2503.18225.

Formula
    y = W x + b + (lambda / r) B Xi A diag(w) dropout(x)
    Xi = diag(1 / (||b_i|| ||a_i||)),   w_j = ||W_{:, j}|| (the norm of W's j-th input column)
    A in R^{r x d_in}, Kaiming-uniform init; B in R^{d_out x r}, zero init; both trained.
    lambda: one trained scalar per layer, init ``lambda_init`` (15). w in R^{d_in}: a frozen
    buffer of W's column norms, taken once at init and saved with the adapter.
    Each norm ||a_i||, ||b_i|| is clamped below at 1e-4 (B = 0 at init), as PEFT does.
    The paper writes the scale as lambda ||W|| / r; the authors' code (and PEFT's, which they
    contributed) use W's per-input-column norms, which is what this file does.

Claims
    - B = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Xi normalizes each rank-one term b_i a_i^T to unit Frobenius norm, so the update is
      bounded: ||dW||_F <= |lambda| max_j ||W_{:, j}|| <= |lambda| ||W||_2, whatever A and B
      are (the clamp only shrinks terms). Direction (A, B) and strength (lambda) are learned
      apart, which the paper reports makes training robust to the learning rate and to
      long schedules, matching or beating LoRA (GLUE with RoBERTa, instruction tuning with
      LLaMA, subject-driven image generation).
    - Trainable parameters per adapted layer: r (d_in + d_out) + 1.
    - dW = (lambda / r) B Xi A diag(w) merges into W at no inference cost.

Defaults: r = 8 and lambda_init = 15 (PEFT's DeloraConfig r and delora_lambda; PEFT's docs ask
for lambda around 10-15); ``dropout`` is PEFT's ``module_dropout`` (an nn.Dropout on the
layer's input, as LoRA's dropout), default 0. alpha is unused: lambda carries the scale.
Learning rate 1e-2: the authors' GLUE script for RoBERTa-base (github.com/ExplainableML/DeLoRA)
and PEFT's docs (10-100x LoRA's, "1e-3/1e-2"), which the bounded update tolerates.
On the default encoder (MiniLM, width 384) lambda 15 makes the first steps' update as large
as W itself and SST-2 training collapses to the majority class, at lr 1e-2 and 1e-3 alike;
lambda 4 at lr 1e-3 learns (0.82 after 200 steps), which config/config.yaml uses.
QUANTIZABLE_BASE is True: W is read only once, at init, for its column norms (dequantizing a
4-/8-bit base with bitsandbytes), and the norms are stored with the adapter, so the same file
reproduces the trained model on the full-precision checkpoint too. PEFT refuses quantized
layers for DeLoRA.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from variants import ParamSpec, VariantConfig, kaiming_uniform, zeros

name = "delora"
IDENTITY_AT_INIT = True
# lambda's effect per input column scales as lambda / sqrt(r d_in) (unit-norm rank-one terms
# spread over d_in columns): 15 at r = 8, d_in = 768 moves a column by ~0.2 of its norm; on the
# tiny model (d_in = 32, r = 4) lambda = 3 does about the same, where 15 would move it by 1.3.
TEST_CONFIG = {"rank": 4, "lambda_init": 3.0}
TRAIN_DEFAULTS = {"lr": 1e-2}
NORM_EPS = 1e-4  # PEFT's clamp on ||a_i|| and ||b_i|| (peft/tuners/delora/layer.py)


@dataclass
class Config(VariantConfig):
    lambda_init: float = 15.0  # PEFT's DeloraConfig.delora_lambda


def param_specs(d_in, d_out, cfg):
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), kaiming_uniform),
        "lora_B": ParamSpec((d_out, cfg.rank), zeros),
        "lora_lambda": ParamSpec((1,), lambda tensor: tensor.fill_(float(cfg.lambda_init))),
        "lora_w_norm": ParamSpec((d_in,), zeros, trainable=False),  # filled by init()
    }


def dense_weight(layer) -> torch.Tensor:
    """W as a float matrix: the weight itself, or a bitsandbytes 4-/8-bit weight dequantized."""
    weight = layer.weight
    if weight.is_floating_point():
        return weight
    import bitsandbytes.functional as bnb_functional

    if getattr(weight, "quant_state", None) is not None:
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    # Linear8bitLt moves the row scales from the weight to its state at its first forward.
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is not None:
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales)
    raise TypeError(f"delora: cannot read the norms of a {type(weight).__name__} weight")


@torch.no_grad()
def init(layer, cfg):
    weight = dense_weight(layer)
    layer.lora_w_norm.copy_(torch.norm(weight.detach(), dim=0).to(layer.lora_w_norm.dtype))


def _scales(layer):
    """lambda / r / (||a_i|| ||b_i||), one per rank-one term."""
    norm_a = torch.clamp(layer.lora_A.norm(dim=1), min=NORM_EPS)
    norm_b = torch.clamp(layer.lora_B.norm(dim=0), min=NORM_EPS)
    return (layer.lora_lambda / layer.lora_config.rank) / (norm_a * norm_b)


def forward(layer, x, y):
    cfg = layer.lora_config
    if cfg.dropout:
        x = F.dropout(x, cfg.dropout, layer.training)
    hidden = F.linear(x * layer.lora_w_norm, layer.lora_A) * _scales(layer)
    return y + F.linear(hidden, layer.lora_B).to(y.dtype)


def delta_weight(layer):
    return (layer.lora_B * _scales(layer)) @ layer.lora_A * layer.lora_w_norm[None, :]


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * (d_in + d_out) + 1 for d_in, d_out in layer_shapes)
