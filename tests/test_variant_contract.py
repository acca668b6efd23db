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


def file_of(variant) -> str:
    """The variant's file, ``variants/<name>.py``, which failure messages name."""
    return f"variants/{variant.__name__.rsplit('.', 1)[1]}.py"


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


def assert_clean(model, variant):
    """No hooks, no adapter tensors, no attachment bookkeeping left on the model."""
    file = file_of(variant)
    assert not hasattr(model, "lorabench_attachment")
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"{name} still has a forward hook: {file} must register none (the engine calls forward)"
        assert not hasattr(module, "lora_config"), f"{name} still has lora_config: {file} must not set it (the engine does)"
    leftovers = [name for name in model.state_dict() if "lora_" in name]
    assert not leftovers, (f"adapter tensors left after detach/merge: {leftovers[:3]}; {file} must add lora_* tensors only through "
                           "param_specs, and shared ones in group_init on model.lora_shared")


# --- declarations ---------------------------------------------------------------------------


def test_registry_is_discovered_and_excludes_the_template():
    assert "lora" in variants.REGISTRY and "full" in variants.REGISTRY
    assert all(not name.startswith("template") for name in variants.REGISTRY), (
        f"{[file_of(v) for n, v in variants.REGISTRY.items() if n.startswith('template')]} keep the template's name; "
        "set name to the file's name")


def test_variant_declares_the_contract(variant):
    file = file_of(variant)
    for attribute in variants.REQUIRED:
        assert hasattr(variant, attribute), f"{file} lacks {attribute}; add it as variants/_template.py does"
    assert variant.name == variant.__name__.rsplit(".", 1)[1], f"{file} sets name = {variant.name!r}; set name to the file's name"
    assert dataclasses.is_dataclass(variant.Config), f"{file}: Config is not a dataclass; decorate it with @dataclass"
    assert set(variant.TEST_CONFIG) <= set(variants.config_fields(variant)), (
        f"{file}: TEST_CONFIG names {sorted(set(variant.TEST_CONFIG) - set(variants.config_fields(variant)))}, not fields of Config; "
        "add them to Config or drop them from TEST_CONFIG")
    assert variant.__doc__ and "arXiv:" in variant.__doc__, "the docstring must cite the paper's arXiv id"


# --- behaviour on the tiny models ----------------------------------------------------------


def test_identity_at_init_is_honest(variant, make_model, batch):
    base = logits(make_model(), batch)
    hooked = logits(attached(make_model, variant), batch)
    file = file_of(variant)
    if variant.IDENTITY_AT_INIT:
        torch.testing.assert_close(hooked, base, atol=1e-6, rtol=0, msg=lambda detail: (
            f"{file} declares IDENTITY_AT_INIT = True but changes the model at step 0: initialise the update to zero (LoRA's B), "
            "or, if the method is not the identity at init by design, set IDENTITY_AT_INIT = False with the reason in the docstring."
            f"\n{detail}"))
    else:
        assert not torch.allclose(hooked, base, atol=1e-6, rtol=0), (
            f"{file} declares IDENTITY_AT_INIT = False but the model is unchanged at step 0; set IDENTITY_AT_INIT = True")


def test_only_adapter_and_head_get_gradients(variant, make_model, batch):
    model = attached(make_model, variant)
    model(**batch).loss.backward()
    file = file_of(variant)
    adapter_grads = []
    for name, parameter in model.named_parameters():
        if trains_base(variant) or "lora_" in name or is_head(name):
            assert parameter.requires_grad, (
                f"{name} should be trainable: {file} must not turn its requires_grad off; a tensor meant to stay fixed is "
                "ParamSpec(..., trainable=False)")
            assert parameter.grad is not None, (
                f"{name} received no gradient: forward in {file} must use it (layer.<tensor>) so that gradients reach it; a tensor "
                "meant to stay fixed is ParamSpec(..., trainable=False)")
            if "lora_" in name:
                adapter_grads.append(parameter.grad)
        else:
            assert not parameter.requires_grad, (
                f"base parameter {name} is trainable: {file} must leave the base weights frozen, or set TRAINS_BASE = True if the "
                "method trains every weight")
            assert parameter.grad is None, f"base parameter {name} received a gradient: {file} must not set the frozen base's .grad"
    if not trains_base(variant):
        assert adapter_grads, (
            f"{file} added no trainable lora_* parameters: param_specs must return a ParamSpec with trainable=True (or set "
            "TRAINS_BASE = True for full fine-tuning)")
        assert any(grad.abs().sum() > 0 for grad in adapter_grads), (
            f"every adapter gradient is zero at init: forward in {file} must make the loss depend on the lora_* tensors; "
            "zero-initialise one factor only (LoRA's B), not all")


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
    file = file_of(variant)
    assert all(torch.isfinite(torch.tensor(losses))), (
        f"{file}: training (head {head}) gave a non-finite loss: {losses}; guard forward, loss_penalty and on_step against division "
        f"by zero and overflow, or lower TRAIN_DEFAULTS['lr'] (the test trains at 20 times it, {contract_lr(variant)})")
    # The lowest loss, not the last: at the contract's deliberately high learning rate, Adam may
    # overshoot once the batch is learnt; what matters is that the update reaches the output.
    assert min(losses[1:]) < 0.9 * losses[0], (
        f"{file}: loss (head {head}) never fell below 90% of {losses[0]:.4f}: {losses}; forward must add an update that training "
        f"changes, or set TRAIN_DEFAULTS['lr'] to the method's rate (the test trains at 20 times it, {contract_lr(variant)})")


