"""What a run computes in and what it keeps: bf16 autocast, and gradient checkpointing, which
must give the same losses and gradients as keeping every activation, for less memory."""

import math

import pytest
import torch

import variants
from lorabench import adapters, measure, run
from lorabench.run import ConfigError, resolve_hparams
from lorabench.train import enable_gradient_checkpointing, resolve_precision
from tests.conftest import make_batch
from tests.helpers import tiny_sst2
from tests.test_variant_contract import file_of

SMALL = {"max_steps": 4, "batch_size": 8, "timing_warmup_steps": 1, "log_every": 1, "threads": 1, "save_adapter": False}


def test_precision_resolves_and_is_checked():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="precision='fp16': use one of auto, fp32, bf16"):
        resolve_hparams("sst2", "lora", {"precision": "fp16"})


def loss_and_gradients(model, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training-mode forward and backward (dropout on, the same seed either way)."""
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    torch.manual_seed(3)
    loss = model(**make_batch()).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in adapters.trainable_parameters(model)}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", sorted(variants.REGISTRY))
def test_gradient_checkpointing_gives_the_same_gradients_for_less_memory(name, make_model):
    """The adapters' hooks run again inside the recomputed layers: every trainable parameter
    still gets its gradient, equal to the one without checkpointing."""
    variant = variants.REGISTRY[name]
    cfg = variants.make_config(variant, {**variants.config_fields(variant), **variant.TEST_CONFIG})
    plain, checkpointed = make_model(), make_model()
    for model in (plain, checkpointed):
        torch.manual_seed(0)  # frozen random tensors (LoRA-FA's A, VeRA's matrices) alike in both
        adapters.attach(model, variant, cfg)
        with torch.no_grad():  # zero-initialised factors (LoRA's B) would leave A's gradient zero either way
            for key, tensor in model.named_parameters():
                if "lora_" in key:
                    tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(key))) * 0.1)
    loss, gradients = loss_and_gradients(plain, False)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(checkpointed, True)
    file = file_of(variant)
    rerun = f"forward in {file} must give the same output each time torch.utils.checkpoint runs it (no state kept between calls)"
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0,
                               msg=lambda detail: f"the loss with gradient checkpointing differs from without: {rerun}.\n{detail}")
    assert gradients.keys() == checkpointed_gradients.keys()
    for key, gradient in gradients.items():
        assert checkpointed_gradients[key] is not None, (
            f"{key} gets no gradient with gradient checkpointing: forward in {file} must read it from the layer on every call, "
            "not from a copy cached by an earlier call")
        torch.testing.assert_close(checkpointed_gradients[key], gradient, atol=1e-6, rtol=0, msg=lambda detail, key=key: (
            f"{key}: the gradient with gradient checkpointing differs from without: {rerun}.\n{detail}"))
    assert 0 < measure.saved_activation_bytes(checkpointed, make_batch()) < measure.saved_activation_bytes(plain, make_batch())


def test_bf16_and_gradient_checkpointing_runs(tmp_path):
    """On CPU: a bf16 run trains and says so; a checkpointed run records less activation memory
    than the same run without, and the same losses."""
    data = str(tiny_sst2(tmp_path / "data"))
    plain = run.execute("sst2", "lora", 0, "default", {**SMALL, "data_dir": data}, tmp_path / "plain.json")
    bf16 = run.execute("sst2", "lora", 0, "default", {**SMALL, "precision": "bf16", "data_dir": data}, tmp_path / "bf16.json")
    checkpointed = run.execute("sst2", "lora", 0, "default", {**SMALL, "gradient_checkpointing": True, "data_dir": data},
                               tmp_path / "checkpointed.json")
    assert plain["train"]["precision"] == "fp32" and bf16["train"]["precision"] == "bf16"
    assert bf16["status"] == "ok" and all(math.isfinite(loss) for _, loss in bf16["train"]["loss_curve"])
    assert bf16["train"]["loss_curve"] != plain["train"]["loss_curve"]  # autocast did change the arithmetic
    assert checkpointed["run"]["hparams"]["gradient_checkpointing"] and checkpointed["run"]["config_hash"] != plain["run"]["config_hash"]
    assert 0 < checkpointed["train"]["activation_mb"] < plain["train"]["activation_mb"]
    for (step, loss), (same_step, same_loss) in zip(plain["train"]["loss_curve"], checkpointed["train"]["loss_curve"]):
        assert step == same_step and loss == pytest.approx(same_loss, abs=1e-5)
