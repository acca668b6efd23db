"""Tasks declared in a study config from files the test writes: every format and kind loads
into the columns the engine reads, malformed rows name their file and line, a wrong entry
names its field, and a declared task trains and is scored like a built-in one."""

from __future__ import annotations

import json

import pytest

import tasks
from lorabench import run, study
from tasks import DataError, files

REVIEWS = [("a great , moving film", "positive"), ("dull and boring", "negative"), ("wonderful", "positive"), ("a mess", "negative")]


@pytest.fixture
def forget_declared():
    """Declared tasks are registered process-wide: drop those a test declared."""
    before = set(tasks.REGISTRY)
    yield
    for name in set(tasks.REGISTRY) - before:
        del tasks.REGISTRY[name]


def write_rows(path, rows, fmt, columns=("review", "sentiment")):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(sep.join(columns) + "\n" + "".join(sep.join(f'"{value}"' if sep in value else value for value in row) + "\n"
                                                           for row in rows))
    return path


def classification(tmp_path, fmt, **extra):
    return {"kind": "classification", "train": str(write_rows(tmp_path / f"train.{fmt}", REVIEWS * 4, fmt)),
            "eval": str(write_rows(tmp_path / f"eval.{fmt}", REVIEWS, fmt)), "text": "review", "label": "sentiment", **extra}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_each_table_format_gives_the_same_classification_rows(tmp_path, fmt, forget_declared):
    task = files.declare(f"reviews_{fmt}", classification(tmp_path, fmt))
    splits = task.load()
    assert task.family == "encoder" and task.num_labels == 2 and task.primary == "accuracy"
    assert splits["eval"]["review"] == [text for text, _ in REVIEWS]
    assert splits["eval"]["sentiment"] == [1, 0, 1, 0]  # sorted distinct labels: negative 0, positive 1
    assert len(splits["train"]) == 16 and task.resolve_source() == "local"


def test_declared_labels_set_the_ids_and_metrics_come_from_the_list(tmp_path, forget_declared):
    task = files.declare("reviews", classification(tmp_path, "csv", labels=["positive", "negative"], metric="f1"))
    assert task.load()["eval"]["sentiment"] == [0, 1, 0, 1] and task.primary == "f1"
    assert task.score([0, 0, 0, 1], [0, 1, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.7333333})


def test_regression_generation_and_language_modelling(tmp_path, forget_declared):
    scores = files.declare("similarity", {"kind": "regression", "metric": "spearman", "text": ["a", "b"], "label": "score",
                                          "train": str(write_rows(tmp_path / "s.tsv", [("x", "y", "1.5"), ("p", "q", "4")], "tsv", ("a", "b", "score"))),
                                          "eval": str(tmp_path / "s.tsv")})
    assert scores.load()["train"]["score"] == [1.5, 4.0] and scores.num_labels == 1 and scores.text_columns == ("a", "b")
    rows = [("name[A]", "A is here."), ("name[A]", "Here is A."), ("name[B]", "B it is.")]
    generation = files.declare("describe", {"kind": "generation", "metric": "rouge_l", "text": "mr", "label": "ref", "prompt": "MR: {input} ->",
                                            "train": str(write_rows(tmp_path / "g.jsonl", rows, "jsonl", ("mr", "ref"))),
                                            "eval": str(tmp_path / "g.jsonl")})
    assert generation.family == "decoder" and generation.sample_by == "mr" and generation.primary == "rouge_l"
    assert generation.load()["eval"]["ref"] == [ref for _, ref in rows]
    (tmp_path / "book.txt").write_text("Call me Ishmael.\n" * 400)
    corpus = files.declare("book", {"kind": "language_modeling", "train": str(tmp_path / "book.txt"), "eval": str(tmp_path / "book.txt")})
    assert corpus.primary == "perplexity" and corpus.causal and "".join(corpus.load()["train"]["text"]) == "Call me Ishmael.\n" * 400


def test_a_validation_file_is_used_instead_of_carving_one_out_of_train(tmp_path, forget_declared):
    spec = classification(tmp_path, "csv", validation=str(write_rows(tmp_path / "val.csv", REVIEWS[:2], "csv")))
    task = files.declare("reviews", spec)
    parts = run.split_sizes(task.load(), {"data_seed": 0, "val_size": 0, "train_size": 0, "eval_size": 0})
    assert len(parts["train"]) == 16 and parts["val"]["review"] == [REVIEWS[0][0], REVIEWS[1][0]]
    assert run.resolve_hparams("reviews", "lora", {"score_split": "val"})["val_size"] == 0  # no val_size needed


