"""Delta-LoRA: W moves by the delta of B A after the start step, without a gradient of its own."""

from __future__ import annotations

import pytest
import torch

import variants
from lorabench import adapters
from lorabench.train import TrainConfig, make_optimizer, training_loss

pytestmark = pytest.mark.usefixtures("single_thread")

delta_lora = variants.get("delta_lora")


def trained(make_model, batch, steps: int, start_step: int):
    model = make_model()
    cfg = variants.make_config(delta_lora, {"rank": 4, "alpha": 8.0, "start_step": start_step, "update_ratio": 2.0})
    base = {name: layer.weight.detach().clone() for name, layer in adapters.find_targets(model, "all-linear").items()}
    attachment = adapters.attach(model, delta_lora, cfg)
    optimizer = make_optimizer(model, delta_lora, cfg, TrainConfig(lr=1e-2))
    for step in range(1, steps + 1):
        loss, _ = training_loss(model, delta_lora, batch)
        loss.backward()
        optimizer.step()
        delta_lora.on_step(model, step, steps)
        optimizer.zero_grad(set_to_none=True)
    return model, attachment, base


def test_w_moves_by_the_telescoped_delta_and_gets_no_gradient(make_model, batch):
    model, attachment, base = trained(make_model, batch, steps=6, start_step=2)
    optimizer_params = {id(p) for p in model.parameters() if p.requires_grad}
    for name, layer in attachment.layers.items():
        assert id(layer.weight) not in optimizer_params and layer.weight.grad is None
        moved = layer.weight - base[name]
        assert moved.abs().max() > 1e-4, f"{name}: W did not move"
        expected = 2.0 * 2.0 * (layer.lora_B @ layer.lora_A - layer.lora_B_start @ layer.lora_A_start)
        torch.testing.assert_close(moved, expected, atol=1e-6, rtol=0)


def test_w_stays_until_the_start_step(make_model, batch):
    model, attachment, base = trained(make_model, batch, steps=3, start_step=3)
    for name, layer in attachment.layers.items():
        assert torch.equal(layer.weight, base[name])
        assert torch.equal(layer.lora_B_start, layer.lora_B) and layer.lora_B.abs().sum() > 0


def test_the_file_holds_what_rebuilds_w(make_model, batch, tmp_path):
    model, attachment, base = trained(make_model, batch, steps=6, start_step=2)
    path = adapters.save(model, tmp_path / "delta.safetensors")
    fresh = make_model()
    loaded = adapters.load(fresh, path)
    for name, layer in loaded.layers.items():
        torch.testing.assert_close(layer.weight, attachment.layers[name].weight, atol=1e-6, rtol=0)
    assert any(key.endswith("lora_A_start") for key in adapters.adapter_state(fresh))
    assert not any(key.endswith("_prev") for key in adapters.adapter_state(fresh))


def test_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout must be 0 for delta_lora"):
        variants.make_config(delta_lora, {"dropout": 0.1})
