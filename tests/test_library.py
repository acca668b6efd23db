"""The extraction library: one adapter per extraction, kept as ``extract.keep`` says, saved in one
safetensors file, listed and loaded back by step or by validation, refused when it does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from lorabench import adapters, extract, library
from lorabench.extract import ExtractConfig
from tests.conftest import build_model, make_batch

pytestmark = pytest.mark.usefixtures("single_thread")

# Exact SVDs of the tiny model's 32-wide matrices at full rank: threshold 1 keeps all of dW.
FULL_RANK = ExtractConfig(snapshot="copy", max_rank=32, exact_below=0, oversample=4, niter=2, threshold=1.0, interval=1)


def fine_tune(cfg: ExtractConfig, steps: int = 4, validations: dict[int, float] | None = None):
    """A tiny BERT fine-tuned ``steps`` steps with an extraction after each; the extractor and
    the tuned model's logits after each step. Only the extracted matrices and the task head
    train, so that an adapter plus its head can be the whole fine-tune."""
    tuned = build_model("bert")
    extractor = extract.Extractor(tuned, cfg, None, torch.device("cpu"), warmup_steps=1)
    optimizer = torch.optim.AdamW([*extractor.matrices.values(), *tuned.classifier.parameters()], lr=1e-2)
    batch, logits = make_batch(), {}
    for step in range(1, steps + 1):
        loss = tuned(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        extractor.after_step(step, steps, loss.item(), (validations or {}).get(step))
        with torch.no_grad():
            logits[step] = tuned(**batch).logits
    return extractor, logits


@pytest.mark.parametrize(("keep", "steps"), [("all", [1, 2, 3, 4, 5]), ("last:2", [4, 5]), ("every:2", [1, 3, 5]), ("every:3", [1, 4, 5])])
def test_keep_bounds_the_library(keep, steps):
    extractor, _ = fine_tune(ExtractConfig(**{**vars(FULL_RANK), "keep": keep}), steps=5)
    assert [entry.step for entry in extractor.library.entries] == steps
    assert extractor.library.extractions == 5 and [e["library"]["entries"] for e in extractor.extractions][-1] == len(steps)


def test_no_library_with_keep_none():
    extractor, _ = fine_tune(ExtractConfig(**{**vars(FULL_RANK), "keep": "none"}), steps=2)
    assert extractor.library is None and "library" not in extractor.extractions[-1]


def test_each_entry_reproduces_the_fine_tune_at_its_step_with_its_own_head(tmp_path):
    """At full rank, base + an entry's adapter + the head it kept is the fine-tuned model as it
    was at that entry's step, for every step, not only the last."""
    extractor, logits = fine_tune(FULL_RANK, validations={2: 0.7, 4: 0.6})
    path = extractor.library.save(tmp_path / "seed0.library.safetensors", {"task": "sst2", "model": "tiny-bert"})
    listed = adapters.load_library(path)
    assert [entry["step"] for entry in listed] == [1, 2, 3, 4]
    assert [entry["validation"] for entry in listed] == [None, 0.7, None, 0.6]
    assert all(entry["loss"] > 0 and entry["seconds"] > 0 and set(entry["ranks"]) == set(extractor.matrices) for entry in listed)
    for step in (2, 4):
        base = build_model("bert")
        adapters.load(base, path, step=step, task="sst2")
        with torch.no_grad():
            torch.testing.assert_close(base(**make_batch()).logits, logits[step], atol=1e-4, rtol=0)
    with torch.no_grad():  # step 2's adapter under the last head: not the model of step 2
        base = build_model("bert")
        adapters.load(base, path, step=2)
        base.classifier.load_state_dict({key.removeprefix("classifier."): value for key, value in extractor.library.entries[-1].head.items()})
        assert (base(**make_batch()).logits - logits[2]).abs().max() > 1e-3
    base = build_model("bert")
    adapters.load(base, path, best=True)  # 0.7 at step 2 beats 0.6 at step 4
    with torch.no_grad():
        torch.testing.assert_close(base(**make_batch()).logits, logits[2], atol=1e-4, rtol=0)


def test_best_prefers_the_adapters_own_score_and_ties_go_to_the_earlier_step():
    extractor, _ = fine_tune(FULL_RANK, validations={1: 0.5, 2: 0.9, 3: 0.9})
    entries = extractor.library.entries
    assert library.choose(entries, best=True).step == 2
    entries[3].scores["threshold"] = 0.95  # scored after the run: the adapter's own score wins where there is one
    for entry in entries[:3]:
        entry.scores["threshold"] = 0.8
    assert library.choose(entries, best=True).step == 4
    assert library.choose(entries, best=True, higher_is_better=False).step == 1  # a loss: lowest, earliest
    with pytest.raises(library.LibraryError, match="no entry at step 9; its steps: 1, 2, 3, 4"):
        library.choose(entries, step=9)


