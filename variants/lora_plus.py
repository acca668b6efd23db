"""LoRA+: Efficient Low Rank Adaptation of Large Models.

Hayou, Ghosh, Yu (2024), arXiv:2402.12354.

Formula
    y = W x + b + (alpha / r) * B A dropout(x),   trained with lr_B = lr_ratio * lr_A
    Exactly LoRA's forward and init; only the optimizer differs, lr_A being the run's
    learning rate.

Claims
    - With one learning rate for A and B, feature learning in wide models is inefficient: B
      should move faster than A (the paper's section 3, an infinite-width analysis).
    - lr_ratio = 16 gives up to 2x faster fine-tuning and 1-2% better scores at the same
      cost (the paper's section 4, Figures 3-4).
    - Same model as LoRA at step 0 (IDENTITY_AT_INIT), same trainable parameters and the
      same merge; the ratio lives in optimizer parameter groups, not in gradient hooks.

Defaults: r = 8, alpha = 16 as lora; lr_ratio = 16, the paper's recommendation (section 4)
and PEFT's example; lr 2.5e-4, half the engine's LoRA default, as the authors advise (lr_A
somewhat below plain LoRA's, since B now moves 16x faster). The task head and every vector keep lr_A: PEFT's
create_loraplus_optimizer also gives every 1-D parameter (head and layer-norm biases)
lr_B, which the paper does not ask for (tests/test_lora_plus.py documents it).
"""

from dataclasses import dataclass

from lorabench.adapters import attachment_of
from variants import VariantConfig, lora

name = "lora_plus"
IDENTITY_AT_INIT = True
PEFT_LORA = True  # exports to PEFT's LoRA format (adapters.export_peft)
TEST_CONFIG = {"rank": 4, "alpha": 8.0}
TRAIN_DEFAULTS = {"lr": 2.5e-4}

param_specs = lora.param_specs
forward = lora.forward
delta_weight = lora.delta_weight
trainable_count = lora.trainable_count


@dataclass
class Config(VariantConfig):
    lr_ratio: float = 16.0

    def __post_init__(self):
        if self.lr_ratio <= 0:
            raise ValueError(f"lr_ratio={self.lr_ratio} must be > 0 (the paper uses 16)")


def param_groups(model, lr, cfg):
    """Every B at lr_ratio times the run's learning rate; the rest at the run's."""
    return [{"params": [layer.lora_B for layer in attachment_of(model).layers.values()], "lr": lr * cfg.lr_ratio}]