@pytest.mark.parametrize("fmt, body, message", [
    ("csv", "review,sentiment\ngood,positive\n,negative\n", r"train.csv:3: review is empty"),
    ("csv", "text,sentiment\ngood,positive\n", r"train.csv:1: the header \['text', 'sentiment'\] lacks \['review'\]"),
    ("csv", "review,sentiment\ngood,positive\nbad,meh\n", r"train.csv:3: label 'meh' is not one of \['negative', 'positive'\]"),
    ("jsonl", '{"review": "good", "sentiment": "positive"}\n{"review": "bad", \n', r"train.jsonl:2: not a JSON object"),
    ("jsonl", '{"review": "good", "sentiment": "positive"}\n["bad", "negative"]\n', r"train.jsonl:2: a JSON list, not an object"),
])
def test_a_malformed_row_names_its_file_and_line(tmp_path, fmt, body, message, forget_declared):
    (tmp_path / f"train.{fmt}").write_text(body)
    spec = {"kind": "classification", "train": str(tmp_path / f"train.{fmt}"), "eval": str(tmp_path / f"train.{fmt}"),
            "text": "review", "label": "sentiment", "labels": ["negative", "positive"]}
    with pytest.raises(DataError, match=message):
        files.declare("broken", spec).load()


def test_a_regression_label_that_is_no_number_names_its_line(tmp_path, forget_declared):
    path = write_rows(tmp_path / "s.csv", [("x", "1"), ("y", "high")], "csv", ("text", "score"))
    task = files.declare("scores", {"kind": "regression", "text": "text", "label": "score", "train": str(path), "eval": str(path)})
    with pytest.raises(DataError, match=r"s.csv:3: label 'high' is not a number"):
        task.load()


@pytest.mark.parametrize("change, message", [
    ({"kind": "ranking"}, r"config 'datasets'.bad.kind: 'ranking'"),
    ({"metric": "bleu"}, r"\.metric: 'bleu' does not score a classification task; use one of accuracy, f1, matthews"),
    ({"eval": None}, r"eval is missing"),
    ({"format": "text"}, r"\.format: 'text' for a classification task"),
    ({"train": "nowhere.csv"}, r"nowhere.csv: file not found \(config 'datasets'.bad.train\)"),
    ({"text": ["a", "b", "c"]}, r"one or two text columns"),
])
def test_a_wrong_entry_fails_the_study_before_any_job_naming_the_field(tmp_path, change, message, forget_declared):
    spec = {key: value for key, value in {**classification(tmp_path, "csv"), **change}.items() if value is not None}
    config = {"tasks": ["bad"], "variants": ["lora"], "seeds": [0], "settings": {"default": {}}, "hparams": {}, "datasets": {"bad": spec}}
    with pytest.raises(run.ConfigError, match=message):
        study.expand(config)


def test_a_declared_name_cannot_shadow_a_built_in_task(tmp_path, forget_declared):
    with pytest.raises(files.DeclarationError, match="sst2: the name is taken by a built-in task"):
        files.declare("sst2", classification(tmp_path, "csv"))


def test_a_declared_task_trains_is_scored_and_its_record_keeps_the_declaration(tmp_path, forget_declared):
    spec = classification(tmp_path, "csv", metric="matthews")
    config = {"tasks": ["reviews"], "variants": ["lora"], "seeds": [0], "settings": {"default": {}}, "hparams": {}, "datasets": {"reviews": spec}}
    (planned,) = study.expand(config)
    assert planned.cli_task().startswith("--task-spec ") and json.loads(planned.cli_task().split(" ", 1)[1].strip("'")) == spec
    argv = ["--task", "reviews", "--task-spec", json.dumps(spec), "--variant", "lora", "--out", str(tmp_path / "r.json"),
            "--set", "max_steps=3", "batch_size=4", "threads=2", "timing_warmup_steps=0", "save_adapter=false"]
    del tasks.REGISTRY["reviews"]  # as a fresh job process meets it: declared by --task-spec alone
    assert run.main(argv) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["status"] == "ok" and record["eval"]["primary"] == "matthews_corr" and record["eval"]["n"] == len(REVIEWS)
    assert record["run"]["task_spec"] == spec and record["run"]["data_source"] == "local"


def test_a_hub_dataset_declared_by_id_gives_the_same_columns(monkeypatch, forget_declared):
    import datasets

    split = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]})
    book = datasets.Dataset.from_dict({"content": ["Call me Ishmael.\n" * 50]})
    loaded = {"someone/reviews": {"train": split, "test": split}, "someone/book": {"train": book, "test": book}}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: loaded[name])
    reviews = files.declare("hub_reviews", {"kind": "classification", "hub": "someone/reviews", "text": "sentence", "label": "label",
                                            "labels": ["negative", "positive"]})
    assert reviews.resolve_source() == "hub" and reviews.load()["eval"].to_dict() == {"sentence": ["good", "bad"], "label": [1, 0]}
    corpus = files.declare("hub_book", {"kind": "language_modeling", "hub": "someone/book", "text": "content"})
    assert corpus.load()["train"]["text"] == ["Call me Ishmael.\n" * 50]
    with pytest.raises(files.DeclarationError, match="must list its labels"):
        files.declare("unlabelled", {"kind": "classification", "hub": "someone/reviews", "text": "sentence", "label": "label"})
