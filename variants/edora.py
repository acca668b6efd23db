"""EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value Decomposition.

Nasiri, Garraghan (2025), arXiv:2501.12067.

Formula
    y = diag(m / n) (W + s B R A) x + b,   n = W + s B R A's row norms,   s = alpha / r
    DoRA (variants/dora.py, whose output this file reuses, bias and dropout alike) with B A
    replaced by B R A: A in R^{r x d_in} and B in R^{d_out x r} frozen, R in R^{r x r}
    trained, zero init; m in R^{d_out} trained, init ||W||_c.
    init = "svd" (the paper's): from the top-r SVD of W = U S V^T, B = U_r and A = S_r V_r^T,
    the split of the authors' code (scikit-learn's TruncatedSVD on W^T, via LoRA-XS), so R
    acts in the basis of W's principal directions, weighted by their singular values.
    Exact SVD in float64. init = "random" (the paper's ablation): A and B Kaiming-uniform.

Claims
    - R = 0 and m = ||W||_c at init, so the model is unchanged at step 0 whichever init
      (IDENTITY_AT_INIT). The authors' code draws R from N(0, 1e-5^2), which is 0 up to noise.
    - Trainable parameters per adapted layer: r^2 + d_out, independent of d_in (the paper
      reports up to 30x fewer than LoRA on GLUE, matching or beating LoRA and DoRA).
    - SVD initialisation beats random frozen A, B (the paper's ablation).
    - dW = (m / n) (W + s B R A) - W merges into W, as DoRA's.
    - A and B are saved with the adapter although the SVD could recompute them: singular
      vectors are defined only up to sign (and rotation where singular values tie), and R is
      trained against the exact ones, so a recomputation on other hardware could silently
      change the model.

Defaults: r = 8 and alpha = 16 (the authors' GLUE script keeps alpha = 16 for every rank),
dropout 0 (their LoraConfig). Learning rate 1e-3, twice LoRA's here: one value of the authors'
GLUE search grid (1e-4 to 5e-3, scripts/run_glue.py in github.com/Hamid-Nasiri/EDoRA).
QUANTIZABLE_BASE is False: every forward reads W for the norms.
"""

from dataclasses import dataclass

import torch

from variants import ParamSpec, VariantConfig, dora, kaiming_uniform, pissa, zeros

name = "edora"
IDENTITY_AT_INIT = True
QUANTIZABLE_BASE = False
TEST_CONFIG = {"rank": 4, "alpha": 8.0}
TRAIN_DEFAULTS = {"lr": 1e-3}
INITS = ("svd", "random")


@dataclass
class Config(VariantConfig):
    init: str = "svd"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: use one of {', '.join(INITS)}")


def param_specs(d_in, d_out, cfg):
    frozen = zeros if cfg.init == "svd" else kaiming_uniform  # "svd" is filled by init()
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), frozen, trainable=False),
        "lora_B": ParamSpec((d_out, cfg.rank), frozen, trainable=False),
        "lora_R": ParamSpec((cfg.rank, cfg.rank), zeros),
        **dora.magnitude_specs(d_out),  # filled by dora.init()
    }


@torch.no_grad()
def init(layer, cfg):
    dora.init(layer, cfg)
    if cfg.init == "svd":
        u, s, vh = pissa.principal_factors(layer.weight, cfg.rank, niter=0)
        layer.lora_B.copy_(u)
        layer.lora_A.copy_(s[:, None] * vh)


def _factors(layer):
    return [layer.lora_B, layer.lora_R, layer.lora_A]


def forward(layer, x, y):
    return dora.output(layer, x, y, _factors(layer))


def delta_weight(layer):
    return dora.merged_delta(layer, _factors(layer))


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * cfg.rank + d_out for d_in, d_out in layer_shapes)
