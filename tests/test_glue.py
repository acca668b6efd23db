"""GLUE: every task loads from GLUE's own TSV layout exactly as from the Hub, and scores right.

Each task's local files are written here in the original release's format (a few rows,
including the quirks: CoLA has no header, MRPC starts with a byte-order mark, quotes are
literal); the Hub side is a ``datasets.Dataset`` with nyu-mll/glue's columns and ClassLabel
names. Both must give the same tokenized examples. With the shared offline copies present,
their sizes are checked too.
"""

from __future__ import annotations

import math

import datasets
import pytest

import tasks
from lorabench import run
from tasks import glue
from tests.helpers import minilm_tokenizer, shared_data

S1, S2 = 'He said "it works" .', "It does n't , she said ."
T1, T2 = "A man is dancing.", "A child rides a horse."

# task -> (files written under glue/<FOLDER>/, Hub label names or None, expected rows (texts..., label))
SAMPLES = {
    "cola": ({"train.tsv": f"gj04\t1\t\t{S1}\ngj04\t0\t*\t{S2}\n"}, ["unacceptable", "acceptable"], [(S1, 1), (S2, 0)]),
    "sst2": ({"train.tsv": f"sentence\tlabel\n{S1}\t1\n{S2}\t0\n"}, ["negative", "positive"], [(S1, 1), (S2, 0)]),
    "mrpc": ({"train.tsv": f"\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\t{S1}\t{S2}\n0\t13\t14\t{T1}\t{T2}\n"},
             ["not_equivalent", "equivalent"], [(S1, S2, 1), (T1, T2, 0)]),
    "qqp": ({"train.tsv": f"id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n5\t1\t2\t{S1}\t{S2}\t1\n6\t3\t4\t{T1}\t{T2}\t0\n"},
            ["not_duplicate", "duplicate"], [(S1, S2, 1), (T1, T2, 0)]),
    "stsb": ({"train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                          f"0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t{S1}\t{S2}\t3.800\n"
                          f"1\tmain-news\theadlines\t2013\t0002\tnone\tnone\t{T1}\t{T2}\t0.250\n"},
             None, [(S1, S2, 3.8), (T1, T2, 0.25)]),
    "mnli": ({"train.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                           "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
                           f"0\t1\t1e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{S1}\t{S2}\tneutral\tneutral\n"
                           f"1\t2\t2c\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{T1}\t{T2}\tcontradiction\tcontradiction\n"},
             ["entailment", "neutral", "contradiction"], [(S1, S2, 1), (T1, T2, 2)]),
    "qnli": ({"train.tsv": f"index\tquestion\tsentence\tlabel\n0\t{S1}\t{S2}\tnot_entailment\n1\t{T1}\t{T2}\tentailment\n"},
             ["entailment", "not_entailment"], [(S1, S2, 1), (T1, T2, 0)]),
    "rte": ({"train.tsv": f"index\tsentence1\tsentence2\tlabel\n0\t{S1}\t{S2}\tentailment\n1\t{T1}\t{T2}\tnot_entailment\n"},
            ["entailment", "not_entailment"], [(S1, S2, 0), (T1, T2, 1)]),
    "wnli": ({"train.tsv": f"index\tsentence1\tsentence2\tlabel\n0\t{S1}\t{S2}\t1\n1\t{T1}\t{T2}\t0\n"},
             ["not_entailment", "entailment"], [(S1, S2, 1), (T1, T2, 0)]),
}
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n")


def write_task(root, name: str):
    spec = next(g for g in glue.GLUE if g.name == name)
    folder = root / "glue" / spec.folder
    folder.mkdir(parents=True)
    files, _, _ = SAMPLES[name]
    train = files["train.tsv"]
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    for file, _ in spec.eval_splits.values():
        if name == "mnli":  # dev files carry five annotator labels
            rows = [line.rsplit("\t", 2) for line in train.splitlines()[1:]]
            dev = MNLI_DEV_HEADER + "".join(f"{head}\t{label}\t{label}\t{label}\t{label}\t{label}\t{gold}\n" for head, label, gold in rows)
            (folder / file).write_text(dev, encoding="utf-8")
        else:
            (folder / file).write_text(train, encoding="utf-8")
    return root


def hub_like(name: str) -> dict[str, datasets.Dataset]:
    """What nyu-mll/glue serves for the sample rows: its columns, a ClassLabel (or float32) label, idx."""
    task = tasks.get(name)
    _, names, rows = SAMPLES[name]
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    features = datasets.Features({**{c: datasets.Value("string") for c in task.text_columns}, "label": label, "idx": datasets.Value("int32")})
    columns = {c: [row[i] for row in rows] for i, c in enumerate(task.text_columns)}
    split = datasets.Dataset.from_dict({**columns, "label": [row[-1] for row in rows], "idx": list(range(len(rows)))}, features=features)
    spec = next(g for g in glue.GLUE if g.name == name)
    return {"train": split, **{hub_split: split for _, hub_split in spec.eval_splits.values()}}


