"""DeLoRA against PEFT's DeLoRA, from the same weights: same column norms, outputs, gradients
(A, B, lambda and the head) and dW; the update's norm bound; the norms stored with the adapter.

Both wrap deep copies of one tiny base model; PEFT's Kaiming A is copied into ours, B (zero at
init in both) is set to the same random values and lambda to the same per-layer values, so
every path of the update is exercised.

Deliberate differences from PEFT, none of which shows in these comparisons:
    - PEFT's ``module_dropout`` is our ``dropout`` (both an nn.Dropout on the layer's input);
      test_dropout_is_peft_s_module_dropout draws the same masks in both.
    - PEFT refuses quantized layers; we take the column norms of the dequantized 4-/8-bit
      weight once at init (test_quantized_base_norms_are_stored_with_the_adapter).
"""

from __future__ import annotations

import copy

import pytest
import torch

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch
from tests.helpers import PEFT_PREFIX, same_loss_then_backward

peft = pytest.importorskip("peft")
from peft import DeloraConfig, TaskType, get_peft_model  # noqa: E402
from peft.tuners.delora import DeloraLayer  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

delora = variants.get("delora")
RANK = 4
LAMBDA = 15.0  # PEFT's default delora_lambda


def wrap_both(family: str, dropout: float = 0.0, targets="all-linear"):
    base = build_model(family)
    ours = copy.deepcopy(base)
    cfg = variants.make_config(delora, {"rank": RANK, "lambda_init": LAMBDA, "dropout": dropout})
    attachment = adapters.attach(ours, delora, cfg, targets)
    names = list(attachment.layers)
    theirs = get_peft_model(
        copy.deepcopy(base),
        DeloraConfig(r=RANK, delora_lambda=LAMBDA, module_dropout=dropout, target_modules=names,
                     task_type=TaskType.SEQ_CLS),
    )
    adapted = {name.removeprefix(PEFT_PREFIX) for name, m in theirs.named_modules() if isinstance(m, DeloraLayer)}
    assert adapted == set(names)
    return ours, theirs, attachment


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def randomize(theirs, attachment, seed: int = 7):
    """Ours takes PEFT's A; both get the same random B and per-layer lambda."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            module = peft_layer(theirs, name)
            layer.lora_A.copy_(module.delora_A["default"])
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            layer.lora_lambda.fill_(LAMBDA * (0.5 + torch.rand((), generator=generator).item()))
            module.delora_B["default"].copy_(layer.lora_B)
            module.delora_lambda["default"].copy_(layer.lora_lambda)


def head_name(model) -> str:
    (name,) = adapters.task_heads(model)
    return name


def test_init_matches_peft(family):
    ours, theirs, attachment = wrap_both(family)
    for name, layer in attachment.layers.items():
        module = peft_layer(theirs, name)
        assert torch.equal(layer.lora_w_norm, module.delora_w_norm["default"]), name
        assert torch.equal(layer.lora_lambda, module.delora_lambda["default"])
        assert not layer.lora_B.any() and not module.delora_B["default"].any()
        assert layer.lora_A.shape == module.delora_A["default"].shape
        bound = 1 / layer.in_features**0.5  # Kaiming-uniform with a = sqrt(5), as PEFT
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    ours_trainable = sum(p.numel() for _, p in adapters.trainable_parameters(ours))
    assert ours_trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_outputs_gradients_and_delta_equal_peft(family):
    ours, theirs, attachment = wrap_both(family)
    randomize(theirs, attachment)
    batch = make_batch()
    with torch.no_grad():
        assert not torch.allclose(ours(**batch).logits, build_model(family)(**batch).logits, atol=1e-4), "no-op"
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-6, rtol=0)
    same_loss_then_backward(ours, theirs, batch)

    for name, layer in attachment.layers.items():
        module = peft_layer(theirs, name)
        for ours_key, theirs_key in (("lora_A", "delora_A"), ("lora_B", "delora_B"), ("lora_lambda", "delora_lambda")):
            ours_grad, theirs_grad = getattr(layer, ours_key).grad, getattr(module, theirs_key)["default"].grad
            assert ours_grad.abs().sum() > 0, f"{name}.{ours_key} gradient is zero"
            torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=0, msg=f"{name}.{ours_key}")
        with torch.no_grad():
            torch.testing.assert_close(delora.delta_weight(layer), module.get_delta_weight("default"), atol=1e-6, rtol=0)

    head = head_name(ours)
    peft_head = getattr(theirs.base_model.model, head).modules_to_save["default"]
    for key, parameter in getattr(ours, head).named_parameters():
        torch.testing.assert_close(parameter.grad, getattr(peft_head, key).grad, atol=1e-6, rtol=0)


def test_dropout_is_peft_s_module_dropout():
    """In training mode, the same seed draws the same masks in both (ours and PEFT's dropout on
    the layer input, and the base model's own dropout, run in the same order)."""
    ours, theirs, attachment = wrap_both("bert", dropout=0.3)
    randomize(theirs, attachment)
    ours.train(), theirs.train()
    batch = make_batch()
    with torch.no_grad():
        torch.manual_seed(11)
        ours_logits = ours(**batch).logits
        torch.manual_seed(11)
        theirs_logits = theirs(**batch).logits
        torch.manual_seed(12)
        other = ours(**batch).logits
    torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-6, rtol=0)
    assert not torch.allclose(ours_logits, other, atol=1e-4), "dropout had no effect"


