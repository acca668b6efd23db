"""DoRA against PEFT's DoRA (use_dora=True) from the same weights, and EDoRA against DoRA's
formula written out densely.

For DoRA, PEFT's A, B and magnitude are overwritten with ours (B random and m perturbed, so
neither path is trivial); logits, the gradients of A, B, m and the head, and the merged
weights must agree. The only differences are float rounding: we build W + s B A with one
addmm (PEFT: W + s * (B(A(I)))^T) and merge W += (m / n)(W + s B A) - W, where PEFT sets
W = (m / n)(W + s B A).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch

peft = pytest.importorskip("peft")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

dora = variants.get("dora")
edora = variants.get("edora")
RANK, ALPHA = 4, 8.0
CASES = [("bert", "all-linear"), ("bert", ["query", "value"]), ("llama", "all-linear"), ("llama", ["q_proj", "v_proj"])]
CASE_IDS = ["bert-all-linear", "bert-query,value", "llama-all-linear", "llama-q_proj,v_proj"]


def with_random_biases(model):
    """BERT initialises its biases to zero, which would hide a rescaled bias."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def dora_and_peft(family, targets, dropout=0.0):
    """Our DoRA and PEFT's on deep copies of one base model, with equal A, B and m."""
    base = with_random_biases(build_model(family))
    ours = copy.deepcopy(base)
    cfg = variants.make_config(dora, {"rank": RANK, "alpha": ALPHA, "dropout": dropout})
    attachment = adapters.attach(ours, dora, cfg, targets)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=True,
        target_modules=list(attachment.layers), task_type=TaskType.SEQ_CLS))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude.shape, generator=generator))
            module = theirs.base_model.model.get_submodule(name)
            assert module.scaling["default"] == cfg.scaling
            tensors = peft_tensors(module)
            torch.testing.assert_close(tensors["lora_magnitude"], torch.linalg.vector_norm(layer.weight, dim=1))
            for key, tensor in tensors.items():
                tensor.copy_(getattr(layer, key))
    return ours, theirs, attachment


def peft_tensors(module):
    return {"lora_A": module.lora_A["default"].weight, "lora_B": module.lora_B["default"].weight,
            "lora_magnitude": module.lora_magnitude_vector["default"].weight}