@pytest.mark.parametrize("name", [g.name for g in glue.GLUE])
def test_local_layout_gives_the_hubs_examples(name, tmp_path, monkeypatch):
    task, tokenizer = tasks.get(name), minilm_tokenizer()
    local = task.load(str(write_task(tmp_path, name)), "local")
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub_like(name))
    hub = task.load(data_source="hub")
    for split in ("train", "eval"):
        assert local[split].column_names == hub[split].column_names
        assert task.encode(tokenizer, local[split], 64) == task.encode(tokenizer, hub[split], 64)
    _, _, rows = SAMPLES[name]
    assert local["train"]["label"] == pytest.approx([row[-1] for row in rows])
    assert local["train"][task.text_columns[0]][0] == rows[0][0]  # quotes stay literal
    if task.group_column:
        assert sorted(set(local["eval"]["group"])) == ["matched", "mismatched"]
    if len(task.text_columns) == 2:
        assert 1 in task.encode(tokenizer, local["train"], 64)[0]["token_type_ids"], "the pair's second text is fed too"


def test_metrics_match_hand_computed_values():
    predictions, labels = [1, 1, 0, 0], [1, 0, 0, 0]
    assert glue.matthews(predictions, labels)["matthews_corr"] == pytest.approx(2 / math.sqrt(12))
    scores = glue.accuracy_and_f1([1, 1, 1, 0], [1, 0, 1, 1])
    assert scores == pytest.approx({"accuracy": 0.5, "f1": 2 / 3})
    scores = glue.correlations([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert scores == pytest.approx({"pearson": 6.5 / math.sqrt(5 * 8.75), "spearman": 1.0})


def test_mnli_is_scored_per_group_and_validation_plainly():
    task = tasks.get("mnli")
    scores = task.score([0, 1, 2, 2], [0, 1, 1, 2], ["matched", "matched", "mismatched", "mismatched"])
    assert scores == {"accuracy_matched": 1.0, "accuracy_mismatched": 0.5}
    assert task.primary == "accuracy_matched" and task.val_metric == "accuracy"
    assert task.score([0, 1], [0, 0], [None, None]) == {"accuracy": 0.5}


@pytest.mark.parametrize("name, row, message", [
    ("rte", "2\ta\tb\tentailed", r"train.tsv:4: label 'entailed' is not valid here \(one of \['entailment', 'not_entailment'\]\)"),
    ("stsb", "2\tg\tf\ty\t3\tn\tn\ta\tb\t7.5", r"train.tsv:4: label '7.5' is not valid here \(a number from 0 to 5\)"),
    ("cola", "gj04\t1\tonly three", r"train.tsv:3: expected 4 tab-separated fields, got 3"),
])
def test_malformed_rows_name_file_and_line(name, row, message, tmp_path):
    root = write_task(tmp_path, name)
    train = next((tmp_path / "glue").iterdir()) / "train.tsv"
    train.write_text(train.read_text() + row + "\n")
    with pytest.raises(tasks.DataError, match=message):
        tasks.get(name).load(str(root), "local")


OFFICIAL_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500), "rte": (2490, 277), "wnli": (635, 71)}


@pytest.mark.skipif(shared_data() is None, reason="no offline data: set LORABENCH_DATA")
@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_shared_copies_have_official_sizes(name):
    splits = tasks.get(name).load(str(shared_data()), "local")
    assert (len(splits["train"]), len(splits["eval"])) == OFFICIAL_SIZES[name]


@pytest.mark.skipif(shared_data() is None, reason="no offline data: set LORABENCH_DATA")
@pytest.mark.parametrize("name", ["cola", "stsb", "mrpc", "rte", "wnli"])
def test_a_run_trains_and_scores_on_the_local_files(name, tmp_path):
    small = {"max_steps": 2, "batch_size": 8, "train_size": 32, "eval_size": 24, "save_adapter": False, "threads": 1,
             "timing_warmup_steps": 0, "data_dir": str(shared_data())}
    record = run.execute(name, "lora", 0, "default", small, tmp_path / "r.json")
    task = tasks.get(name)
    assert record["status"] == "ok" and record["eval"]["primary"] == task.primary
    assert set(record["eval"]["metrics"]) >= {task.primary} and record["eval"]["n"] == 24
