"""VeRA against PEFT's VeRA: same seeded projections, same outputs, gradients and dW; the
saved adapter holds only the vectors and the projections come back from the seed."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch
from tests.helpers import same_loss_then_backward

peft = pytest.importorskip("peft")
from peft import TaskType, VeraConfig, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

vera = variants.get("vera")
RANK = 8


def wrap_both(family: str):
    base = build_model(family)
    ours = copy.deepcopy(base)
    cfg = variants.make_config(vera, {"rank": RANK, "projection_seed": 5, "d_initial": 0.1})
    attachment = adapters.attach(ours, vera, cfg)
    names = list(attachment.layers)
    theirs = get_peft_model(
        copy.deepcopy(base),
        VeraConfig(r=RANK, target_modules=names, projection_prng_key=5, d_initial=0.1, vera_dropout=0.0,
                   task_type=TaskType.SEQ_CLS),
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            layer.lora_lambda_b.copy_(torch.randn(layer.lora_lambda_b.shape, generator=generator) * 0.1)
            module = theirs.base_model.model.get_submodule(name)
            module.vera_lambda_b["default"].copy_(layer.lora_lambda_b)
            module.vera_lambda_d["default"].copy_(layer.lora_lambda_d)
    return ours, theirs, attachment


def test_projections_are_peft_s_from_the_same_seed(family):
    ours, theirs, _ = wrap_both(family)
    assert torch.equal(ours.lora_shared.lora_vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.lora_shared.lora_vera_B, theirs.base_model.vera_B["default"])


def test_outputs_gradients_and_delta_equal_peft(family):
    ours, theirs, attachment = wrap_both(family)
    same_loss_then_backward(ours, theirs, make_batch())
    for name, layer in attachment.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        for ours_key, theirs_key in (("lora_lambda_b", "vera_lambda_b"), ("lora_lambda_d", "vera_lambda_d")):
            torch.testing.assert_close(getattr(layer, ours_key).grad, getattr(module, theirs_key)["default"].grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(vera.delta_weight(layer), module.get_delta_weight("default"), atol=1e-6, rtol=0)
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert ours_trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_adapter_file_holds_only_the_vectors_and_reloads(tmp_path, family):
    ours, _, attachment = wrap_both(family)
    path = adapters.save(ours, tmp_path / "vera.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert not [key for key in keys if "vera_A" in key or "vera_B" in key]
    assert {key.rsplit(".", 1)[1] for key in keys if key.startswith(tuple(attachment.layers))} == {"lora_lambda_b", "lora_lambda_d"}
    fresh = build_model(family)
    adapters.load(fresh, path)
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, ours(**batch).logits)


def test_one_pair_of_projections_is_shared_by_every_layer(family):
    ours, _, attachment = wrap_both(family)
    assert all(layer.lora_shared is ours.lora_shared for layer in attachment.layers.values())
    shared_buffers = [name for name, _ in ours.named_buffers() if "vera_" in name]
    assert shared_buffers == ["lora_shared.lora_vera_A", "lora_shared.lora_vera_B"]
