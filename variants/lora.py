"""LoRA: Low-Rank Adaptation of Large Language Models.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen (2021), arXiv:2106.09685.

Formula
    y = W x + b + (alpha / r) * B A dropout(x)
    A in R^{r x d_in}, Kaiming-uniform init (as PEFT); B in R^{d_out x r}, zero init.

Claims
    - B = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - The update dW = (alpha / r) B A merges into W at no inference cost.
    - Trainable parameters per adapted layer: r (d_in + d_out).

Defaults: r = 8, alpha = 16, dropout 0 (Hu et al. use alpha = r or 2r; PEFT's examples 16/8).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from variants import ParamSpec, VariantConfig, kaiming_uniform, zeros

name = "lora"
IDENTITY_AT_INIT = True
PEFT_LORA = True  # exports to PEFT's LoRA format (adapters.export_peft)
TEST_CONFIG = {"rank": 4, "alpha": 8.0}


@dataclass
class Config(VariantConfig):
    pass


def param_specs(d_in, d_out, cfg):
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), kaiming_uniform),
        "lora_B": ParamSpec((d_out, cfg.rank), zeros),
    }


def forward(layer, x, y):
    cfg = layer.lora_config
    if cfg.dropout:
        x = F.dropout(x, cfg.dropout, layer.training)
    # y + s (x A^T) B^T as one fused multiply-add: two kernels where matmul, scale and add took
    # four, which is most of what an unmerged adapter costs at small r. Without autograd it
    # writes into the base output (nothing else holds it; a custom Function's output, as
    # bitsandbytes' 4-bit matmul returns, may not be written in place while autograd records),
    # and forms x A^T as (A x^T)^T: the same numbers summed in another order, but BLAS gets r
    # rows of wide output where it handles r columns poorly (0.985x the unmerged forward on
    # CPU). Training keeps PEFT's x A^T, so that the two stay equal to the last bit.
    flat, x = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled():
        return torch.addmm(flat, x @ layer.lora_A.T, layer.lora_B.T.to(y.dtype), alpha=cfg.scaling).view(y.shape)
    flat.addmm_((layer.lora_A @ x.T).T, layer.lora_B.T.to(y.dtype), alpha=cfg.scaling)
    return y


def delta_weight(layer):
    return (layer.lora_B @ layer.lora_A) * layer.lora_config.scaling


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * (d_in + d_out) for d_in, d_out in layer_shapes)
