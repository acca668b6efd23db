"""E2E NLG (Novikova, Dušek, Rieser 2017, arXiv:1706.09254): restaurant descriptions from
meaning representations, the generation task of LoRA's own evaluation (Hu et al. 2021).

Hub: ``tuetschek/e2e_nlg`` (``meaning_representation``, ``human_reference``; train 42,061,
test 4,693 references). Local: the challenge's CSVs (``mr``, ``ref``) under
``<data_dir>/e2e/``. The offline copy lacks the training set, so offline runs train on
``devset.csv`` (4,672 references of 547 MRs) and are scored on ``testset_w_refs.csv``
(4,693 references of 630 MRs); records and reports say so (``local_note``).

The decoder reads ``Meaning representation: <mr>\\nDescription:`` and learns `` <ref><eos>``;
the loss covers the description only. Scores on the test set: greedy decoding once per
distinct MR, scored against all of its references with corpus BLEU (sacrebleu, variable
reference counts) and ROUGE-L F1 (rouge-score, best reference, averaged over MRs); and the
perplexity of the references under the model (teacher forcing), as the record's primary
metric is BLEU.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from tasks import DataError, Task, column, text_lines

PROMPT = "Meaning representation: {input}\nDescription:"
COLUMNS = ("meaning_representation", "human_reference")


def read_csv(path: Path) -> datasets.Dataset:
    if not path.is_file():
        raise DataError(f"{path}: file not found; point data_dir (or LORABENCH_DATA) at a folder holding e2e/")
    mrs, refs = [], []
    with text_lines(path) as lines:
        reader = csv.DictReader(lines)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise DataError(f"{path}:1: expected the header mr,ref, got {reader.fieldnames}")
        for row in reader:
            if not row["mr"] or not row["ref"]:
                raise DataError(f"{path}:{reader.line_num}: empty mr or ref")
            mrs.append(row["mr"])
            refs.append(row["ref"])
    return datasets.Dataset.from_dict({"meaning_representation": mrs, "human_reference": refs})


def e2e_local(data_dir: Path) -> dict[str, datasets.Dataset]:
    return {"train": read_csv(data_dir / "e2e" / "devset.csv"), "eval": read_csv(data_dir / "e2e" / "testset_w_refs.csv")}


def e2e_hub() -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset("tuetschek/e2e_nlg")
    return {"train": loaded["train"].select_columns(list(COLUMNS)), "eval": loaded["test"].select_columns(list(COLUMNS))}


@dataclass(frozen=True)
class PromptedGeneration:
    """A generation task's examples and scores: ``prompt`` (with ``{input}``) filled from the
    ``source`` column, ``target`` the reference; inputs repeated with other references are
    scored once against all of them. E2E is one; a task declared in a study config another."""

    prompt: str
    source: str
    target: str

    def encode(self, tokenizer, dataset: datasets.Dataset, max_length: int) -> list[dict]:
        """Prompt and reference as one sequence; labels -100 on the prompt, so only the
        reference is learnt and scored."""
        prompts = tokenizer([self.prompt.format(input=text) for text in column(dataset, self.source)], add_special_tokens=False)["input_ids"]
        targets = tokenizer([" " + ref for ref in column(dataset, self.target)], add_special_tokens=False)["input_ids"]
        examples = []
        for prompt, target in zip(prompts, targets):
            ids = (prompt + target + [tokenizer.eos_token_id])[:max_length]
            labels = ([-100] * len(prompt) + target + [tokenizer.eos_token_id])[:max_length]
            examples.append({"input_ids": ids, "labels": labels})
        return examples

    def metrics(self, model, tokenizer, dataset: datasets.Dataset, device: torch.device,
                batch_size: int) -> tuple[dict[str, float], dict[str, list]]:
        """BLEU and ROUGE-L of greedy generations, one per distinct input, and BLEU's statistics per input."""
        grouped: dict[str, list[str]] = {}
        for text, ref in zip(column(dataset, self.source), column(dataset, self.target)):
            grouped.setdefault(text, []).append(ref)
        hypotheses = generate(model, tokenizer, [self.prompt.format(input=text) for text in grouped], device, batch_size, max_new_tokens=80)
        references = list(grouped.values())
        inputs = [hashlib.sha1(text.encode()).hexdigest()[:12] for text in grouped]  # which inputs, so that runs pair up only on the same ones
        return bleu_and_rouge(hypotheses, references), {"bleu_stats": bleu_statistics(hypotheses, references), "input": inputs}


E2E = PromptedGeneration(PROMPT, *COLUMNS)
encode = E2E.encode


def bleu_and_rouge(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU over all references of each MR and mean best-reference ROUGE-L F1, in [0, 100]."""
    import sacrebleu
    from rouge_score import rouge_scorer

    most = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)) / len(hypotheses)
    return {"bleu": float(bleu), "rouge_l": float(100 * rouge)}


def bleu_statistics(hypotheses: list[str], references: list[list[str]]) -> list[list[int]]:
    """Per MR, the counts corpus BLEU sums over MRs: [hypothesis length, closest reference
    length, matching 1- to 4-grams, hypothesis 1- to 4-grams]; any resample of MRs gives its
    corpus BLEU from their sum (``analysis.significance``)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)  # changes a sentence's score, not its counts (the warning it silences)
    statistics = []
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        sentence = bleu.sentence_score(hypothesis, refs)
        statistics.append([int(sentence.sys_len), int(sentence.ref_len), *map(int, sentence.counts), *map(int, sentence.totals)])
    return statistics


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], device: torch.device, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding."""
    was_training = model.training
    model.eval()
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)
        attention = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(rows, generated[:, width:].tolist()):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    model.train(was_training)
    return [texts[i] for i in range(len(prompts))]


TASKS = [
    Task(
        name="e2e",
        kind="generation",
        family="decoder",
        text_columns=COLUMNS,
        label_column="human_reference",
        num_labels=0,
        metrics=None,
        primary="bleu",
        load_hub=e2e_hub,
        load_local=e2e_local,
        local_layout="e2e/{devset,testset_w_refs}.csv (header: mr, ref)",
        eval_split_name="test",
        defaults={"max_length": 128, "eval_batch_size": 32},
        make_examples=E2E.encode,
        generation_metrics=E2E.metrics,
        sample_by="meaning_representation",
        local_note="offline copy: trained on E2E's devset.csv (the 42,061-reference training set is not in it), scored on testset_w_refs.csv",
    ),
]
