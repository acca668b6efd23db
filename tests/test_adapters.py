"""The adapter engine's file format and its errors: safetensors only, every failure names the file."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import variants
from lorabench import adapters
from tests.conftest import build_model, make_batch

pytestmark = pytest.mark.usefixtures("single_thread")

lora = variants.get("lora")


def lora_config(**overrides):
    return variants.make_config(lora, {"rank": 4, "alpha": 8.0, **overrides})


def trained_lora(family="bert", targets="all-linear"):
    """An attached LoRA whose B and head are no longer at their initial values."""
    model = build_model(family)
    attachment = adapters.attach(model, lora, lora_config(), targets)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
        for head in attachment.heads:
            for parameter in getattr(model, head).parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def logits(model):
    batch = make_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def in_message(path) -> str:
    return re.escape(str(path))


@pytest.fixture
def saved(tmp_path):
    model = trained_lora()
    return model, adapters.save(model, tmp_path / "adapter.safetensors")


# --- round trip and format -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_round_trip_restores_tensors_and_outputs(family, tmp_path):
    model = trained_lora(family, targets=["query", "value"] if family == "bert" else ["q_proj", "v_proj"])
    path = adapters.save(model, tmp_path / "sub" / "adapter.safetensors", extra_metadata={"run_id": "abc"})
    fresh = build_model(family)
    attachment = adapters.load(fresh, path)
    assert list(attachment.layers) == list(adapters.attachment_of(model).layers)
    before, after = adapters.adapter_state(model), adapters.adapter_state(fresh)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert torch.equal(logits(fresh), logits(model))
    metadata = adapters.read_metadata(path)
    assert metadata["variant"] == "lora" and metadata["run_id"] == "abc"
    assert json.loads(metadata["config"]) == {"rank": 4, "alpha": 8.0, "dropout": 0.0}
    assert not list(tmp_path.glob("sub/.*.tmp")), "the temporary file was left behind"


def test_per_layer_overrides_round_trip_and_merge(tmp_path):
    model = build_model("bert")
    names = list(adapters.find_targets(model, "all-linear"))
    overrides = {names[0]: {"rank": 1, "alpha": 1.0}, names[-1]: {"rank": 6, "alpha": 6.0}}
    attachment = adapters.attach(model, lora, lora_config(), overrides=overrides)
    assert attachment.layers[names[0]].lora_A.shape[0] == 1 and attachment.layers[names[-1]].lora_B.shape[1] == 6
    assert attachment.layers[names[1]].lora_A.shape[0] == 4 and attachment.layers[names[-1]].lora_config.scaling == 1.0
    with torch.no_grad():
        for layer in attachment.layers.values():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    path = adapters.save(model, tmp_path / "ranks.safetensors")
    fresh = build_model("bert")
    assert adapters.load(fresh, path).overrides == overrides
    assert torch.equal(logits(fresh), logits(model))
    hooked = logits(model)
    assert torch.allclose(logits(adapters.merge(model)), hooked, atol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [({"nowhere": {"rank": 2}}, "not targets"), (None, "not fields")])
def test_bad_overrides_are_refused_before_the_model_changes(overrides, message):
    model = build_model("bert")
    first = next(iter(adapters.find_targets(model, "all-linear")))
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.attach(model, lora, lora_config(), overrides=overrides or {first: {"rnak": 2}})
    assert not hasattr(model, "lorabench_attachment") and all(p.requires_grad for p in model.parameters())


def test_saved_file_is_plain_safetensors_without_pickle(saved):
    model, path = saved
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    metadata = header.pop("__metadata__")
    assert metadata["format"] == "lorabench-adapter"
    assert set(header) == set(adapters.adapter_state(model))
    # The tensors' byte ranges cover the rest of the file exactly: there is nothing else in it.
    assert max(entry["data_offsets"][1] for entry in header.values()) == len(data) - 8 - header_size
    assert b"torch._utils" not in data and b"\x80\x02" not in data[:2]
    assert all(key.startswith(("bert.", "classifier.")) for key in header)
    assert all("lora_" in key or key.startswith("classifier.") for key in header)


# --- bad files: each raises AdapterError naming the path -----------------------------------


def test_garbage_bytes_are_rejected(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all \x00\x01\x02" * 10)
    with pytest.raises(adapters.AdapterError, match=in_message(path)):
        adapters.load(build_model("bert"), path)


def test_a_pickle_is_rejected(tmp_path):
    path = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(2)}, path)
    with pytest.raises(adapters.AdapterError, match=in_message(path)):
        adapters.load(build_model("bert"), path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file_is_rejected(saved, tmp_path, keep):
    _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(adapters.AdapterError, match=in_message(truncated)):
        adapters.load(build_model("bert"), truncated)


def test_a_missing_file_is_rejected(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(adapters.AdapterError, match=in_message(path)):
        adapters.load(build_model("bert"), path)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "lorabench-adapter", "format_version": "0"}])
def test_safetensors_without_lorabench_metadata_is_rejected(tmp_path, metadata):
    path = tmp_path / "foreign.safetensors"
    save_file({"classifier.weight": torch.zeros(2, 32)}, path, metadata=metadata)
    with pytest.raises(adapters.AdapterError, match=in_message(path)):
        adapters.load(build_model("bert"), path)


@pytest.mark.parametrize(
    "overrides, message",
    [({"hidden_size": 48, "intermediate_size": 96}, "has shape"), ({"num_labels": 3}, "classifier.weight has shape"),
     ({"num_hidden_layers": 1}, "has no layers")],
    ids=["wider", "other-head", "shallower"],
)
def test_adapter_for_another_model_shape_is_rejected(saved, overrides, message):
    _, path = saved
    with pytest.raises(adapters.AdapterError, match=rf"{in_message(path)}.*{message}"):
        adapters.load(build_model("bert", **overrides), path)


def test_adapter_for_another_architecture_is_rejected(saved):
    _, path = saved
    with pytest.raises(adapters.AdapterError, match=rf"{in_message(path)}.*has no layers"):
        adapters.load(build_model("llama"), path)


def test_tensor_missing_from_the_file_is_rejected(saved, tmp_path):
    model, path = saved
    state = {key: tensor.contiguous() for key, tensor in adapters.adapter_state(model).items()}
    dropped = next(iter(state))
    del state[dropped]
    partial = tmp_path / "partial.safetensors"
    save_file(state, partial, metadata={**adapters.read_metadata(path), adapters.CHECKSUM_KEY: adapters.tensor_checksum(state)})
    with pytest.raises(adapters.AdapterError, match=rf"{in_message(partial)}.*missing \[{re.escape(repr(dropped))}"):
        adapters.load(build_model("bert"), partial)


def test_a_failed_load_leaves_the_model_untouched(saved):
    _, path = saved
    model = build_model("bert", num_labels=3)
    base = logits(model)
    with pytest.raises(adapters.AdapterError):
        adapters.load(model, path)
    assert not hasattr(model, "lorabench_attachment")
    assert not [name for name in model.state_dict() if "lora_" in name]
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("metadata", [{"variant": "no_such_variant", "config": "{}", "targets": "[]"}, {"variant": "lora"}])
def test_bad_metadata_is_an_adapter_error(tmp_path, metadata):
    path = tmp_path / "bad-metadata.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "lorabench-adapter", "format_version": "1", **metadata})
    with pytest.raises(adapters.AdapterError, match=in_message(path)):
        adapters.load(build_model("bert"), path)


# --- corrupt bytes: a checksum and a finiteness check -------------------------------------


def header_of(path) -> tuple[int, dict]:
    """(where the data region starts, the JSON header) of a safetensors file."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    return 8 + header_size, json.loads(data[8 : 8 + header_size])


