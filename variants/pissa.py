"""PiSSA: Principal Singular values and Singular vectors Adaptation.

Meng, Wang, Zhang (2024), arXiv:2404.02948.

Formula
    y = W_res x + b + s B A dropout(x),   s B A = the top-r SVD part of W, W_res the rest
    W = U S V^T (SVD); keep the top r triplets in the adapter, the rest in the frozen base:
    A = sqrt(S_r / s) V_r^T  (r x d_in),  B = U_r sqrt(S_r / s)  (d_out x r),  s = alpha / r
    W_res = W - s B A
    A and B train (as LoRA's do); W_res stays frozen. Dividing S_r by s makes s B A equal the
    principal part of W whatever alpha is (as PEFT does).

Claims
    - W_res + s B A = W at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT), up to
      float32 rounding of the SVD (exact SVD runs in float64).
    - Training the principal components converges faster and further than LoRA's
      zero-initialised update at the same rank (the paper's Figure 1 and Table 1).
    - Trainable parameters per adapted layer: r (d_in + d_out), as LoRA.
    - The initial factors A_0, B_0 are recomputed from W at load (the SVD is deterministic),
      so the adapter file holds A, B and the head only; dW against the original W is
      s (B A - B_0 A_0), which is what merge adds after restoring W.
    - ``svd_niter > 0`` uses randomized SVD (Halko et al.; torch.svd_lowrank with a fixed
      seed and 10 oversampled directions) for speed on large matrices, PEFT's
      "pissa_niter_N" (which does not oversample); the paper's section 3 reports a few
      iterations suffice.

Defaults: r = 8, alpha = 16 as lora; svd_niter = 0 (exact SVD; the matrices of the default
encoder are small). RESTORES_BASE_EXACTLY is False: detach rebuilds W as W_res + s B_0 A_0,
equal to the original up to float32 rounding. QUANTIZABLE_BASE is False: the SVD reads W
and the residual is written back into it (PiSSA's own 4-bit recipe quantizes W_res, which
would need a quantizer inside init).
"""

from dataclasses import dataclass

import torch

from variants import ParamSpec, VariantConfig, lora, zeros

name = "pissa"
IDENTITY_AT_INIT = True
RESTORES_BASE_EXACTLY = False
QUANTIZABLE_BASE = False
TEST_CONFIG = {"rank": 4, "alpha": 8.0}
SVD_SEED = 0
SVD_OVERSAMPLE = 10  # extra random directions for randomized SVD (Halko et al. 2011, section 4.2)

forward = lora.forward
trainable_count = lora.trainable_count


@dataclass
class Config(VariantConfig):
    svd_niter: int = 0


def param_specs(d_in, d_out, cfg):
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), zeros),
        "lora_B": ParamSpec((d_out, cfg.rank), zeros),
        "lora_A0": ParamSpec((cfg.rank, d_in), zeros, trainable=False, persistent=False),
        "lora_B0": ParamSpec((d_out, cfg.rank), zeros, trainable=False, persistent=False),
    }


def principal_factors(weight, rank, niter):
    """(U_r, S_r, V_r^T) of ``weight``: exact in float64, or randomized with a fixed seed."""
    if not niter:
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SVD_SEED)
        q = min(rank + SVD_OVERSAMPLE, *weight.shape)
        u, s, v = torch.svd_lowrank(weight.float(), q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


@torch.no_grad()
def init(layer, cfg):
    u, s, vh = principal_factors(layer.weight, cfg.rank, cfg.svd_niter)
    root = torch.sqrt(s / cfg.scaling)
    a, b = root[:, None] * vh, u * root[None, :]
    for key, value in (("lora_A", a), ("lora_B", b), ("lora_A0", a), ("lora_B0", b)):
        getattr(layer, key).copy_(value)
    layer.weight.copy_((layer.weight.double() - cfg.scaling * (b @ a)).to(layer.weight.dtype))


@torch.no_grad()
def restore(layer):
    layer.weight += (layer.lora_config.scaling * layer.lora_B0 @ layer.lora_A0).to(layer.weight.dtype)


def delta_weight(layer):
    return (layer.lora_B @ layer.lora_A - layer.lora_B0 @ layer.lora_A0) * layer.lora_config.scaling
