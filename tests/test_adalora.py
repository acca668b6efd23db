"""AdaLoRA against PEFT's AdaLoRA (SVDLinear, orthogonality penalty, RankAllocator), and the
rank budget's promises: the rank really shrinks to the target and masked lambdas are zero.

Deliberate differences from PEFT, each asserted below:
    - ``tinit_ratio`` / ``tfinal_ratio`` are fractions of max_steps (PEFT: absolute tinit and
      tfinal); ``schedule_steps`` turns them into PEFT's step counts.
    - target_rank == rank masks nothing; PEFT's kthvalue(k=0) raises at the first masking.
    - The rank pattern is not stored: masked lambdas are saved as zeros in full-width tensors
      (PEFT stores rank_pattern and resizes the tensors at load); outputs are the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

import variants
from lorabench import adapters
from lorabench.train import training_loss
from tests.conftest import build_model, make_batch

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, TaskType, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

adalora = variants.get("adalora")

# A 10-step run: budget shrinks over steps 3..6 (masking on even steps), final mask at 7, held 8..10.
STEPS, TINIT, TFINAL, DELTA_T = 10, 2, 3, 2
SETTINGS = dict(rank=4, target_rank=2, alpha=8.0, beta1=0.85, beta2=0.85, orth_reg_weight=0.5)


def our_config(**overrides):
    values = {**SETTINGS, "tinit_ratio": TINIT / STEPS, "tfinal_ratio": TFINAL / STEPS, "delta_t": DELTA_T, **overrides}
    return variants.make_config(adalora, values)


def peft_config(names, **overrides):
    values = dict(init_r=SETTINGS["rank"], target_r=SETTINGS["target_rank"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0,
                  beta1=SETTINGS["beta1"], beta2=SETTINGS["beta2"], orth_reg_weight=SETTINGS["orth_reg_weight"],
                  tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, total_step=STEPS)
    return AdaLoraConfig(**{**values, **overrides}, target_modules=names, task_type=TaskType.SEQ_CLS)


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def ours_and_peft(family, random_lambda=False, cfg=None, **peft_overrides):
    """Our AdaLoRA and PEFT's on copies of one base model, with PEFT's initial Q, lambda, P
    copied into ours (optionally a random lambda, so the adapter path is not zero)."""
    base = build_model(family)
    ours = copy.deepcopy(base)
    attachment = adapters.attach(ours, adalora, cfg if cfg is not None else our_config(), "all-linear")
    theirs = get_peft_model(copy.deepcopy(base), peft_config(list(attachment.layers), **peft_overrides))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in attachment.layers.items():
            module = peft_layer(theirs, name)
            if random_lambda:
                module.lora_E["default"].copy_(torch.randn(module.lora_E["default"].shape, generator=generator))
            for key in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, key).copy_(getattr(module, key)["default"])
    return base, ours, attachment, theirs


def head_pairs(ours, theirs):
    for head in adapters.task_heads(ours):
        peft_head = getattr(theirs.base_model.model, head).modules_to_save["default"]
        yield from zip(getattr(ours, head).parameters(), peft_head.parameters())


def test_initialisation_and_parameter_count_match_peft():
    _, ours, attachment, theirs = ours_and_peft("bert")
    fresh = adapters.attach(build_model("bert"), adalora, our_config())  # our own draw, not PEFT's copy
    adapter_params = 0
    for name, layer in fresh.layers.items():
        module = peft_layer(theirs, name)
        for key in ("lora_A", "lora_B", "lora_E"):
            assert getattr(layer, key).shape == getattr(module, key)["default"].shape, f"{name}.{key}"
            adapter_params += getattr(layer, key).numel()
        assert torch.equal(layer.lora_E, torch.zeros_like(layer.lora_E))
        assert torch.equal(module.lora_E["default"], torch.zeros_like(layer.lora_E))
        assert module.ranknum["default"].item() == SETTINGS["rank"]
        assert module.scaling["default"] == SETTINGS["alpha"]  # PEFT divides by ranknum + 1e-5 in forward
    drawn = torch.cat([torch.cat([layer.lora_A.flatten(), layer.lora_B.flatten()]) for layer in fresh.layers.values()])
    assert abs(drawn.mean().item()) < 2e-3 and abs(drawn.std().item() - 0.02) < 1e-3  # normal(0, 0.02)
    peft_adapter = sum(p.numel() for n, p in theirs.named_parameters() if p.requires_grad and "lora_" in n)
    shapes = [(layer.in_features, layer.out_features) for layer in attachment.layers.values()]
    assert adapter_params == peft_adapter == adalora.trainable_count(shapes, attachment.config)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_outputs_penalty_and_gradients_equal_peft(family):
    base, ours, attachment, theirs = ours_and_peft(family, random_lambda=True)
    batch = make_batch()
    ours_loss, task_loss = training_loss(ours, adalora, batch)
    theirs_out = theirs(**batch)  # PEFT adds the penalty to outputs.loss itself
    ours_logits = ours(**batch).logits
    assert not torch.allclose(ours_logits, base(**batch).logits, atol=1e-4), "adapter is a no-op"
    torch.testing.assert_close(ours_logits, theirs_out.logits, atol=1e-6, rtol=0)
    penalty = adalora.loss_penalty(ours)
    assert penalty.item() > 0.1
    torch.testing.assert_close(ours_loss - task_loss, penalty)
    torch.testing.assert_close(ours_loss, theirs_out.loss, atol=1e-6, rtol=0)
    ours_loss.backward()
    theirs_out.loss.backward()
    for name, layer in attachment.layers.items():
        module = peft_layer(theirs, name)
        for key in ("lora_A", "lora_B", "lora_E"):
            grad, theirs_grad = getattr(layer, key).grad, getattr(module, key)["default"].grad
            assert grad.abs().sum() > 0, f"{name}.{key} gradient is zero"
            torch.testing.assert_close(grad, theirs_grad, atol=1e-6, rtol=0, msg=f"{name}.{key}")
        torch.testing.assert_close(adalora.delta_weight(layer), module.get_delta_weight("default"), atol=1e-7, rtol=0)
    for ours_p, theirs_p in head_pairs(ours, theirs):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=1e-6, rtol=0)


def test_penalty_is_the_mean_unsquared_frobenius_norm():
    """PEFT's and the authors' code: ||.||_F, not the paper's Eq. 4 squared norm; zero when
    every Q has orthonormal rows and every P orthonormal columns."""
    model = build_model("bert")
    attachment = adapters.attach(model, adalora, our_config(orth_reg_weight=0.3))
    norms = []
    for layer in attachment.layers.values():
        eye = torch.eye(layer.lora_A.shape[0])
        norms += [torch.linalg.norm(layer.lora_A @ layer.lora_A.T - eye), torch.linalg.norm(layer.lora_B.T @ layer.lora_B - eye)]
    torch.testing.assert_close(adalora.loss_penalty(model), 0.3 * torch.stack(norms).mean())
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_A.copy_(torch.linalg.qr(layer.lora_A.T)[0].T)
            layer.lora_B.copy_(torch.linalg.qr(layer.lora_B)[0])
    assert adalora.loss_penalty(model).item() < 1e-6
    assert adalora.loss_penalty(model).requires_grad


def test_schedule_fractions_give_peft_steps_and_budget():
    _, _, attachment, theirs = ours_and_peft("bert")
    cfg, n_layers = attachment.config, len(attachment.layers)
    assert adalora.schedule_steps(cfg, STEPS) == (TINIT, TFINAL)
    allocator = theirs.base_model.rankallocator
    for step in range(1, STEPS + 1):
        assert adalora.budget_schedule(cfg, n_layers, step, STEPS) == allocator.budget_schedule(step), step
    # The default fractions over a few typical run lengths: the authors' ~10% / ~40% of the run.
    default = adalora.Config()
    assert [adalora.schedule_steps(default, steps) for steps in (20, 200, 800)] == [(2, 8), (20, 80), (80, 320)]
    for steps in (1, 2, 3):  # even tiny runs keep t_i < T - t_f, as PEFT's config demands
        tinit, tfinal = adalora.schedule_steps(default, steps)
        assert tinit < steps - tfinal


@pytest.mark.parametrize("bad", [dict(target_rank=5), dict(tinit_ratio=0.6, tfinal_ratio=0.4), dict(delta_t=0),
                                 dict(beta1=1.0), dict(orth_reg_weight=-1.0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        our_config(**bad)


def masked(attachment) -> dict[str, torch.Tensor]:
    return {name: (layer.lora_E == 0).view(-1) for name, layer in attachment.layers.items()}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_with_rank_allocation_equals_peft(family):
    """Same AdamW steps on both; PEFT's update_and_allocate and our on_step where PEFT's loop
    calls it (after optimizer.step, before zero_grad): same parameters and masks after each step."""
    _, ours, attachment, theirs = ours_and_peft(family)
    batch = make_batch()
    n_layers, init_budget = len(attachment.layers), SETTINGS["rank"] * len(attachment.layers)
    optimizers = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
                  for model in (ours, theirs)]
    for step in range(1, STEPS + 1):
        training_loss(ours, adalora, batch)[0].backward()
        theirs(**batch).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        adalora.on_step(ours, step, STEPS)
        theirs.base_model.update_and_allocate(step)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

        for name, layer in attachment.layers.items():
            module = peft_layer(theirs, name)
            for key in ("lora_A", "lora_B", "lora_E"):
                torch.testing.assert_close(getattr(layer, key), getattr(module, key)["default"], atol=1e-5, rtol=0,
                                           msg=f"step {step}: {name}.{key}")
            assert torch.equal(layer.lora_E == 0, module.lora_E["default"] == 0), f"step {step}: {name} masks differ"
        for ours_p, theirs_p in head_pairs(ours, theirs):
            torch.testing.assert_close(ours_p, theirs_p, atol=1e-5, rtol=0)

        rank_sum = sum(adalora.ranks(ours).values())
        budget, _ = adalora.budget_schedule(attachment.config, n_layers, step, STEPS)
        if step <= TINIT:
            assert rank_sum == init_budget, f"step {step}: masked before t_i"
        elif step % DELTA_T == 0 or step >= STEPS - TFINAL:
            assert rank_sum <= budget < init_budget, f"step {step}: rank {rank_sum} above the budget {budget}"
    assert rank_sum == SETTINGS["target_rank"] * n_layers


def test_rank_shrinks_to_the_target_and_masked_lambdas_stay_zero():
    """Default schedule fractions over a 30-step run: full rank up to t_i, the target total
    from T - t_f on, spread unevenly over the layers, the mask held (exact zeros) to the end."""
    model = build_model("bert")
    cfg = variants.make_config(adalora, {"rank": 6, "target_rank": 3})
    attachment = adapters.attach(model, adalora, cfg)
    n_layers, steps = len(attachment.layers), 30
    tinit, tfinal = adalora.schedule_steps(cfg, steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch()
    held = None
    for step in range(1, steps + 1):
        training_loss(model, adalora, batch)[0].backward()
        optimizer.step()
        adalora.on_step(model, step, steps)
        optimizer.zero_grad(set_to_none=True)
        ranks = adalora.ranks(model)
        if step <= tinit:
            assert set(ranks.values()) == {cfg.rank}
        if step == steps - tfinal:
            held = masked(attachment)
        if held is not None:
            assert masked(attachment).keys() == held.keys()
            for name, layer in attachment.layers.items():
                assert torch.equal(masked(attachment)[name], held[name]), f"step {step}: {name}'s mask moved"
                assert torch.all(layer.lora_E.view(-1)[held[name]] == 0)
            assert sum(ranks.values()) == cfg.target_rank * n_layers
    assert len(set(ranks.values())) > 1, f"every layer kept the same rank: {ranks}"
    assert all(0 <= rank <= cfg.rank for rank in ranks.values())
    # The masked triplets contribute nothing: dW uses only the kept ones.
    for name, layer in attachment.layers.items():
        keep = ~held[name]
        kept = layer.lora_B[:, keep] @ (layer.lora_A[keep] * layer.lora_E[keep]) * cfg.scaling
        torch.testing.assert_close(adalora.delta_weight(layer), kept)


def test_target_rank_equal_to_rank_masks_nothing_where_peft_raises():
    """A deliberate difference: with no rank to cut, PEFT calls kthvalue(k=0) and fails at its
    first masking step; ours keeps every (non-zero, random) lambda."""
    steps = []
    config = our_config(target_rank=SETTINGS["rank"])
    _, ours, attachment, theirs = ours_and_peft("bert", random_lambda=True, cfg=config, target_r=SETTINGS["rank"])
    batch = make_batch()
    for step in range(1, STEPS + 1):
        training_loss(ours, adalora, batch)[0].backward()
        adalora.on_step(ours, step, STEPS)
        ours.zero_grad(set_to_none=True)
        steps.append(sum(adalora.ranks(ours).values()))
    assert set(steps) == {SETTINGS["rank"] * len(attachment.layers)}
    with pytest.raises(RuntimeError, match="kthvalue|out of range"):
        for step in range(1, STEPS + 1):
            theirs(**batch).loss.backward()
            theirs.base_model.update_and_allocate(step)
            theirs.zero_grad(set_to_none=True)


def test_adapter_file_holds_only_the_triplets_and_reloads_the_masked_model(tmp_path):
    """The allocator's averages and the held mask are training state (non-persistent); the
    masked lambdas are stored as zeros, so the reloaded model has the same ranks and outputs."""
    model = build_model("bert")
    cfg = our_config()
    attachment = adapters.attach(model, adalora, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch()
    for step in range(1, STEPS + 1):
        training_loss(model, adalora, batch)[0].backward()
        optimizer.step()
        adalora.on_step(model, step, STEPS)
        optimizer.zero_grad(set_to_none=True)
    stored = {key.rsplit(".", 1)[1] for key in adapters.adapter_state(model) if ".lora_" in key}
    assert stored == {"lora_A", "lora_B", "lora_E"}
    path = adapters.save(model, tmp_path / "adalora.safetensors")
    fresh = build_model("bert")
    adapters.load(fresh, path)
    assert adalora.ranks(fresh) == adalora.ranks(model)
    assert sum(adalora.ranks(fresh).values()) == cfg.target_rank * len(attachment.layers)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_several_models_keep_separate_allocator_state():
    """No module-level state: training one model leaves another's importance averages alone."""
    first, second = build_model("bert"), build_model("bert")
    adapters.attach(first, adalora, our_config())
    second_attachment = adapters.attach(second, adalora, our_config())
    training_loss(first, adalora, make_batch())[0].backward()
    adalora.on_step(first, 1, STEPS)
    assert any(layer.lora_A_ipt.abs().sum() > 0 for layer in adapters.attachment_of(first).layers.values())
    assert all(layer.lora_A_ipt.abs().sum() == 0 for layer in second_attachment.layers.values())