def test_update_norm_is_bounded_by_lambda_and_w():
    """||dW||_F <= |lambda| max_j ||W_:,j|| <= |lambda| ||W||_2 for any A, B, lambda (also B
    below the 1e-4 clamp); rank 1 with a along W's largest column attains the first bound."""
    model = build_model("llama")
    attachment = adapters.attach(model, delora, variants.make_config(delora, {"rank": RANK}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in attachment.layers.values():
            weight = layer.weight
            max_column = weight.norm(dim=0).max()
            for b_scale in (1e-6, 1e-2, 1.0, 100.0):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * b_scale)
                layer.lora_lambda.fill_(float(torch.randn((), generator=generator) * 20))
                norm = delora.delta_weight(layer).norm()
                lam = layer.lora_lambda.abs()
                assert norm <= lam * max_column * (1 + 1e-5)
                assert lam * max_column <= lam * torch.linalg.matrix_norm(weight, ord=2) * (1 + 1e-5)
                assert norm <= lam * weight.norm()

    rank_one = build_model("bert")
    cfg = variants.make_config(delora, {"rank": 1})
    layer = next(iter(adapters.attach(rank_one, delora, cfg).layers.values()))
    with torch.no_grad():
        column = int(layer.weight.norm(dim=0).argmax())
        layer.lora_A.zero_()
        layer.lora_A[0, column] = 0.3
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        torch.testing.assert_close(delora.delta_weight(layer).norm(), 15.0 * layer.weight[:, column].norm())


def test_adapter_file_stores_the_column_norms(family, tmp_path):
    ours, _, attachment = wrap_both(family)
    path = adapters.save(ours, tmp_path / "delora.safetensors")
    fresh = build_model(family)
    fresh_attachment = adapters.load(fresh, path)
    for name, layer in attachment.layers.items():
        assert torch.equal(fresh_attachment.layers[name].lora_w_norm, layer.lora_w_norm)
    with torch.no_grad():
        assert torch.equal(fresh(**make_batch()).logits, ours(**make_batch()).logits)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_base_norms_are_stored_with_the_adapter(fmt, tmp_path):
    """On a 4-/8-bit base the norms are those of the dequantized W (what the layer computes
    with), and loading the adapter onto the float checkpoint keeps them, not W's own."""
    pytest.importorskip("bitsandbytes")
    from lorabench import quantize

    model = build_model("bert")
    quantize.quantize_base(model, fmt)
    with torch.no_grad():
        model(**make_batch())  # an 8-bit layer moves its scales off the weight at its first call
    attachment = adapters.attach(model, delora, variants.make_config(delora, {"rank": RANK}))
    float_base = build_model("bert")
    for name, layer in attachment.layers.items():
        dense = delora.dense_weight(layer)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, atol=1e-5, rtol=0)  # W as the layer sees it
        torch.testing.assert_close(layer.lora_w_norm, dense.norm(dim=0))
        float_norm = float_base.get_submodule(name).weight.norm(dim=0)
        torch.testing.assert_close(layer.lora_w_norm, float_norm, atol=0.1, rtol=0.1)
        assert not torch.equal(layer.lora_w_norm, float_norm)
    path = adapters.save(model, tmp_path / "delora.safetensors")
    loaded = adapters.load(float_base, path)
    for name, layer in attachment.layers.items():
        assert torch.equal(loaded.layers[name].lora_w_norm, layer.lora_w_norm)
