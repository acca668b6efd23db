"""The variant contract (DESIGN.md), checked on every discovered variant and on both model families.

Parametrized over ``variants.REGISTRY``: a new file in ``variants/`` is tested here without
editing this file. Each variant is built from its defaults overridden by its ``TEST_CONFIG``.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch

import variants
from lorabench import adapters
from lorabench.train import TrainConfig, make_optimizer, training_loss

pytestmark = pytest.mark.usefixtures("single_thread")

VARIANTS = sorted(variants.REGISTRY)


@pytest.fixture(params=VARIANTS)
def variant(request):
    return variants.REGISTRY[request.param]


def config_for(variant, **overrides):
    return variants.make_config(variant, {**variants.config_fields(variant), **variant.TEST_CONFIG, **overrides})


def trains_base(variant) -> bool:
    return getattr(variant, "TRAINS_BASE", False)


def is_head(name: str) -> bool:
    return name.split(".")[0] in adapters.TASK_HEADS


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def contract_lr(variant) -> float:
    """20x the variant's recommended learning rate: a tiny model, a few steps, one batch."""
    recommended = getattr(variant, "TRAIN_DEFAULTS", {}).get("lr", TrainConfig.lr)
    return 20 * recommended


def train(model, variant, cfg, batch, steps: int) -> list[float]:
    """AdamW steps on the fixed batch through the project's own optimizer, loss and step hook,
    in the order the training loop calls them."""
    optimizer = make_optimizer(model, variant, cfg, TrainConfig(lr=contract_lr(variant)))
    losses = []
    for step in range(1, steps + 1):
        loss, task_loss = training_loss(model, variant, batch)
        loss.backward()
        optimizer.step()
        if hasattr(variant, "on_step"):
            variant.on_step(model, step, steps)
        optimizer.zero_grad(set_to_none=True)
        losses.append(task_loss.item())
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    return losses


def attached(make_model, variant, cfg=None, targets="all-linear"):
    model = make_model()
    adapters.attach(model, variant, cfg if cfg is not None else config_for(variant), targets)
    return model


def assert_clean(model):
    """No hooks, no adapter tensors, no attachment bookkeeping left on the model."""
    assert not hasattr(model, "lorabench_attachment")
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"{name} still has a forward hook"
        assert not hasattr(module, "lora_config"), f"{name} still has lora_config"
    leftovers = [name for name in model.state_dict() if "lora_" in name]
    assert not leftovers, f"adapter tensors left after detach/merge: {leftovers[:3]}"


# --- declarations ---------------------------------------------------------------------------


def test_registry_is_discovered_and_excludes_the_template():
    assert "lora" in variants.REGISTRY and "full" in variants.REGISTRY
    assert all(not name.startswith("template") for name in variants.REGISTRY)


def test_variant_declares_the_contract(variant):
    for attribute in variants.REQUIRED:
        assert hasattr(variant, attribute), attribute
    assert variant.name == variant.__name__.rsplit(".", 1)[1], "name should equal the file name"
    assert dataclasses.is_dataclass(variant.Config)
    assert set(variant.TEST_CONFIG) <= set(variants.config_fields(variant)), "TEST_CONFIG names unknown config fields"
    assert variant.__doc__ and "arXiv:" in variant.__doc__, "the docstring must cite the paper's arXiv id"


# --- behaviour on the tiny models ----------------------------------------------------------


