"""PiSSA against PEFT's PiSSA initialisation, and the properties the paper's method rests on."""

from __future__ import annotations

import copy

import pytest
import torch

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch
from tests.helpers import same_loss_then_backward

peft = pytest.importorskip("peft")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

pissa = variants.get("pissa")


def attach_pissa(model, **overrides):
    cfg = variants.make_config(pissa, {"rank": 4, "alpha": 8.0, **overrides})
    return adapters.attach(model, pissa, cfg)


def both_from_one_base(family):
    """(base, ours, our attachment, PEFT's PiSSA model) built from the same base weights."""
    base = build_model(family)
    ours = copy.deepcopy(base)
    attachment = attach_pissa(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                            target_modules=list(attachment.layers), task_type=TaskType.SEQ_CLS))
    return base, ours, attachment, theirs


def test_residual_and_principal_part_equal_peft(family):
    base, ours, attachment, theirs = both_from_one_base(family)
    for name, layer in attachment.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        principal = layer.lora_config.scaling * layer.lora_B @ layer.lora_A
        theirs_principal = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        torch.testing.assert_close(principal, theirs_principal, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.weight, module.base_layer.weight, atol=1e-5, rtol=0)
        original = base.get_submodule(name).weight
        torch.testing.assert_close(layer.weight + principal, original, atol=1e-6, rtol=0)


def test_gradients_equal_peft_from_the_same_factors(family):
    _, ours, attachment, theirs = both_from_one_base(family)
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            module = theirs.base_model.model.get_submodule(name)
            module.base_layer.weight.copy_(layer.weight)
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
    same_loss_then_backward(ours, theirs, make_batch())
    for name, layer in attachment.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, module.lora_A["default"].weight.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B.grad, module.lora_B["default"].weight.grad, atol=1e-6, rtol=0)


def test_adapter_starts_from_the_top_singular_triplets():
    model = build_model("bert")
    original = {name: module.weight.clone() for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    attachment = attach_pissa(model)
    for name, layer in attachment.layers.items():
        singular = torch.linalg.svdvals(original[name].double())
        principal = layer.lora_config.scaling * (layer.lora_B @ layer.lora_A).double()
        torch.testing.assert_close(torch.linalg.svdvals(principal)[:4], singular[:4], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.linalg.svdvals(layer.weight.double())[:4], singular[4:8], atol=1e-5, rtol=0)


def with_decaying_spectra(model):
    """Pretrained weights have decaying spectra (random ones do not): give every linear one."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                d_out, d_in = module.weight.shape
                u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator))
                v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator))
                k = min(d_out, d_in)
                module.weight.copy_(u[:, :k] @ torch.diag(0.7 ** torch.arange(k, dtype=torch.float32)) @ v[:, :k].T)
    return model


def test_randomized_svd_is_close_to_exact_and_reloads_exactly(tmp_path):
    exact, fast = with_decaying_spectra(build_model("bert")), with_decaying_spectra(build_model("bert"))
    attach_pissa(exact)
    attachment = attach_pissa(fast, svd_niter=4)
    for name, layer in attachment.layers.items():
        torch.testing.assert_close(layer.weight, exact.get_submodule(name).weight, atol=1e-4, rtol=0)
    path = adapters.save(fast, tmp_path / "pissa.safetensors")
    reloaded = with_decaying_spectra(build_model("bert"))
    adapters.load(reloaded, path)
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, fast(**batch).logits)


def test_merge_after_training_matches_original_weight_plus_update():
    base = build_model("bert")
    model = copy.deepcopy(base)
    attachment = attach_pissa(model)
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_B.add_(0.01)
    expected = {name: base.get_submodule(name).weight + pissa.delta_weight(layer) for name, layer in attachment.layers.items()}
    adapters.merge(model)
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, weight, atol=1e-5, rtol=0)
