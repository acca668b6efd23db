"""Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices.

Zi, Yang, Cheng, Zhang, Zeng, Feng, Liu (2023), arXiv:2309.02411.

Formula
    y = W_t x + b + s B A x,   W_{t+1} = W_t + lambda s (B_{t+1} A_{t+1} - B_t A_t)
    s = alpha / r, A Kaiming-uniform, B zero (as LoRA), no dropout. After every optimizer
    step t past ``start_step`` (the paper's K):
        W_{t+1} = W_t + lambda s (B_{t+1} A_{t+1} - B_t A_t)
    W gets no gradient and no optimizer state: it moves by the delta of the low-rank product.

Claims
    - B = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - The pretrained weights learn too, at LoRA's memory cost (no gradient, no Adam moments
      for W), which beats LoRA and other PEFT methods on E2E and GLUE (the paper's Tables 1-4).
    - Trainable parameters per adapted layer: r (d_in + d_out), as LoRA.
    - The updates telescope: W_t = W_0 + lambda s (B_t A_t - B_K A_K). So the adapter file
      stores A, B and the factors B_K, A_K at the start step, and loading rebuilds W_t from the
      base checkpoint (``after_load``); detach subtracts the same sum. Both equal the trained
      and the original weights up to float rounding of the step-by-step sum
      (RELOADS_EXACTLY and RESTORES_BASE_EXACTLY are False).

Defaults: r = 8, alpha = 16 as lora; update_ratio lambda = 2 (the paper's setting);
start_step K = 100 steps, where the paper's K = 500 belongs to runs of thousands of steps:
about the first eighth of our default run lets A and B settle before W follows them.
QUANTIZABLE_BASE is False: the method writes W.
"""

from dataclasses import dataclass

import torch

from lorabench.adapters import attachment_of
from variants import ParamSpec, VariantConfig, kaiming_uniform, lora, zeros

name = "delta_lora"
IDENTITY_AT_INIT = True
RESTORES_BASE_EXACTLY = False
RELOADS_EXACTLY = False
QUANTIZABLE_BASE = False
TEST_CONFIG = {"rank": 4, "alpha": 8.0, "start_step": 0}

forward = lora.forward
trainable_count = lora.trainable_count


@dataclass
class Config(VariantConfig):
    update_ratio: float = 2.0
    start_step: int = 100

    def __post_init__(self):
        if self.dropout:
            raise ValueError("dropout must be 0 for delta_lora: the paper removes it so that W's update matches B A")
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step} must be >= 0")


def param_specs(d_in, d_out, cfg):
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), kaiming_uniform),
        "lora_B": ParamSpec((d_out, cfg.rank), zeros),
        # The factors when W starts to move: saved, since W_t - W_0 telescopes back to them.
        "lora_A_start": ParamSpec((cfg.rank, d_in), zeros, trainable=False),
        "lora_B_start": ParamSpec((d_out, cfg.rank), zeros, trainable=False),
        # The factors before the last optimizer step: only needed while training.
        "lora_A_prev": ParamSpec((cfg.rank, d_in), zeros, trainable=False, persistent=False),
        "lora_B_prev": ParamSpec((d_out, cfg.rank), zeros, trainable=False, persistent=False),
    }


@torch.no_grad()
def init(layer, cfg):
    for suffix in ("_start", "_prev"):
        getattr(layer, "lora_A" + suffix).copy_(layer.lora_A)
        getattr(layer, "lora_B" + suffix).copy_(layer.lora_B)


def base_update(layer, b_then, a_then):
    """lambda s (B A - B_then A_then): what W has moved since the factors were (B_then, A_then)."""
    cfg = layer.lora_config
    return cfg.update_ratio * cfg.scaling * (layer.lora_B @ layer.lora_A - b_then @ a_then)


@torch.no_grad()
def on_step(model, step, max_steps):
    for layer in attachment_of(model).layers.values():
        if step > layer.lora_config.start_step:
            layer.weight += base_update(layer, layer.lora_B_prev, layer.lora_A_prev).to(layer.weight.dtype)
        else:
            layer.lora_A_start.copy_(layer.lora_A)
            layer.lora_B_start.copy_(layer.lora_B)
        layer.lora_A_prev.copy_(layer.lora_A)
        layer.lora_B_prev.copy_(layer.lora_B)


@torch.no_grad()
def after_load(layer):
    layer.weight += base_update(layer, layer.lora_B_start, layer.lora_A_start).to(layer.weight.dtype)
    layer.lora_A_prev.copy_(layer.lora_A)
    layer.lora_B_prev.copy_(layer.lora_B)


@torch.no_grad()
def restore(layer):
    layer.weight -= base_update(layer, layer.lora_B_start, layer.lora_A_start).to(layer.weight.dtype)


def delta_weight(layer):
    """Relative to the original W_0: the LoRA path plus what W has moved."""
    return lora.delta_weight(layer) + base_update(layer, layer.lora_B_start, layer.lora_A_start)
