"""LoRA-FA: Memory-efficient Low-rank Adaptation, with Frozen-A.

Zhang, Zhang, Shi, Chu, Li (2023), arXiv:2308.03303.

Formula
    y = W x + b + s B A dropout(x),   A random and frozen, s = alpha / r
    A in R^{r x d_in}: random (Kaiming-uniform, as LoRA's) and FROZEN; B in R^{d_out x r}: zero
    init, the only trained adapter tensor. With ``projected_gradient`` (the paper's LoRA-FA
    optimizer, as PEFT's create_lorafa_optimizer), B's gradient is replaced by
        g_B <- (1 / s^2) g_B (A A^T + 1e-8 I)^-1
    the gradient that makes s B A follow the full fine-tune's gradient projected onto A's row
    space as closely as a rank-r update can.

Claims
    - B = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - A frozen needs no gradient for A, hence no stored input x per adapted layer: only the
      r-dimensional A x is kept for B's gradient, so activation memory drops below LoRA's
      (the paper: up to 1.4x less total memory than LoRA; tests/test_lora_fa.py measures
      the saved activations).
    - Trainable parameters per adapted layer: r * d_out, about half LoRA's.
    - The projected gradient closes most of the gap to LoRA (the paper's later version).

Defaults: r = 8, alpha = 16 as lora; projected_gradient = True, as PEFT's optimizer. The
projection is a gradient hook on B, so AdamW, clipping and schedules stay the engine's own;
(A A^T)^-1 is r x r and recomputed per backward from the frozen A (cheap, and right after
a reload). Gradient clipping therefore sees the projected gradient, where PEFT clips the raw
one before its optimizer projects.
"""

from dataclasses import dataclass

import torch

from variants import ParamSpec, VariantConfig, kaiming_uniform, lora, zeros

name = "lora_fa"
IDENTITY_AT_INIT = True
PEFT_LORA = True  # exports to PEFT's LoRA format (adapters.export_peft)
TEST_CONFIG = {"rank": 4, "alpha": 8.0}
PROJECTION_DAMPING = 1e-8  # PEFT's delta added to A A^T before the pseudo-inverse

forward = lora.forward
delta_weight = lora.delta_weight


@dataclass
class Config(VariantConfig):
    projected_gradient: bool = True


def param_specs(d_in, d_out, cfg):
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), kaiming_uniform, trainable=False),
        "lora_B": ParamSpec((d_out, cfg.rank), zeros),
    }


def init(layer, cfg):
    if cfg.projected_gradient:
        layer.lora_B.register_hook(lambda grad: project_gradient(grad, layer.lora_A, cfg.scaling))


def project_gradient(grad_b, a, scaling):
    """(1 / s^2) g_B (A A^T + damping I)^-1, PEFT's LoraFAOptimizer projection in full precision."""
    gram = a @ a.T + PROJECTION_DAMPING * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return (grad_b @ torch.linalg.pinv(gram)) / scaling**2


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * d_out for d_in, d_out in layer_shapes)