def test_a_saved_adapter_carries_the_checksum_of_its_tensors_and_loads_bit_exactly(saved):
    model, path = saved
    assert adapters.read_metadata(path)[adapters.CHECKSUM_KEY] == adapters.tensor_checksum(load_file(path))
    fresh = build_model("bert")
    adapters.load(fresh, path)
    before, after = adapters.adapter_state(model), adapters.adapter_state(fresh)
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_one_flipped_byte_in_the_data_region_is_refused(saved):
    _, path = saved
    start, header = header_of(path)
    name = next(key for key in sorted(header) if key.endswith("lora_B"))
    data = bytearray(path.read_bytes())
    data[start + header[name]["data_offsets"][0]] ^= 0x01  # the lowest mantissa byte of a float32: still finite
    path.write_bytes(bytes(data))
    assert torch.isfinite(load_file(path)[name]).all()
    model = build_model("bert")
    with pytest.raises(adapters.AdapterError, match=rf"{in_message(path)}.*sha256.*the file is corrupt; retrain or re-export it"):
        adapters.load(model, path)
    assert not hasattr(model, "lorabench_attachment")


@pytest.mark.parametrize("version", ["1", "2"], ids=["old-format-without-checksum", "valid-checksum"])
def test_a_nan_written_with_a_valid_header_is_refused(saved, tmp_path, version):
    _, path = saved
    state = load_file(path)
    name = sorted(key for key in state if key.endswith("lora_A"))[1]
    state[name][0, 0] = float("nan")
    metadata = {key: value for key, value in adapters.read_metadata(path).items() if key != adapters.CHECKSUM_KEY}
    metadata["format_version"] = version
    if version == "2":
        metadata[adapters.CHECKSUM_KEY] = adapters.tensor_checksum(state)
    poisoned = tmp_path / "nan.safetensors"
    save_file(state, poisoned, metadata=metadata)
    message = rf"{in_message(poisoned)}: tensor {re.escape(name)} holds 1 NaN.*the file is corrupt; retrain or re-export it"
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.load(build_model("bert"), poisoned)


