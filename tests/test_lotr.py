"""LoTR against its formula (no PEFT implementation exists): dW_s = (alpha / r) L G_s R^T with
one (L, R) per layer shape, shared and trained by every layer of that shape.

The dense updates are built here by hand from the tensors; the shared factors' gradients are
checked against the sum of every layer's contribution, computed from captured activations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch

pytestmark = [pytest.mark.usefixtures("single_thread")]

lotr = variants.get("lotr")
lora = variants.get("lora")
RANK = 4
ALPHA = 2.0

# (d_out, d_in) of the adapted layers of each tiny model.
SHAPES = {
    # attention query/key/value/output and the pooler 32x32; MLP intermediate 64x32, output 32x64
    "bert": {(32, 32): 9, (64, 32): 2, (32, 64): 2},
    # q_proj and o_proj 32x32, k_proj and v_proj 16x32 (2 KV heads), gate/up 64x32, down 32x64
    "llama": {(32, 32): 4, (16, 32): 4, (64, 32): 4, (32, 64): 2},
}


def attached(family: str):
    model = build_model(family)
    cfg = variants.make_config(lotr, {"rank": RANK, "alpha": ALPHA})
    return model, adapters.attach(model, lotr, cfg)


def randomize_cores(attachment, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_G.copy_(torch.randn(layer.lora_G.shape, generator=generator) * 0.1)


def by_hand(model, layer) -> torch.Tensor:
    """(alpha / r) L G R^T, reading L and R from the model's shared module by their names."""
    d_out, d_in = layer.weight.shape
    left = model.lora_shared.get_parameter(f"lora_L_{d_out}x{d_in}")
    right = model.lora_shared.get_parameter(f"lora_R_{d_out}x{d_in}")
    return ALPHA / RANK * torch.einsum("ik,kl,jl->ij", left, layer.lora_G, right)


def test_init_is_the_authors(family):
    model, attachment = attached(family)
    for layer in attachment.layers.values():
        assert layer.lora_G.shape == (RANK, RANK) and not layer.lora_G.any()
    factors = torch.cat([p.flatten() for p in model.lora_shared.parameters()])
    assert abs(factors.mean()) < 0.1 and abs(factors.std() - 1) < 0.1  # N(0, 1)


def test_factors_are_shared_by_shape(family):
    model, attachment = attached(family)
    expected = {f"lora_{side}_{d_out}x{d_in}": (d_out if side == "L" else d_in, RANK)
                for d_out, d_in in SHAPES[family] for side in "LR"}
    assert {name: tuple(p.shape) for name, p in model.lora_shared.named_parameters()} == expected
    assert all(p.requires_grad for p in model.lora_shared.parameters())
    users = {}
    for layer in attachment.layers.values():
        left, right = lotr.factors(layer)
        assert left is model.lora_shared.get_parameter(f"lora_L_{layer.out_features}x{layer.in_features}")
        users.setdefault(id(left), []).append(layer)
        assert right is model.lora_shared.get_parameter(f"lora_R_{layer.out_features}x{layer.in_features}")
    assert sorted(map(len, users.values())) == sorted(SHAPES[family].values())
    if family == "bert":
        attention = [name for name in attachment.layers if ".attention." in name]
        assert len(attention) == 8
        assert len({id(lotr.factors(attachment.layers[name])[0]) for name in attention}) == 1
        mlp_in = [name for name in attachment.layers if name.endswith("intermediate.dense")]
        mlp_out = [name for name in attachment.layers if name.endswith(".output.dense") and ".attention." not in name]
        assert len(mlp_in) == len(mlp_out) == 2
        groups = [{id(lotr.factors(attachment.layers[name])[0]) for name in names} for names in (attention, mlp_in, mlp_out)]
        assert all(len(group) == 1 for group in groups) and len(set.union(*groups)) == 3


