"""LoRA+ against PEFT's create_loraplus_optimizer: the same updates from the same weights.

LoRA+ changes nothing but the optimizer, so the check is a few AdamW steps on both sides.
The task head is frozen for the comparison, because of one deliberate difference (asserted
below): PEFT puts every 1-D trainable parameter, the head's bias included, in B's
faster group, which the paper does not ask for; ours gives the ratio to B alone.
"""

from __future__ import annotations

import pytest
import torch

import variants
from lorabench import adapters
from lorabench.train import TrainConfig, make_optimizer
from tests.conftest import make_batch
from tests.helpers import lora_and_peft, step_each

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

lora_plus = variants.get("lora_plus")
LR, RATIO = 1e-3, 16.0


def freeze_heads(model) -> None:
    for name, parameter in model.named_parameters():
        if name.removeprefix("base_model.model.").split(".")[0] in adapters.TASK_HEADS:
            parameter.requires_grad_(False)


def test_our_groups_give_b_alone_the_ratio(family):
    ours, _, attachment = lora_and_peft(family, "all-linear", lora_plus)
    cfg = variants.make_config(lora_plus, {"rank": 4, "alpha": 8.0, "lr_ratio": RATIO})
    optimizer = make_optimizer(ours, lora_plus, cfg, TrainConfig(lr=LR, weight_decay=0.01))
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    for layer in attachment.layers.values():
        assert lr_of[id(layer.lora_B)] == (LR * RATIO, 0.01)
        assert lr_of[id(layer.lora_A)] == (LR, 0.01)
    for parameter in ours.get_submodule(adapters.task_heads(ours)[0]).parameters():
        assert lr_of[id(parameter)] == (LR, 0.01 if parameter.ndim == 2 else 0.0)


def test_peft_gives_the_head_bias_the_ratio_too():
    _, theirs, _ = lora_and_peft("bert", "all-linear", lora_plus)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    bias = theirs.base_model.model.classifier.modules_to_save["default"].bias
    (group,) = [group for group in optimizer.param_groups if any(p is bias for p in group["params"])]
    assert group["lr"] == LR * RATIO


@pytest.mark.parametrize("targets", ["all-linear", ["query", "value"]], ids=["all-linear", "query,value"])
def test_lora_plus_updates_equal_peft(targets):
    family = "bert"
    ours, theirs, attachment = lora_and_peft(family, targets, lora_plus)
    freeze_heads(ours)
    freeze_heads(theirs)
    cfg = variants.make_config(lora_plus, {"rank": 4, "alpha": 8.0, "lr_ratio": RATIO})
    ours_optimizer = make_optimizer(ours, lora_plus, cfg, TrainConfig(lr=LR, weight_decay=0.0))
    theirs_optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    batch = make_batch()
    initial = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in attachment.layers.items()}
    for step in range(3):
        step_each([(ours, ours_optimizer), (theirs, theirs_optimizer)], batch)
        for name, layer in attachment.layers.items():
            module = theirs.base_model.model.get_submodule(name)
            for key in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(layer, key), getattr(module, key)["default"].weight, atol=1e-6, rtol=0)
        if step == 0:  # Adam's first step moves each entry by about its learning rate
            for name, layer in attachment.layers.items():
                a0, b0 = initial[name]
                assert (layer.lora_A - a0).abs().max().item() == pytest.approx(LR, rel=0.05)
                assert (layer.lora_B - b0).abs().max().item() == pytest.approx(LR * RATIO, rel=0.05)
