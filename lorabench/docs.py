"""README's variants table, generated from the variant files themselves.

    python -m lorabench.docs            # print the table
    python -m lorabench.docs --write    # replace the table between README's markers

Each row comes from a variant's docstring (title, the first line citing arXiv, and the
first line under "Formula", which by convention is the adapted layer's output)
and its ``trainable_count`` evaluated on the default encoder's layers, so the table cannot
drift from the code; a test compares README with this output.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import variants
from lorabench import adapters

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- variants-table:start -->", "<!-- variants-table:end -->"
TABLE_MODEL = "minilm"


def docstring_facts(variant) -> dict[str, str]:
    """Title, citation, arXiv id and the first formula line of a variant's docstring."""
    lines = [line.rstrip() for line in variant.__doc__.strip().splitlines()]
    arxiv = re.search(r"arXiv:(\d{4}\.\d{4,5})", variant.__doc__)
    citation = next((line for line in lines[1:] if "arXiv:" in line), "")
    authors = re.split(r",?\s*arXiv:", citation)[0].strip()
    formula = ""
    if "Formula" in lines:
        formula = next((line.strip() for line in lines[lines.index("Formula") + 1 :] if line.strip()), "")
    return {"title": lines[0].rstrip("."), "authors": authors, "arxiv": arxiv.group(1) if arxiv else "", "formula": formula}


def layer_shapes(model_name: str = TABLE_MODEL) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of every layer ``all-linear`` adapts, and the model's parameter count without
    the task head, from the model's config alone (no weights are loaded)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lorabench import models

    config = AutoConfig.from_pretrained(models.locate(model_name, "auto"), num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    shapes = [(layer.in_features, layer.out_features) for layer in adapters.find_targets(model, "all-linear").values()]
    heads = set(adapters.task_heads(model))
    base = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] not in heads)
    return shapes, base


def trainable(variant, shapes: list[tuple[int, int]], base_params: int) -> int:
    if getattr(variant, "TRAINS_BASE", False):
        return base_params
    return variant.trainable_count(shapes, variants.make_config(variant, {}))


def table() -> str:
    shapes, base_params = layer_shapes()
    rows = [
        f"| variant | method | update of each adapted layer | trainable parameters ({TABLE_MODEL}, all-linear, no head) |",
        "|---|---|---|---:|",
    ]
    for name, variant in variants.REGISTRY.items():
        facts = docstring_facts(variant)
        paper = f"{facts['title']}; {facts['authors']}"
        if facts["arxiv"]:
            paper = f"[{paper}](https://arxiv.org/abs/{facts['arxiv']})"
        count = trainable(variant, shapes, base_params)
        share = f" ({100 * count / base_params:.2f}%)"
        escaped = facts["formula"].replace("|", "\\|")  # a bare | would end the table cell
        formula = f"`{escaped}`" if escaped else ""
        rows.append(f"| `{name}` | {paper} | {formula} | {count:,}{share} |")
    return "\n".join(rows) + "\n"


def write_readme(path: Path = README) -> bool:
    """Put the current table between the markers; True when README changed."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: add the lines {START} and {END} where the variants table goes")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    updated = f"{before}{START}\n{table()}{END}{after}"
    path.write_text(updated)
    return updated != text


def readme_table(path: Path = README) -> str:
    text = path.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.docs", description="README's variants table")
    parser.add_argument("--write", action="store_true", help=f"update {README.name} in place")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{README}: {'updated' if write_readme() else 'already up to date'}")
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