def test_identity_at_init_is_honest(variant, make_model, batch):
    base = logits(make_model(), batch)
    hooked = logits(attached(make_model, variant), batch)
    if variant.IDENTITY_AT_INIT:
        torch.testing.assert_close(hooked, base, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(hooked, base, atol=1e-6, rtol=0), "IDENTITY_AT_INIT=False but the model is unchanged"


def test_only_adapter_and_head_get_gradients(variant, make_model, batch):
    model = attached(make_model, variant)
    model(**batch).loss.backward()
    adapter_grads = []
    for name, parameter in model.named_parameters():
        if trains_base(variant) or "lora_" in name or is_head(name):
            assert parameter.requires_grad, f"{name} should be trainable"
            assert parameter.grad is not None, f"{name} received no gradient"
            if "lora_" in name:
                adapter_grads.append(parameter.grad)
        else:
            assert not parameter.requires_grad, f"base parameter {name} is trainable"
            assert parameter.grad is None, f"base parameter {name} received a gradient"
    if not trains_base(variant):
        assert adapter_grads, "the variant added no trainable lora_* parameters"
        assert any(grad.abs().sum() > 0 for grad in adapter_grads), "every adapter gradient is zero"


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_a_few_steps_reduce_the_loss(variant, make_model, batch, head):
    """With the head trained (as in real runs) and with the head frozen, so the adapter alone
    has to learn: a variant whose update never reaches the output fails the second case."""
    cfg = config_for(variant)
    model = attached(make_model, variant, cfg)
    if head == "frozen":
        if trains_base(variant):
            pytest.skip("the variant trains every weight; there is no adapter to isolate")
        for name in adapters.task_heads(model):
            getattr(model, name).requires_grad_(False)
    losses = train(model, variant, cfg, batch, steps=20)
    assert all(torch.isfinite(torch.tensor(losses)))
    # The lowest loss, not the last: at the contract's deliberately high learning rate, Adam may
    # overshoot once the batch is learnt; what matters is that the update reaches the output.
    assert min(losses[1:]) < 0.9 * losses[0], f"loss never fell below 90% of {losses[0]:.4f}: {losses}"


def test_save_load_reproduces_outputs_exactly(variant, make_model, batch, tmp_path):
    cfg = config_for(variant)
    model = attached(make_model, variant, cfg)
    train(model, variant, cfg, batch, steps=5)
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(make_model(), batch)), "training changed nothing; the test would be vacuous"
    path = adapters.save(model, tmp_path / "adapter.safetensors")

    fresh = make_model()
    adapters.load(fresh, path)
    reloaded = logits(fresh, batch)
    if getattr(variant, "RELOADS_EXACTLY", True):
        assert torch.equal(reloaded, trained)
    else:
        torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)


def test_peft_export_loads_in_peft_with_the_same_outputs(variant, make_model, batch, tmp_path):
    """A variant that declares PEFT_LORA exports a folder PEFT loads to the same outputs;
    any other variant refuses, naming itself."""
    cfg = config_for(variant)
    model = attached(make_model, variant, cfg)
    if not getattr(variant, "PEFT_LORA", False):
        with pytest.raises(adapters.AdapterError, match=f"variant '{variant.name}'"):
            adapters.export_peft(model, tmp_path / "peft")
        return
    peft = pytest.importorskip("peft")
    train(model, variant, cfg, batch, steps=3)
    folder = adapters.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(make_model(), folder)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_merge_matches_the_hooked_model(variant, make_model, batch):
    cfg = config_for(variant)
    model = attached(make_model, variant, cfg)
    layers = adapters.attachment_of(model).layers
    if layers and not hasattr(variant, "delta_weight"):
        with pytest.raises(adapters.AdapterError, match="delta_weight"):
            adapters.merge(model)
        pytest.skip(f"variant {variant.name} defines no delta_weight(): it cannot be merged")
    train(model, variant, cfg, batch, steps=5)
    if layers:
        assert any(variant.delta_weight(layer).abs().sum() > 0 for layer in layers.values()), "dW is still zero"
    hooked = logits(model, batch)
    adapters.merge(model)
    assert_clean(model)
    torch.testing.assert_close(logits(model, batch), hooked, atol=1e-5, rtol=0)


def test_trainable_parameter_count_matches_the_formula(variant, make_model):
    cfg = config_for(variant)
    targets = adapters.find_targets(make_model(), "all-linear")
    layer_shapes = [(layer.in_features, layer.out_features) for layer in targets.values()]
    model = attached(make_model, variant, cfg)
    if not trains_base(variant):
        assert list(adapters.attachment_of(model).layers) == list(targets)
    head_params = sum(p.numel() for head in adapters.task_heads(model) for p in getattr(model, head).parameters())
    assert head_params > 0
    expected = variant.trainable_count(layer_shapes, cfg)
    if trains_base(variant):
        expected += sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    else:
        expected += head_params
    assert sum(p.numel() for _, p in adapters.trainable_parameters(model)) == expected


