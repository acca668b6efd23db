"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning.

Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao (2023), arXiv:2303.10512.

Formula
    y = W x + b + (alpha / r0) P diag(lambda) Q dropout(x)
    Q = lora_A in R^{r0 x d_in}, normal(0, 0.02); P = lora_B in R^{d_out x r0}, normal(0, 0.02);
    lambda = lora_E in R^{r0 x 1}, zero init; all three train. r0 = ``rank`` (PEFT's init_r);
    the divisor is in fact r0 + 1e-5, PEFT's ``ranknum + 1e-5``; it stays r0 all run
    (masking never rescales the update).
    Orthogonality penalty added to the loss (``loss_penalty``), as PEFT and the authors' code
    compute it: orth_reg_weight * mean over the 2 L matrices of ||Q Q^T - I||_F and
    ||P^T P - I||_F (the norm itself; the paper's Eq. 4 writes it squared).
    Rank budget (``on_step``, after the optimizer step, before gradients clear), per trained
    tensor p:  I = |p * grad|,  Ibar <- b1 Ibar + (1 - b1) I,  U <- b2 U + (1 - b2) |I - Ibar|,
    s = Ibar * U; triplet i of a layer scores S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji).
    Budget b(t) = r0 L up to step t_i, then T_b + (r0 L - T_b)(1 - (t - t_i)/(T - t_f - t_i))^3
    (truncated to an integer), T_b = target_rank L, L = adapted layers, T = max_steps. Every
    ``delta_t`` steps in that phase, lambda_i = 0 for every triplet with S_i at or below the
    (r0 L - b(t))-th smallest score over all layers. At step T - t_f the mask to T_b is taken
    one last time and held: lambda stays zero there after every later step.

Claims
    - lambda = 0 at init, so the model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Trainable parameters per adapted layer: r0 (d_in + d_out + 1), all of them allocated
      from the start; the budget decides how many triplets keep a non-zero lambda. After
      T - t_f the layers' ranks (``ranks(model)``) sum to target_rank * L, spread unevenly:
      the more important matrices keep more triplets. The paper reports better GLUE, SQuAD
      and summarisation scores than LoRA at an equal final budget (its Tables 1-3).
    - Masking leaves W alone (QUANTIZABLE_BASE holds), and dW = s P diag(lambda) Q merges into W.
    - The importance averages and the held mask live on each layer as non-persistent
      ``lora_*`` buffers (no module-level state), so the adapter file holds only Q, lambda, P:
      the masked lambda entries are stored as zeros.

Defaults (PEFT's AdaLoraConfig unless said): rank r0 = 12 (init_r), target_rank = 8
(target_r), beta1 = beta2 = 0.85, orth_reg_weight = 0.5 (the authors' GLUE scripts use 0.1),
delta_t = 1 (deltaT; the authors' 100 of ~50000 steps is under one step of a 200-800-step
run). PEFT's tinit and tfinal are absolute steps defaulting to 0; here they are
fractions of max_steps, so one setting serves runs of any length: t_i = floor(tinit_ratio T),
t_f = floor(tfinal_ratio T), tinit_ratio = 0.1 and tfinal_ratio = 0.4, from the authors' GLUE
scripts (SST-2: 6000 and 22000 of about 50500 steps; MNLI: 8000 and 50000 of about 86000).
alpha = 16, the authors' SST-2 and MNLI scripts (PEFT's generic LoraConfig default is 8).
Learning rate 8e-4, the authors' SST-2 script for DeBERTaV3-base (MNLI: 5e-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorabench.adapters import attachment_of
from variants import ParamSpec, VariantConfig, zeros

name = "adalora"
IDENTITY_AT_INIT = True
TEST_CONFIG = {"rank": 4, "target_rank": 2}
TRAIN_DEFAULTS = {"lr": 8e-4}
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5
INIT_STD = 0.02  # PEFT's reset_lora_parameters: A, B ~ normal(0, 0.02), E = 0
TRACKED = ("lora_A", "lora_B", "lora_E")  # the tensors whose importance is tracked


@dataclass
class Config(VariantConfig):
    rank: int = 12  # r0, the initial (allocated) rank per layer: PEFT's init_r
    target_rank: int = 8  # the final average rank per layer: PEFT's target_r
    tinit_ratio: float = 0.1  # fraction of max_steps before the budget shrinks
    tfinal_ratio: float = 0.4  # fraction of max_steps trained at the final, held mask
    delta_t: int = 1  # steps between two maskings while the budget shrinks: PEFT's deltaT
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.target_rank, int) and 0 <= self.target_rank <= self.rank):
            raise ValueError(f"target_rank must be an integer in [0, rank={self.rank}], got {self.target_rank!r}")
        if not (0.0 <= self.tinit_ratio and 0.0 <= self.tfinal_ratio and self.tinit_ratio + self.tfinal_ratio < 1.0):
            raise ValueError(f"tinit_ratio and tfinal_ratio must be >= 0 with a sum below 1 (a budget phase must remain), "
                             f"got {self.tinit_ratio!r} and {self.tfinal_ratio!r}")
        if not (isinstance(self.delta_t, int) and self.delta_t >= 1):
            raise ValueError(f"delta_t must be a positive integer, got {self.delta_t!r}")
        if not (0.0 < self.beta1 < 1.0 and 0.0 < self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must lie in (0, 1), got {self.beta1!r} and {self.beta2!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank + RANKNUM_EPS)


def normal_init(tensor: torch.Tensor) -> None:
    torch.nn.init.normal_(tensor, mean=0.0, std=INIT_STD)


def ones(tensor: torch.Tensor) -> None:
    torch.nn.init.ones_(tensor)


def param_specs(d_in, d_out, cfg):
    r = cfg.rank
    shapes = {"lora_A": (r, d_in), "lora_B": (d_out, r), "lora_E": (r, 1)}
    specs = {
        "lora_A": ParamSpec(shapes["lora_A"], normal_init),
        "lora_E": ParamSpec(shapes["lora_E"], zeros),
        "lora_B": ParamSpec(shapes["lora_B"], normal_init),
        # The mask held after T - t_f (1 keeps a triplet); training state, not saved.
        "lora_keep": ParamSpec((r, 1), ones, trainable=False, persistent=False),
    }
    for key, shape in shapes.items():  # the allocator's EMAs of sensitivity and uncertainty
        specs[f"{key}_ipt"] = ParamSpec(shape, zeros, trainable=False, persistent=False)
        specs[f"{key}_unc"] = ParamSpec(shape, zeros, trainable=False, persistent=False)
    return specs


def forward(layer, x, y):
    cfg = layer.lora_config
    if cfg.dropout:
        x = F.dropout(x, cfg.dropout, layer.training)
    # Same operation order as PEFT's SVDLinear: times alpha, then over ranknum.
    return y + (x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T) * cfg.alpha / (cfg.rank + RANKNUM_EPS)


def delta_weight(layer):
    return layer.lora_B @ (layer.lora_A * layer.lora_E) * layer.lora_config.scaling


def trainable_count(layer_shapes, cfg):
    return sum(cfg.rank * (d_in + d_out + 1) for d_in, d_out in layer_shapes)


# --- orthogonality penalty -----------------------------------------------------------------


def loss_penalty(model):
    """orth_reg_weight * mean over every Q and P of ||Q Q^T - I||_F, ||P^T P - I||_F (PEFT's sum)."""
    attachment = attachment_of(model)
    cfg = attachment.config
    layers = list(attachment.layers.values())
    if not layers or cfg.orth_reg_weight == 0:
        return torch.zeros((), device=next(model.parameters()).device)
    total = 0
    for layer in layers:
        a, b = layer.lora_A, layer.lora_B
        for cov in (a @ a.T, b.T @ b):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            total = total + torch.linalg.norm(cov - eye).to(layers[0].lora_A.device)
    return cfg.orth_reg_weight * (total / (2 * len(layers)))


# --- rank allocation -----------------------------------------------------------------------


def schedule_steps(cfg, max_steps: int) -> tuple[int, int]:
    """(t_i, t_f) in steps for a run of ``max_steps``: PEFT's tinit and tfinal. The floors keep a
    budget phase (t_i < T - t_f); should rounding ever close it, t_i is pulled back to T - t_f - 1."""
    tinit = math.floor(cfg.tinit_ratio * max_steps + 1e-9)
    tfinal = math.floor(cfg.tfinal_ratio * max_steps + 1e-9)
    if tinit >= max_steps - tfinal:
        tinit = max(0, max_steps - tfinal - 1)
    return tinit, tfinal


def budget_schedule(cfg, n_layers: int, step: int, max_steps: int) -> tuple[int, bool]:
    """(total rank budget, whether to mask now) at ``step`` (PEFT's RankAllocator.budget_schedule)."""
    tinit, tfinal = schedule_steps(cfg, max_steps)
    init_budget, target_budget = cfg.rank * n_layers, cfg.target_rank * n_layers
    if step <= tinit:
        return init_budget, False
    if step > max_steps - tfinal:
        return target_budget, True
    mul_coeff = 1 - (step - tinit) / (max_steps - tfinal - tinit)
    budget = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
    return budget, step % cfg.delta_t == 0


@torch.no_grad()
def _update_importance(layer, cfg) -> None:
    for key in TRACKED:
        p = getattr(layer, key)
        if p.grad is None:
            continue
        ipt, exp_avg, unc = (p * p.grad).abs(), getattr(layer, f"{key}_ipt"), getattr(layer, f"{key}_unc")
        exp_avg.copy_(cfg.beta1 * exp_avg + (1 - cfg.beta1) * ipt)
        unc.copy_(cfg.beta2 * unc + (1 - cfg.beta2) * (ipt - exp_avg).abs())


def _triplet_scores(layer) -> torch.Tensor:
    """S_i per triplet of one layer: s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ibar * U."""
    score_a = (layer.lora_A_ipt * layer.lora_A_unc).mean(dim=1)
    score_b = (layer.lora_B_ipt * layer.lora_B_unc).mean(dim=0)
    return (layer.lora_E_ipt * layer.lora_E_unc).view(-1) + (score_a + score_b)


@torch.no_grad()
def _mask_to_budget(layers, budget: int, hold: bool) -> None:
    """Zero lambda for every triplet scoring at or below the (r0 L - budget)-th smallest score."""
    scores = {name: _triplet_scores(layer) for name, layer in layers.items()}
    k = sum(layer.lora_E.shape[0] for layer in layers.values()) - budget
    if k <= 0:  # nothing to cut (target_rank == rank); PEFT's kthvalue would raise here
        return
    threshold = torch.kthvalue(torch.cat([s.to(torch.float32).cpu() for s in scores.values()]), k=k)[0].item()
    for name, layer in layers.items():
        drop = (scores[name] <= threshold).view(-1, 1)
        layer.lora_E.masked_fill_(drop, 0.0)
        if hold:
            layer.lora_keep.copy_((~drop).to(layer.lora_keep.dtype))


def on_step(model, step, max_steps):
    """AdaLoRA's budget, as PEFT's ``AdaLoraModel.update_and_allocate(step)`` with total_step =
    max_steps: importance update and cubic masking before T - t_f, the final mask at T - t_f,
    that mask re-applied after every later step (the optimizer moves masked lambdas)."""
    attachment = attachment_of(model)
    cfg, layers = attachment.config, attachment.layers
    _, tfinal = schedule_steps(cfg, max_steps)
    final = max_steps - tfinal
    if step < final:
        for layer in layers.values():
            _update_importance(layer, cfg)
        budget, mask_now = budget_schedule(cfg, len(layers), step, max_steps)
        if mask_now:
            _mask_to_budget(layers, budget, hold=False)
    elif step == final:
        _mask_to_budget(layers, cfg.target_rank * len(layers), hold=True)
        with torch.no_grad():
            for layer in layers.values():  # PEFT's reset_ipt: the averages are spent
                for key in TRACKED:
                    getattr(layer, f"{key}_ipt").zero_()
                    getattr(layer, f"{key}_unc").zero_()
    else:
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_E.masked_fill_(layer.lora_keep == 0, 0.0)


def ranks(model) -> dict[str, int]:
    """The current rank of every adapted layer, by name: how many of its lambda entries are
    non-zero. After training past T - t_f the ranks sum to target_rank * (number of layers);
    the engine records them in the run's record."""
    return {name: int(torch.count_nonzero(layer.lora_E)) for name, layer in attachment_of(model).layers.items()}


def report(model) -> dict:
    """For the run record: the rank the budget left each layer, and their sum."""
    layer_ranks = ranks(model)
    return {"ranks": layer_ranks, "total_rank": sum(layer_ranks.values())}
