"""<Method name>: <paper title>.

<Authors> (<year>), arXiv:<id>.

Formula
    y = W x + b + <the update, in the paper's notation>
    <each tensor: shape, init, trainable or frozen>

Claims
    - <Is the model unchanged at step 0? Say why; set IDENTITY_AT_INIT to match.>
    - <Trainable parameters per adapted layer, as a formula; trainable_count writes it out.>
    - <What the paper says the method buys: memory, speed, score.>

Defaults: <each hyper-parameter's default and where it comes from (paper section/table).>
"""

# To add a variant: copy this file to variants/<name>.py, replace every <...>, and delete
# what you do not need. It is discovered automatically: the contract tests run on it and
# the DAG can schedule it by name. No other file needs editing.

from dataclasses import dataclass

import torch.nn.functional as F

from variants import ParamSpec, VariantConfig, kaiming_uniform, zeros

# The registry key: what --variant and config files use. Keep it equal to the file name.
name = "template_do_not_register"

# True when forward(layer, x, W x + b) == W x + b for freshly initialised tensors.
IDENTITY_AT_INIT = True

# Overrides for the contract tests' tiny model (hidden size 32): keep ranks small.
TEST_CONFIG = {"rank": 4}


@dataclass
class Config(VariantConfig):
    # Method-specific knobs go here, each with its default and a comment naming its source.
    pass


def param_specs(d_in, d_out, cfg):
    # Tensors added to every targeted nn.Linear, registered as layer.<key>. Keys must start
    # with "lora_". trainable=False makes a frozen buffer (saved, never optimised).
    return {
        "lora_A": ParamSpec((cfg.rank, d_in), kaiming_uniform),
        "lora_B": ParamSpec((d_out, cfg.rank), zeros),
    }


def forward(layer, x, y):
    # x: the layer's input (..., d_in); y: the base output W x + b (..., d_out).
    # layer.lora_config is this variant's Config; layer.weight is the frozen W.
    cfg = layer.lora_config
    if cfg.dropout:
        x = F.dropout(x, cfg.dropout, layer.training)
    return y + (x @ layer.lora_A.T @ layer.lora_B.T) * cfg.scaling


def delta_weight(layer):
    # The dense update dW (d_out x d_in) such that merging W += dW reproduces forward.
    # Delete it if the method cannot be merged (the contract tests then skip merge).
    return (layer.lora_B @ layer.lora_A) * layer.lora_config.scaling


def trainable_count(layer_shapes, cfg):
    # The docstring's formula over all adapted layers [(d_in, d_out), ...], written out by
    # hand: the contract tests compare it with the parameters the model really has.
    return sum(cfg.rank * (d_in + d_out) for d_in, d_out in layer_shapes)


# Optional hooks (see variants/__init__.py for what each does and when it is called):
# init(layer, cfg), group_init(shared, layers, cfg), restore(layer), after_load(layer),
# param_groups(model, lr, cfg), loss_penalty(model), on_step(model, step, max_steps), report(model),
# TRAIN_DEFAULTS, TRAINS_BASE, RESTORES_BASE_EXACTLY, RELOADS_EXACTLY, QUANTIZABLE_BASE,
# RANK_BOUND_BY_LAYER, PEFT_LORA.
