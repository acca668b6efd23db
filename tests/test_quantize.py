"""quantize_base: every variant that leaves W alone trains on a 4-bit or 8-bit frozen base.

Parametrized over the registry, as the contract tests are: a new variant is checked here
(or refused by the run, if it declares QUANTIZABLE_BASE = False) without editing this file.
"""

from __future__ import annotations

import pytest
import torch

import variants
from lorabench import adapters, quantize
from lorabench.run import ConfigError, resolve_hparams
from tests.conftest import build_model, make_batch
from tests.helpers import lora_and_peft
from tests.test_variant_contract import config_for, file_of, logits, train

pytest.importorskip("bitsandbytes")
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

QUANTIZABLE = sorted(name for name, v in variants.REGISTRY.items() if getattr(v, "QUANTIZABLE_BASE", True))
REFUSED = sorted(set(variants.REGISTRY) - set(QUANTIZABLE))


def quantized_model(family: str, fmt: str):
    model = build_model(family)
    quantize.quantize_base(model, fmt)
    return model


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_variant_trains_on_a_quantized_base(name, fmt, family, tmp_path):
    variant, batch = variants.REGISTRY[name], make_batch()
    cfg = config_for(variant)
    model = quantized_model(family, fmt)
    quantized_base = logits(model, batch)
    attachment = adapters.attach(model, variant, cfg)
    file = file_of(variant)
    dense = "set QUANTIZABLE_BASE = False if the method needs the dense base weight"
    assert all(quantize.is_quantized(layer) for layer in attachment.layers.values()), (
        f"{file}: attaching replaced a layer's {fmt} weight; leave layer.weight as it is, or {dense}")
    if variant.IDENTITY_AT_INIT:
        torch.testing.assert_close(logits(model, batch), quantized_base, atol=1e-6, rtol=0, msg=lambda detail: (
            f"{file} declares IDENTITY_AT_INIT = True but changes the {fmt} base model at step 0: forward must add its update to y "
            f"without reading layer.weight (packed {fmt} data), or {dense}.\n{detail}"))
    losses = train(model, variant, cfg, batch, steps=20)
    assert min(losses[1:]) < 0.9 * losses[0], (
        f"{file} on {fmt}: loss never fell below 90% of {losses[0]:.4f}: {losses}; forward must not read layer.weight (packed "
        f"{fmt} data), or {dense}")
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and not p.requires_grad), (
        f"{file}: a frozen base parameter received a gradient on the {fmt} base; leave the base's .grad alone, or {dense}")

    path = adapters.save(model, tmp_path / "adapter.safetensors")
    on_float_base = build_model(family)
    adapters.load(on_float_base, path)
    if not hasattr(variant, "delta_weight"):  # a method that cannot be merged: nothing more to check
        return
    with pytest.raises(adapters.AdapterError, match="quantized weight.*unquantized base"):
        adapters.merge(model)
    adapters.merge(on_float_base)  # the same file serves the full-precision checkpoint


@pytest.mark.parametrize("name", REFUSED)
def test_variants_that_touch_w_refuse_a_quantized_base(name):
    with pytest.raises(ConfigError, match=rf"does not compose with variant {name}.*variants/{name}\.py"):
        resolve_hparams("sst2", name, {"quantize_base": "nf4"})


def test_qlora_is_lora_on_nf4():
    qlora, lora = resolve_hparams("sst2", "qlora", {}), resolve_hparams("sst2", "lora", {})
    assert {key for key in qlora if qlora[key] != lora[key]} == {"quantize_base"}
    assert qlora["quantize_base"] == "nf4"
    with pytest.raises(ConfigError, match="quantize_base='nf3'"):
        resolve_hparams("sst2", "lora", {"quantize_base": "nf3"})


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_linear_weights_take_a_fraction_of_the_memory(fmt):
    def weight_bytes(model):
        layers = adapters.find_targets(model, "all-linear").values()
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.weight, *layer.buffers()))

    ratio = weight_bytes(quantized_model("llama", fmt)) / weight_bytes(build_model("llama"))
    assert ratio < {"nf4": 0.2, "int8": 0.3}[fmt], ratio


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_on_a_4bit_base_equals_peft(family):
    """PEFT wraps the same bitsandbytes layers; from equal weights, outputs and gradients agree."""
    lora = variants.get("lora")
    ours, theirs, attachment = lora_and_peft(family, "all-linear", lora, base=quantized_model(family, "nf4"))
    batch = make_batch()
    ours_out, theirs_out = ours(**batch), theirs(**batch)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, atol=1e-6, rtol=0)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for name, layer in attachment.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        assert quantize.is_quantized(module.get_base_layer())
        for key in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, key).grad, getattr(module, key)["default"].weight.grad, atol=1e-6, rtol=0)


def test_training_after_an_evaluation_keeps_gradients_flowing():
    """bitsandbytes would repack NF4 weights for a CPU inference kernel without a backward at
    the first eval-mode call; quantize_base turns that off, since runs evaluate mid-training."""
    lora, batch = variants.get("lora"), make_batch()
    model = quantized_model("llama", "nf4")
    attachment = adapters.attach(model, lora, config_for(lora))
    logits(model.eval(), batch)
    model.train()(**batch).loss.backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in attachment.layers.values())


def test_quantizing_after_attach_is_refused():
    model = build_model("bert")
    adapters.attach(model, variants.get("lora"), config_for(variants.get("lora")))
    with pytest.raises(quantize.QuantizeError, match="before attaching"):
        quantize.quantize_base(model, "nf4")