def test_an_adapter_of_format_version_1_still_loads_and_one_of_version_2_needs_its_checksum(saved, tmp_path):
    model, path = saved
    state = load_file(path)
    metadata = {key: value for key, value in adapters.read_metadata(path).items() if key != adapters.CHECKSUM_KEY}
    old = tmp_path / "version1.safetensors"
    save_file(state, old, metadata={**metadata, "format_version": "1"})
    fresh = build_model("bert")
    adapters.load(fresh, old)
    assert torch.equal(logits(fresh), logits(model))
    stripped = tmp_path / "stripped.safetensors"
    save_file(state, stripped, metadata={**metadata, "format_version": "2"})
    with pytest.raises(adapters.AdapterError, match=rf"{in_message(stripped)}: metadata lacks {adapters.CHECKSUM_KEY}"):
        adapters.load(build_model("bert"), stripped)


# --- attach and targets --------------------------------------------------------------------


def test_a_failed_attach_leaves_the_model_untouched():
    model = build_model("llama")  # q_proj is 32 x 32, k_proj 16 x 32: rank 20 fits the first, not the second
    with pytest.raises(adapters.AdapterError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        adapters.attach(model, lora, lora_config(rank=20))
    assert not [name for name in model.state_dict() if "lora_" in name]
    assert all(parameter.requires_grad for parameter in model.parameters())
    adapters.attach(model, lora, lora_config(rank=8))


def test_attaching_twice_raises():
    model = build_model("bert")
    adapters.attach(model, lora, lora_config())
    with pytest.raises(adapters.AdapterError, match="already has an adapter"):
        adapters.attach(model, lora, lora_config())
    adapters.detach(model)
    adapters.attach(model, lora, lora_config())  # after detach it is allowed again


def test_operations_without_an_adapter_raise():
    model = build_model("bert")
    for operation in (adapters.detach, adapters.merge, adapters.adapter_state):
        with pytest.raises(adapters.AdapterError, match="no adapter is attached"):
            operation(model)


def test_find_targets_by_suffix_picks_exactly_those():
    model = build_model("bert")
    found = adapters.find_targets(model, ["query", "value"])
    assert list(found) == [f"bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "value")]
    assert all(isinstance(layer, torch.nn.Linear) for layer in found.values())
    # A suffix matches whole name components only: "dense" is not "output.dense"'s "put.dense".
    assert set(adapters.find_targets(model, ["output.dense"])) == {
        name
        for i in range(2)
        for name in (f"bert.encoder.layer.{i}.attention.output.dense", f"bert.encoder.layer.{i}.output.dense")
    }
    with pytest.raises(adapters.AdapterError):
        adapters.find_targets(model, ["put.dense"])


def test_find_targets_all_linear_excludes_the_heads():
    for family, head in (("bert", "classifier"), ("llama", "score")):
        found = adapters.find_targets(build_model(family), "all-linear")
        assert found and not any(name.split(".")[0] == head for name in found)


def test_unknown_target_raises_naming_the_targets():
    message = r"\['nope', 'nada'\].*matches no linear layer of BertForSequenceClassification"
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.find_targets(build_model("bert"), ["nope", "nada"])


def test_the_head_is_never_a_target():
    with pytest.raises(adapters.AdapterError, match="classifier"):
        adapters.find_targets(build_model("bert"), ["classifier"])


@pytest.mark.parametrize("first", ["lorabench.adapters", "lorabench.train", "variants", "lorabench.run"])
def test_any_module_can_be_imported_first(first):
    """Variant files import lorabench.adapters; importing it first must not hit a cycle."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {first}, variants; assert len(variants.REGISTRY) > 2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_int8_storage_is_smaller_and_loads_close_to_the_float_adapter(tmp_path):
    model = trained_lora()
    full = adapters.save(model, tmp_path / "float.safetensors")
    small = adapters.save(model, tmp_path / "int8.safetensors", storage="int8")
    assert small.stat().st_size < 0.6 * full.stat().st_size
    assert adapters.read_metadata(small)["storage"] == "int8"
    fresh = build_model("bert")
    adapters.load(fresh, small)
    for key, tensor in adapters.adapter_state(model).items():
        if tensor.ndim == 2 and ".lora_" in key:
            assert torch.allclose(adapters.adapter_state(fresh)[key], tensor, atol=tensor.abs().max().item() / 254 + 1e-7)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-2, rtol=0)
    with pytest.raises(adapters.AdapterError, match="storage='fp4'"):
        adapters.save(model, tmp_path / "x.safetensors", storage="fp4")