def test_save_load_reproduces_outputs_exactly(variant, make_model, batch, tmp_path):
    cfg = config_for(variant)
    model = attached(make_model, variant, cfg)
    train(model, variant, cfg, batch, steps=5)
    trained = logits(model, batch)
    file = file_of(variant)
    assert not torch.allclose(trained, logits(make_model(), batch)), (
        f"{file}: 5 training steps changed no output, so the test would be vacuous; forward must apply the trained tensors")
    path = adapters.save(model, tmp_path / "adapter.safetensors")

    fresh = make_model()
    adapters.load(fresh, path)
    reloaded = logits(fresh, batch)
    if getattr(variant, "RELOADS_EXACTLY", True):
        assert torch.equal(reloaded, trained), (
            f"{file}: outputs after adapters.save and load differ from the trained model's: forward must read only param_specs "
            "tensors (saved, or regenerated alike at attach) and after_load must rebuild what they imply; set RELOADS_EXACTLY = False "
            "if it rebuilds them only up to float rounding")
    else:
        torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0, msg=lambda detail: (
            f"{file} declares RELOADS_EXACTLY = False, yet the reloaded model is off by more than rounding: after_load must rebuild "
            f"what the stored tensors imply.\n{detail}"))


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
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0, msg=lambda detail: (
        f"{file_of(variant)} declares PEFT_LORA = True but PEFT loads its export to other outputs: the update must be "
        f"(alpha / rank) lora_B @ lora_A on an unchanged W; otherwise remove PEFT_LORA.\n{detail}"))


def test_merge_matches_the_hooked_model(variant, make_model, batch):
    cfg = config_for(variant)
    model = attached(make_model, variant, cfg)
    layers = adapters.attachment_of(model).layers
    if layers and not hasattr(variant, "delta_weight"):
        with pytest.raises(adapters.AdapterError, match="delta_weight"):
            adapters.merge(model)
        pytest.skip(f"variant {variant.name} defines no delta_weight(): it cannot be merged")
    train(model, variant, cfg, batch, steps=5)
    file = file_of(variant)
    if layers:
        assert any(variant.delta_weight(layer).abs().sum() > 0 for layer in layers.values()), (
            f"delta_weight in {file} is still zero after 5 training steps: it must return the dense update (d_out x d_in) that "
            "forward adds")
    hooked = logits(model, batch)
    adapters.merge(model)
    assert_clean(model, variant)
    torch.testing.assert_close(logits(model, batch), hooked, atol=1e-5, rtol=0, msg=lambda detail: (
        f"{file}: merging W += delta_weight(layer) does not reproduce forward: delta_weight must return forward's update relative to "
        f"W as loaded (restore undoes init); delete it if the method cannot be merged.\n{detail}"))


def test_trainable_parameter_count_matches_the_formula(variant, make_model):
    cfg = config_for(variant)
    targets = adapters.find_targets(make_model(), "all-linear")
    layer_shapes = [(layer.in_features, layer.out_features) for layer in targets.values()]
    model = attached(make_model, variant, cfg)
    if not trains_base(variant):
        assert list(adapters.attachment_of(model).layers) == list(targets)
    head_params = sum(p.numel() for head in adapters.task_heads(model) for p in getattr(model, head).parameters())
    assert head_params > 0
    counted = expected = variant.trainable_count(layer_shapes, cfg)
    if trains_base(variant):
        expected += sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    else:
        expected += head_params
    actual = sum(p.numel() for _, p in adapters.trainable_parameters(model))
    assert actual == expected, (
        f"trainable_count in {file_of(variant)} must write out the docstring's formula: it returned {counted}, the model has "
        f"{actual - (expected - counted)} trainable adapter parameters (ParamSpec(trainable=False) tensors do not count)")


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
        assert torch.isfinite(logits(model, batch)).all() and not torch.equal(logits(model, batch), before), (
            f"{file_of(variant)} declares RANK_BOUND_BY_LAYER = False, but at rank={rank}, above a layer's size, training gave "
            "non-finite or unchanged outputs; make forward work at such a rank, or remove the declaration so that it is refused")
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
    assert_clean(model, variant)
    file = file_of(variant)
    if trains_base(variant):
        # Nothing to remove: the trained weights are the model.
        assert torch.equal(logits(model, batch), before), (
            f"{file} declares TRAINS_BASE = True, yet detach changed the trained model's outputs: restore must leave the trained "
            "weights as they are")
        return
    # The base weights were frozen, so detaching gives the base model back with the trained head.
    same = restored_equal(variant)
    for name, tensor in base.state_dict().items():
        if not is_head(name):
            assert same(model.state_dict()[name], tensor), (
                f"frozen {name} changed after detach: restore in {file} must give back the base weight that init or on_step rewrote; "
                "set RESTORES_BASE_EXACTLY = False if it does so only up to float rounding")
    for head in adapters.task_heads(base):
        getattr(base, head).load_state_dict(getattr(model, head).state_dict())
    assert same(logits(model, batch), logits(base, batch)), (
        f"after detach, outputs differ from the base model's with the trained head: {file} must leave no change behind (restore "
        "undoes init); set RESTORES_BASE_EXACTLY = False if restore rebuilds W only up to float rounding")


def test_detach_right_after_attach_gives_identical_outputs(variant, make_model, batch):
    base = logits(make_model(), batch)
    model = attached(make_model, variant)
    adapters.detach(model)
    assert restored_equal(variant)(logits(model, batch), base), (
        f"detach right after attach does not give the base model's outputs back: restore in {file_of(variant)} must undo what init "
        "did to the base weight; set RESTORES_BASE_EXACTLY = False if it does so only up to float rounding")


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
