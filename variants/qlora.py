"""QLoRA: Efficient Finetuning of Quantized LLMs.

Dettmers, Pagnoni, Holtzman, Zettlemoyer (2023), arXiv:2305.14314.

Formula
    y = dequant(W_nf4) x + b + (alpha / r) * B A dropout(x)
    LoRA (variants/lora.py) on a frozen base stored in 4-bit NormalFloat with double
    quantization; A, B and the task head stay in the model's precision.

Claims
    - B = 0 at init, so the model equals the *quantized* base at step 0 (IDENTITY_AT_INIT).
    - The base takes about a quarter of its 16-bit memory (an eighth of float32), so a 65B
      model fine-tunes on one 48 GB GPU, matching 16-bit LoRA's scores (the paper's
      sections 4-5).
    - Trainable parameters: LoRA's, r (d_in + d_out) per adapted layer.

This file is a named preset: ``quantize_base: nf4`` (lorabench/quantize.py) composes with
every variant that leaves W alone; ``qlora`` is ``lora`` with that option on by default.
Defaults: r = 8, alpha = 16 as lora (the paper uses r = 64, alpha = 16 on all linear layers of
LLaMA models; on the small encoders here r = 8 keeps it comparable with lora).
"""

from variants import lora

name = "qlora"
IDENTITY_AT_INIT = True
PEFT_LORA = True  # exports to PEFT's LoRA format; PEFT loads it onto its own 4-bit base
TEST_CONFIG = lora.TEST_CONFIG
TRAIN_DEFAULTS = {"quantize_base": "nf4"}

Config = lora.Config
param_specs = lora.param_specs
forward = lora.forward
delta_weight = lora.delta_weight
trainable_count = lora.trainable_count