def test_a_fixed_library_rank_loads_the_leading_columns(tmp_path):
    extractor, _ = fine_tune(ExtractConfig(**{**vars(FULL_RANK), "threshold": 0.5, "library_ranks": (8,)}), steps=2)
    path = extractor.library.save(tmp_path / "lib.safetensors", {"task": "sst2"})
    entry = extractor.library.entries[-1]
    base = build_model("bert")
    attachment = adapters.load(base, path, step=2, rank=8)
    assert {layer.lora_A.shape[0] for layer in attachment.layers.values()} == {8}
    name = next(iter(entry.factors))
    B, A = entry.factors[name]
    layer = attachment.layers[name.removesuffix(".weight")]
    torch.testing.assert_close(layer.lora_B @ layer.lora_A, B[:, :8] @ A[:8])
    with pytest.raises(adapters.AdapterError, match="rank 4 is not among its library_ranks"):
        adapters.load(build_model("bert"), path, step=2, rank=4)


def test_a_corrupt_or_foreign_library_is_refused_with_the_reason(tmp_path):
    extractor, _ = fine_tune(FULL_RANK, steps=2)
    path = extractor.library.save(tmp_path / "lib.safetensors", {"task": "sst2"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in (lambda: adapters.load_library(truncated), lambda: adapters.load(build_model("bert"), truncated, step=1)):
        with pytest.raises(adapters.AdapterError, match="truncated.safetensors: .*corrupt"):
            bad()
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(adapters.AdapterError, match="flipped.safetensors: the tensors' sha256 differs"):
        adapters.load(build_model("bert"), flipped, step=1)
    with pytest.raises(adapters.AdapterError, match="extracted on task 'sst2', not 'imdb'"):
        adapters.load(build_model("bert"), path, step=1, task="imdb")
    with pytest.raises(adapters.AdapterError, match="task head .* does not fit"):
        adapters.load(build_model("bert", num_labels=3), path, step=1)
    with pytest.raises(adapters.AdapterError, match="extracted from another model"):
        adapters.load(build_model("bert", intermediate_size=48), path, step=1)
    with pytest.raises(adapters.AdapterError, match="name one entry"):
        adapters.load(build_model("bert"), path)


def test_the_library_survives_a_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    extractor, _ = fine_tune(ExtractConfig(**{**vars(FULL_RANK), "keep": "last:3"}), steps=4)
    state, tensors = extractor.state()
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_path / "state.safetensors")
    restored = extract.Extractor(build_model("bert"), extractor.cfg, None, torch.device("cpu"), warmup_steps=1)
    restored.load_state(json.loads(json.dumps(state)), load_file(tmp_path / "state.safetensors"))
    assert [e.step for e in restored.library.entries] == [2, 3, 4] and restored.library.extractions == 4
    for kept, back in zip(extractor.library.entries, restored.library.entries, strict=True):
        assert kept.about() == back.about()
        for name, (B, A) in kept.factors.items():
            assert torch.equal(B, back.factors[name][0]) and torch.equal(A, back.factors[name][1])


def test_a_full_run_keeps_scores_and_saves_its_library(tmp_path):
    from lorabench import records, run
    from tests.helpers import tiny_sst2

    settings = {"max_steps": 6, "batch_size": 8, "timing_warmup_steps": 1, "log_every": 1, "threads": 1, "eval_every": 2, "val_size": 8,
                "data_dir": str(tiny_sst2(tmp_path / "data")),
                "extract": {"interval": 2, "max_rank": 8, "eval_ranks": [8], "eval_thresholds": [0.9], "keep": "all", "library_ranks": [4]}}
    out = tmp_path / "seed0.json"
    run.execute("sst2", "full", 0, "default", settings, out)
    section = records.read(out)["extraction"]["library"]
    assert [entry["step"] for entry in section["entries"]] == [2, 4, 6]
    assert all(set(entry["scores"]) == {"threshold", "rank4"} and entry["validation"] is not None for entry in section["entries"])
    best = max(section["entries"], key=lambda entry: (entry["scores"]["threshold"], -entry["step"]))
    assert section["best"]["step"] == best["step"] and 0 <= section["best"]["primary_value"] <= 1
    assert section["path"] == str(out.with_suffix(".library.safetensors")) and section["bytes"] > section["memory_bytes"] > 0
    assert [entry["scores"] for entry in adapters.load_library(section["path"])] == [entry["scores"] for entry in section["entries"]]
    overhead = records.read(out)["extraction"]["overhead"]
    assert overhead["library_seconds"] > 0 and overhead["seconds"] == pytest.approx(overhead["svd_seconds"] + overhead["library_seconds"])


def test_the_best_adapter_when_it_is_the_last_takes_the_score_of_the_last_extraction_at_the_threshold(tmp_path, monkeypatch):
    """The last step's adapter at the run's threshold, with the final head, is scored on the
    reported split among the extraction's evaluations; as the library's best it is not scored
    again, and its score is the one scoring it again gives."""
    from lorabench import records, run
    from tests.helpers import tiny_sst2

    settings = {"max_steps": 4, "batch_size": 8, "timing_warmup_steps": 1, "log_every": 1, "threads": 1, "eval_every": 2, "val_size": 8,
                "data_dir": str(tiny_sst2(tmp_path / "data")),
                "extract": {"interval": 2, "max_rank": 8, "eval_ranks": [], "eval_thresholds": [0.9], "keep": "all"}}
    monkeypatch.setattr(library, "choose", lambda entries, **_: entries[-1])
    scored_again = run.library_section
    monkeypatch.setattr(run, "library_section", lambda *args: scored_again(*args[:-1]))  # without the last extraction's evaluation
    run.execute("sst2", "full", 0, "default", settings, tmp_path / "again.json")
    monkeypatch.setattr(run, "library_section", scored_again)
    run.execute("sst2", "full", 0, "default", settings, tmp_path / "reused.json")
    again, reused = (records.read(tmp_path / f"{name}.json")["extraction"] for name in ("again", "reused"))
    assert reused["library"]["best"]["step"] == 4
    assert reused["library"]["best"] == again["library"]["best"]
    threshold = reused["evaluations"][0]
    assert (reused["library"]["best"]["metrics"], reused["library"]["best"]["trainable"]) == (threshold["metrics"], threshold["trainable"])


def test_a_bad_keep_names_the_setting_and_the_fix():
    for bad in ("first:2", "last:0", "every"):
        with pytest.raises(extract.ExtractConfigError, match=f"extract.keep='{bad}': use all, none, last:K or every:K"):
            ExtractConfig.from_dict({"keep": bad})
    with pytest.raises(extract.ExtractConfigError, match=r"library_ranks \[128\]: each must be <= max_rank \(64\)"):
        ExtractConfig.from_dict({"library_ranks": [128]})
    with pytest.raises(extract.ExtractConfigError, match="base=nf4 with snapshot=mmap"):
        ExtractConfig.from_dict({"base": "nf4", "snapshot": "mmap"})


def test_best_skips_an_entry_whose_score_is_not_a_number():
    extractor, _ = fine_tune(FULL_RANK, steps=2, validations={1: float("nan"), 2: 0.6})
    assert library.choose(extractor.library.entries, best=True).step == 2


def test_nf4_aware_extraction_at_full_rank_is_the_fine_tune_on_an_nf4_base_and_plain_extraction_is_not(tmp_path):
    """dW = W_t - dequant(NF4(W0)) at full rank puts back what quantizing the base took away."""
    pytest.importorskip("bitsandbytes")
    from lorabench import quantize

    extractor, logits = fine_tune(ExtractConfig(**{**vars(FULL_RANK), "base": "nf4", "compare_bases": True}), steps=2)
    assert extractor.snapshot.kind == "nf4"
    plain, seconds = extractor.against_other_base()
    assert seconds > 0
    gaps = {}
    for name, spectra in (("nf4-aware", extractor.last), ("plain", plain)):
        base = build_model("bert")
        quantize.quantize_base(base, "nf4")
        extract.attach_extracted(base, spectra, {matrix: len(found.S) for matrix, found in spectra.items()})
        base.classifier.load_state_dict(extractor.model.classifier.state_dict())
        with torch.no_grad():
            gaps[name] = float((base(**make_batch()).logits - logits[2]).abs().max())
    assert gaps["nf4-aware"] < 1e-5 < 1e-3 < gaps["plain"], gaps  # measured: 1.5e-7 and 3.6e-3
    path = extractor.library.save(tmp_path / "lib.safetensors", {"task": "sst2", "base": "nf4"})
    with pytest.raises(adapters.AdapterError, match="extracted against an NF4 base .* quantize the model first"):
        adapters.load(build_model("bert"), path, step=2)
    quantized = build_model("bert")
    quantize.quantize_base(quantized, "nf4")
    adapters.load(quantized, path, step=2)
    with torch.no_grad():
        assert float((quantized(**make_batch()).logits - logits[2]).abs().max()) < 1e-5


def test_a_run_compares_plain_and_nf4_aware_extraction_on_both_bases(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorabench import records, run
    from tests.helpers import tiny_sst2

    settings = {"max_steps": 4, "batch_size": 8, "timing_warmup_steps": 1, "log_every": 1, "threads": 1,
                "data_dir": str(tiny_sst2(tmp_path / "data")),
                "extract": {"interval": 2, "max_rank": 8, "eval_ranks": [8], "eval_thresholds": [0.9], "keep": "none",
                            "compare_bases": True}}
    out = tmp_path / "seed0.json"
    run.execute("sst2", "full", 0, "default", settings, out)
    section = records.read(out)["extraction"]
    assert [(e["extraction"], e["base"], e["kind"]) for e in section["evaluations"]] == [
        (extraction, base, kind) for extraction, base in (("plain", "fp32"), ("plain", "nf4"), ("nf4-aware", "nf4"))
        for kind in ("rank", "threshold")]
    assert section["compare_bases"]["seconds"] > 0 and "library" not in section
    assert all(0 <= e["primary_value"] <= 1 for e in section["evaluations"])