def test_rank_larger_than_a_layer_names_the_layer(variant, make_model, batch):
    """Refused before training, naming the layer; a variant whose rank is not bound by the
    layer's size (VeRA) attaches and trains at that rank instead."""
    if "rank" not in variants.config_fields(variant):
        pytest.skip(f"variant {variant.name} has no rank")
    targets = adapters.find_targets(make_model(), "all-linear")
    smallest = min(min(layer.in_features, layer.out_features) for layer in targets.values())
    rank = smallest + 1
    if not getattr(variant, "RANK_BOUND_BY_LAYER", True):
        cfg = config_for(variant, rank=rank)
        model = attached(make_model, variant, cfg)
        before = logits(model, batch)
        train(model, variant, cfg, batch, steps=2)
        assert torch.isfinite(logits(model, batch)).all() and not torch.equal(logits(model, batch), before)
        return
    first_too_small = next(name for name, layer in targets.items() if min(layer.in_features, layer.out_features) < rank)
    with pytest.raises(adapters.AdapterError, match=rf"rank={rank}.*{first_too_small.replace('.', '[.]')} "):
        adapters.attach(make_model(), variant, config_for(variant, rank=rank))


def test_detach_restores_the_base_model(variant, make_model, batch):
    cfg = config_for(variant)
    base = make_model()
    model = attached(make_model, variant, cfg)
    train(model, variant, cfg, batch, steps=3)
    before = logits(model, batch)
    adapters.detach(model)
    assert_clean(model)
    if trains_base(variant):
        # Nothing to remove: the trained weights are the model.
        assert torch.equal(logits(model, batch), before)
        return
    # The base weights were frozen, so detaching gives the base model back with the trained head.
    same = restored_equal(variant)
    for name, tensor in base.state_dict().items():
        if not is_head(name):
            assert same(model.state_dict()[name], tensor), f"frozen {name} changed"
    for head in adapters.task_heads(base):
        getattr(base, head).load_state_dict(getattr(model, head).state_dict())
    assert same(logits(model, batch), logits(base, batch))


def test_detach_right_after_attach_gives_identical_outputs(variant, make_model, batch):
    base = logits(make_model(), batch)
    model = attached(make_model, variant)
    adapters.detach(model)
    assert restored_equal(variant)(logits(model, batch), base)


def restored_equal(variant):
    """Bit for bit, unless the variant declares it rewrote W and rebuilds it up to rounding."""
    if getattr(variant, "RESTORES_BASE_EXACTLY", True):
        return torch.equal
    return lambda restored, original: torch.allclose(restored, original, atol=1e-5, rtol=0)


# --- discovery ------------------------------------------------------------------------------


def _discover_with(monkeypatch, tmp_path, files: dict[str, str]):
    """Run the real discovery on a package path holding only ``files`` (module name -> source)."""
    for module_name, source in files.items():
        (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, f"variants.{module_name}", raising=False)
    monkeypatch.setattr(variants, "__path__", [str(tmp_path)])
    try:
        return variants._discover()
    finally:
        for module_name in files:
            sys.modules.pop(f"variants.{module_name}", None)


COMPLETE = """
    '''A test variant. arXiv:0000.00000'''
    from dataclasses import dataclass
    from variants import VariantConfig
    name = {name!r}
    IDENTITY_AT_INIT = True
    TEST_CONFIG = {{}}
    @dataclass
    class Config(VariantConfig):
        pass
    def param_specs(d_in, d_out, cfg):
        return {{}}
    def forward(layer, x, y):
        return y
    def trainable_count(layer_shapes, cfg):
        return 0
"""


def test_discovery_finds_a_complete_variant_file(monkeypatch, tmp_path):
    found = _discover_with(monkeypatch, tmp_path, {"lbtest_ok": COMPLETE.format(name="lbtest_ok")})
    assert list(found) == ["lbtest_ok"]


def test_discovery_rejects_a_variant_missing_attributes(monkeypatch, tmp_path):
    source = "\n".join(line for line in COMPLETE.format(name="lbtest_broken").splitlines() if "TEST_CONFIG" not in line)
    with pytest.raises(TypeError, match=r"variants/lbtest_broken\.py lacks \['TEST_CONFIG'\]"):
        _discover_with(monkeypatch, tmp_path, {"lbtest_broken": source})


def test_discovery_rejects_a_duplicate_name(monkeypatch, tmp_path):
    files = {"lbtest_a": COMPLETE.format(name="same"), "lbtest_b": COMPLETE.format(name="same")}
    with pytest.raises(TypeError, match=r"variants/lbtest_b\.py: the name 'same' is taken"):
        _discover_with(monkeypatch, tmp_path, files)