def test_outputs_and_delta_equal_the_dense_formula(family):
    model, attachment = attached(family)
    randomize_cores(attachment)
    base = build_model(family)
    merged_by_hand = copy.deepcopy(base)
    batch = make_batch()
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            delta = by_hand(model, layer)
            torch.testing.assert_close(lotr.delta_weight(layer), delta, atol=1e-6, rtol=0)
            x = torch.randn(5, layer.in_features)
            bias = layer.bias if layer.bias is not None else 0.0
            torch.testing.assert_close(layer(x), x @ (layer.weight + delta).T + bias, atol=1e-5, rtol=0)
            merged_by_hand.get_submodule(name).weight += delta
        hooked = model(**batch).logits
        assert not torch.allclose(hooked, base(**batch).logits, atol=1e-4), "adapter is a no-op"
        torch.testing.assert_close(hooked, merged_by_hand(**batch).logits, atol=1e-5, rtol=0)


def test_shared_gradients_sum_every_layer_of_the_shape(family):
    """dLoss/dL = sum_s (alpha/r) dY_s^T X_s R G_s^T and dLoss/dR = sum_s (alpha/r) X_s^T dY_s L G_s
    over the layers s of that shape; each core gets only its own layer's gradient."""
    model, attachment = attached(family)
    randomize_cores(attachment)
    captured = {}

    def capture(name):
        def hook(layer, args, output):
            output.retain_grad()
            captured[name] = (args[0].detach().reshape(-1, layer.in_features), output)
        return hook

    for name, layer in attachment.layers.items():
        layer.register_forward_hook(capture(name))  # after the adapter's hook: sees the adapted output
    model(**make_batch()).loss.backward()

    expected_left, expected_right = {}, {}
    scale = ALPHA / RANK
    for name, layer in attachment.layers.items():
        x, output = captured[name]
        dy = output.grad.reshape(-1, layer.out_features)
        left, right = lotr.factors(layer)
        core = layer.lora_G.detach()
        shape = (layer.out_features, layer.in_features)
        expected_left[shape] = expected_left.get(shape, 0) + scale * dy.T @ x @ right.detach() @ core.T
        expected_right[shape] = expected_right.get(shape, 0) + scale * x.T @ dy @ left.detach() @ core
        torch.testing.assert_close(layer.lora_G.grad, scale * left.detach().T @ dy.T @ x @ right.detach(),
                                   atol=1e-6, rtol=1e-4)
    for (d_out, d_in), grad in expected_left.items():
        torch.testing.assert_close(model.lora_shared.get_parameter(f"lora_L_{d_out}x{d_in}").grad, grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.lora_shared.get_parameter(f"lora_R_{d_out}x{d_in}").grad,
                                   expected_right[(d_out, d_in)], atol=1e-6, rtol=1e-4)


def test_trainable_count_matches_the_hand_count(family):
    model, attachment = attached(family)
    shapes = SHAPES[family]
    expected = sum(RANK * (d_out + d_in) for d_out, d_in in shapes) + RANK * RANK * sum(shapes.values())
    adapter_params = sum(p.numel() for name, p in adapters.trainable_parameters(model) if "lora_" in name)
    assert adapter_params == expected
    layer_shapes = [(layer.in_features, layer.out_features) for layer in attachment.layers.values()]
    cfg = attachment.config
    assert lotr.trainable_count(layer_shapes, cfg) == expected
    assert expected < lora.trainable_count(layer_shapes, cfg)


def test_save_load_round_trips_the_shared_factors(family, tmp_path):
    model, attachment = attached(family)
    randomize_cores(attachment)
    path = adapters.save(model, tmp_path / "lotr.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    shared_keys = {key for key in keys if key.startswith("lora_shared.")}
    assert shared_keys == {f"lora_shared.lora_{side}_{d_out}x{d_in}" for d_out, d_in in SHAPES[family] for side in "LR"}
    assert {key for key in keys if key.endswith(".lora_G")} == {f"{name}.lora_G" for name in attachment.layers}

    fresh = build_model(family)
    torch.manual_seed(123)  # other random factors at attach: load must overwrite them
    loaded = adapters.load(fresh, path)
    for name, parameter in model.lora_shared.named_parameters():
        assert torch.equal(fresh.lora_shared.get_parameter(name), parameter)
    for layer in loaded.layers.values():
        assert lotr.factors(layer)[0] is fresh.lora_shared.get_parameter(f"lora_L_{layer.out_features}x{layer.in_features}")
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
