"""LoRA-FA against PEFT's create_lorafa_optimizer, and the activation memory it saves.

Our projection is a gradient hook on B and the optimizer is the engine's torch AdamW;
PEFT's is a custom AdamW that projects B's gradient itself. Two differences are neutralised
here: PEFT's AdamW is transformers' old one, which adds eps = 1e-6 to sqrt(v) before bias
correction where torch adds its 1e-8 after (with eps -> 0 the two are the same algorithm,
so both get eps = 1e-20, and run in float64, where no gradient entry is float noise that
Adam's sign-like first step would blow up to +-lr); and PEFT computes the projection under bf16 autocast whenever bf16
is available, even on CPU, where ours stays in the model's precision.
"""

from __future__ import annotations

import pytest
import torch

import variants
from lorabench import adapters, measure
from lorabench.train import TrainConfig, make_optimizer
from tests.conftest import build_model, make_batch
from tests.helpers import lora_and_peft, step_each

peft = pytest.importorskip("peft")
import peft.optimizers.lorafa as peft_lorafa  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

lora, lora_fa = variants.get("lora"), variants.get("lora_fa")
LR = 1e-3
PEFT_EPS = 1e-6
NEGLIGIBLE_EPS = 1e-20


def test_a_is_frozen_and_b_alone_trains(make_model):
    model = make_model()
    attachment = adapters.attach(model, lora_fa, variants.make_config(lora_fa, {"rank": 4}))
    for layer in attachment.layers.values():
        assert "lora_A" in layer._buffers and "lora_A" not in layer._parameters
        assert layer.lora_B.requires_grad


def test_projected_gradient_is_the_formula(family):
    ours, _, attachment = lora_and_peft(family, "all-linear", lora_fa)
    plain = build_model(family)
    unprojected = variants.make_config(lora_fa, {"rank": 4, "alpha": 8.0, "projected_gradient": False})
    plain_layers = adapters.attach(plain, lora_fa, unprojected).layers
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            plain_layers[name].lora_A.copy_(layer.lora_A)
            plain_layers[name].lora_B.copy_(layer.lora_B)
    batch = make_batch()
    ours(**batch).loss.backward()
    plain(**batch).loss.backward()
    for name, layer in attachment.layers.items():
        a, raw = layer.lora_A, plain_layers[name].lora_B.grad
        expected = raw @ torch.linalg.inv(a @ a.T) / layer.lora_config.scaling**2
        torch.testing.assert_close(layer.lora_B.grad, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_fa_updates_equal_peft(family, monkeypatch):
    ours, theirs, attachment = lora_and_peft(family, "all-linear", lora_fa)
    ours.double()
    theirs.double()
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    theirs_optimizer = peft_lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=LR)
    assert theirs_optimizer.param_groups[0]["eps"] == PEFT_EPS
    ours_optimizer = make_optimizer(ours, lora_fa, attachment.config, TrainConfig(lr=LR, weight_decay=0.0))
    assert all(group["eps"] == 1e-8 for group in ours_optimizer.param_groups)
    for group in ours_optimizer.param_groups + theirs_optimizer.param_groups:
        group["eps"] = NEGLIGIBLE_EPS
    initial_a = {name: layer.lora_A.clone() for name, layer in attachment.layers.items()}
    batch = make_batch()
    for _ in range(3):
        step_each([(ours, ours_optimizer), (theirs, theirs_optimizer)], batch)
        for name, layer in attachment.layers.items():
            module = theirs.base_model.model.get_submodule(name)
            assert torch.equal(layer.lora_A, initial_a[name]) and torch.equal(module.lora_A["default"].weight, initial_a[name])
            torch.testing.assert_close(layer.lora_B, module.lora_B["default"].weight, atol=1e-6, rtol=0, msg=name)
        head = adapters.task_heads(ours)[0]
        for key, parameter in ours.get_submodule(head).named_parameters():
            peft_head = theirs.base_model.model.get_submodule(head).modules_to_save["default"]
            torch.testing.assert_close(parameter, getattr(peft_head, key), atol=1e-6, rtol=0)


def test_activation_memory_is_below_loras(family):
    """The paper's claim, measured: autograd keeps less for backward when A is frozen."""
    saved = {}
    for variant in (lora, lora_fa):
        model = build_model(family).train()
        adapters.attach(model, variant, variants.make_config(variant, {"rank": 4}))
        saved[variant.name] = measure.saved_activation_bytes(model, make_batch())
    assert saved["lora_fa"] < 0.9 * saved["lora"], saved
