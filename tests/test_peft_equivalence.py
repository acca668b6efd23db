"""Our hook-based LoRA against PEFT's module-replacing LoRA, from the same weights.

Both wrap a deep copy of the same tiny base model; PEFT's A and B are overwritten with ours
(B random, so the adapter path is not trivially zero); logits, the gradients of every A and B,
the head's gradients and the dense dW must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch
from tests.helpers import lora_and_peft, peft_targets

peft = pytest.importorskip("peft")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

lora = variants.get("lora")


def head_name(model) -> str:
    (name,) = adapters.task_heads(model)
    return name


@pytest.mark.parametrize(
    "family, targets",
    [("bert", "all-linear"), ("llama", ["q_proj", "v_proj"]), ("llama", "all-linear")],
    ids=["bert-all-linear", "llama-q_proj,v_proj", "llama-all-linear"],
)
def test_lora_equals_peft_outputs_and_gradients(family, targets):
    ours, theirs, attachment = lora_and_peft(family, targets, lora)
    batch = make_batch()
    ours_out, theirs_out = ours(**batch), theirs(**batch)
    assert not torch.allclose(ours_out.logits, build_model(family)(**batch).logits, atol=1e-4), "adapter is a no-op"
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, atol=1e-6, rtol=0)
    ours_out.loss.backward()
    theirs_out.loss.backward()

    for name, layer in attachment.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        for key in ("lora_A", "lora_B"):
            ours_grad, theirs_grad = getattr(layer, key).grad, getattr(module, key)["default"].weight.grad
            assert ours_grad.abs().sum() > 0, f"{name}.{key} gradient is zero"
            torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=0, msg=f"{name}.{key}")
        torch.testing.assert_close(lora.delta_weight(layer), module.get_delta_weight("default"), atol=1e-6, rtol=0)

    head = head_name(ours)
    peft_head = getattr(theirs.base_model.model, head).modules_to_save["default"]
    for key, parameter in getattr(ours, head).named_parameters():
        torch.testing.assert_close(parameter.grad, getattr(peft_head, key).grad, atol=1e-6, rtol=0)

    ours_trainable = sum(p.numel() for _, p in adapters.trainable_parameters(ours))
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_all_linear_selects_the_same_layers_as_peft(family):
    model = build_model(family)
    theirs = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type=TaskType.SEQ_CLS),
    )
    ours = set(adapters.find_targets(model, "all-linear"))
    assert ours == peft_targets(theirs)
    assert not any(name.split(".")[0] in adapters.TASK_HEADS for name in ours)


def test_peft_all_linear_without_task_type_adapts_the_bert_head():
    """A PEFT pitfall we do not share: with no task_type, 'all-linear' on a BERT classifier
    (which has no output embeddings to exclude) puts LoRA on the fresh head and leaves the
    head's own weights frozen. Ours always excludes the head and trains it fully."""
    model = build_model("bert")
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert "classifier" in peft_targets(theirs)
    assert "classifier" not in adapters.find_targets(model, "all-linear")
