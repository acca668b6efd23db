"""Full fine-tuning: every weight of the pretrained model is trained.

Howard, Ruder (2018), arXiv:1801.06146; for encoders, Devlin et al. (2019), arXiv:1810.04805.
The reference every parameter-efficient method is measured against.

Formula
    y = W x + b,   W <- W - lr AdamW(grad W) for every W of the model
    No adapter tensors, no hooks.

Claims
    - The model is unchanged at step 0 (IDENTITY_AT_INIT).
    - Trainable parameters: all of the model's (TRAINS_BASE), so trainable_count adds none.
    - Its "adapter" on disk is the trained weights themselves; merging is a no-op.
    - It is the variant parasitic extraction piggy-backs on (DESIGN.md).
    - QUANTIZABLE_BASE is False: quantized weights cannot be trained.

Defaults: lr 1e-4, weight decay 0.01. Devlin et al. fine-tune BERT at 2e-5 to 5e-5 for 3
epochs; runs of a few hundred steps need more, and the engine's 5e-4, set for adapters,
is too high for every weight (measured on this project's SST-2 with MiniLM: 600 steps at
1e-4 reach 0.861 dev accuracy).
"""

from dataclasses import dataclass

name = "full"
IDENTITY_AT_INIT = True
TRAINS_BASE = True
QUANTIZABLE_BASE = False
TEST_CONFIG = {}
TRAIN_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.01}


@dataclass
class Config:
    pass


def param_specs(d_in, d_out, cfg):
    return {}


def forward(layer, x, y):
    return y


def trainable_count(layer_shapes, cfg):
    return 0