def assert_same_outputs_and_gradients(ours, theirs, attachment, batch, seed=0):
    """``seed`` is set before each forward, so dropout (when on) draws the same masks."""
    torch.manual_seed(seed)
    ours_out = ours(**batch)
    torch.manual_seed(seed)
    theirs_out = theirs(**batch)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, atol=1e-6, rtol=0)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for name, layer in attachment.layers.items():
        for key, tensor in peft_tensors(theirs.base_model.model.get_submodule(name)).items():
            ours_grad = getattr(layer, key).grad
            assert ours_grad.abs().sum() > 0, f"{name}.{key} gradient is zero"
            torch.testing.assert_close(ours_grad, tensor.grad, atol=1e-6, rtol=0, msg=f"{name}.{key}")
    (head,) = adapters.task_heads(ours)
    peft_head = getattr(theirs.base_model.model, head).modules_to_save["default"]
    for key, parameter in getattr(ours, head).named_parameters():
        torch.testing.assert_close(parameter.grad, getattr(peft_head, key).grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family, targets", CASES, ids=CASE_IDS)
def test_dora_equals_peft_outputs_gradients_and_merge(family, targets):
    ours, theirs, attachment = dora_and_peft(family, targets)
    batch = make_batch()
    with torch.no_grad():
        assert not torch.allclose(ours(**batch).logits, build_model(family)(**batch).logits, atol=1e-4), "adapter is a no-op"
    assert_same_outputs_and_gradients(ours, theirs, attachment, batch)
    assert sum(p.numel() for _, p in adapters.trainable_parameters(ours)) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad)

    names = list(attachment.layers)
    adapters.merge(ours)
    merged = theirs.merge_and_unload()
    for name in names:
        torch.testing.assert_close(ours.get_submodule(name).weight, merged.get_submodule(name).weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dora_with_dropout_in_training_equals_peft(family):
    """With dropout in training, PEFT computes the base part as W dropout(x), not y - b; with one
    seed, both sides draw the same masks in the same order."""
    ours, theirs, attachment = dora_and_peft(family, "all-linear", dropout=0.25)
    ours.train()
    theirs.train()
    assert_same_outputs_and_gradients(ours, theirs, attachment, make_batch())


def test_dora_norm_takes_no_gradient():
    """The norm is a constant (the paper's section 4.3): A and B get gradient only through the
    update path, which we check against autograd on the dense formula with n detached."""
    layer = with_random_biases(build_model("bert")).bert.encoder.layer[0].attention.self.query
    cfg = variants.make_config(dora, {"rank": RANK, "alpha": ALPHA})
    model = torch.nn.Sequential(layer)
    adapters.attach(model, dora, cfg)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    x = torch.randn(5, layer.in_features, generator=generator)
    layer(x).square().sum().backward()
    a, b, m = (tensor.detach().clone().requires_grad_() for tensor in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    adapted = layer.weight + cfg.scaling * b @ a
    dense = (m / torch.linalg.vector_norm(adapted, dim=1).detach())[:, None] * adapted
    F.linear(x, dense, layer.bias).square().sum().backward()
    for ours, reference in ((layer.lora_A, a), (layer.lora_B, b), (layer.lora_magnitude, m)):
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-5, rtol=1e-5)


# --- EDoRA ----------------------------------------------------------------------------------


def attach_edora(model, **overrides):
    cfg = variants.make_config(edora, {"rank": RANK, "alpha": ALPHA, **overrides})
    return adapters.attach(model, edora, cfg)


def test_edora_frozen_factors_are_the_top_singular_triplets():
    model = build_model("bert")
    original = {name: layer.weight.clone() for name, layer in adapters.find_targets(model, "all-linear").items()}
    attachment = attach_edora(model)
    for name, layer in attachment.layers.items():
        u, s, vh = torch.linalg.svd(original[name].double(), full_matrices=False)
        truncation = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]
        b, a = layer.lora_B.double(), layer.lora_A.double()
        torch.testing.assert_close(b @ a, truncation, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.T @ b, torch.eye(RANK, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.linalg.vector_norm(a, dim=1), s[:RANK], atol=1e-6, rtol=0)
        assert "lora_A" in layer._buffers and "lora_B" in layer._buffers
        assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad


@pytest.mark.parametrize("init", ["svd", "random"])
def test_edora_trains_r_squared_plus_d_out_per_layer(init):
    model = build_model("llama")
    attachment = attach_edora(model, init=init)
    for layer in attachment.layers.values():
        trained = {key: p.numel() for key, p in layer.named_parameters() if key.startswith("lora_")}
        assert trained == {"lora_R": RANK * RANK, "lora_magnitude": layer.out_features}
    state = adapters.adapter_state(model)
    assert all(f"{name}.{key}" in state for name in attachment.layers for key in ("lora_A", "lora_B"))


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_edora_is_the_identity_at_init(family, init):
    batch = make_batch()
    model = build_model(family)
    attachment = attach_edora(model, init=init)
    assert all(layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() > 0 for layer in attachment.layers.values())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, build_model(family)(**batch).logits)


def dense_dora_weight(weight, magnitude, update):
    """m / ||W + dW||_c * (W + dW), in float64."""
    adapted = weight.double() + update.double()
    return (magnitude.double() / torch.linalg.vector_norm(adapted, dim=1))[:, None] * adapted


@pytest.mark.parametrize("init", ["svd", "random"])
def test_edora_output_and_merge_equal_the_dense_formula(init):
    base = with_random_biases(build_model("bert"))
    model = copy.deepcopy(base)
    attachment = attach_edora(model, init=init)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=generator))
            layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude.shape, generator=generator))
    scaling = variants.make_config(edora, {"rank": RANK, "alpha": ALPHA}).scaling
    expected = {}
    for name, layer in attachment.layers.items():
        update = scaling * layer.lora_B @ layer.lora_R @ layer.lora_A
        assert update.abs().max() > 1e-3, "the update is negligible; the test would be vacuous"
        expected[name] = dense_dora_weight(base.get_submodule(name).weight, layer.lora_magnitude, update)
        x = torch.randn(3, layer.in_features, generator=generator)
        with torch.no_grad():
            reference = F.linear(x.double(), expected[name], layer.bias.double())
            torch.testing.assert_close(layer(x).double(), reference, atol=1e-5, rtol=0)
    adapters.merge(model)
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight.double(), weight, atol=1e-6, rtol=0)


def test_edora_random_init_reloads_exactly(tmp_path):
    batch = make_batch()
    model = build_model("bert")
    attachment = attach_edora(model, init="random")
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_R.normal_(0, 0.1)
        trained = model(**batch).logits
    path = adapters.save(model, tmp_path / "edora.safetensors")
    torch.manual_seed(123)  # a different draw for the fresh A, B, which loading must overwrite
    reloaded = build_model("bert")
    adapters.load(reloaded, path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)


def test_edora_rejects_an_unknown_init():
    with pytest.raises(ValueError, match="init='pissa'"):
        variants.make_config(edora, {"init": "pissa"})
