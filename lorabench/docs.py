"""README's variants table and docs/variants.md's notes, generated from the variant files themselves.

    python -m lorabench.docs            # print the table
    python -m lorabench.docs --write    # replace the table between README's markers, and the notes in docs/variants.md

Each row comes from a variant's docstring (title, the first line citing arXiv, and the
first line under "Formula", which by convention is the adapted layer's output)
and its ``trainable_count`` evaluated on the default encoder's layers; each method's notes are
its whole docstring (formula, claims, defaults and departures) with the rates the tuning study
chose for it (config/rates.yaml). Neither can drift from the code: a test compares both pages
with this output.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from pathlib import Path

import yaml

import variants
from lorabench import adapters

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VARIANTS_PAGE = ROOT / "docs" / "variants.md"
RATES = ROOT / "config" / "rates.yaml"
START, END = "<!-- variants-table:start -->", "<!-- variants-table:end -->"
NOTES_START, NOTES_END = "<!-- variant-notes:start -->", "<!-- variant-notes:end -->"
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


def docstring_markdown(variant) -> str:
    """A variant's docstring after its title and citation, as Markdown: ``Formula`` as a code
    block, other headed sections (``Claims``...) as lists, the rest as paragraphs."""
    lines = inspect.cleandoc(variant.__doc__).splitlines()
    body = "\n".join(line.rstrip() for line in lines[1:] if "arXiv:" not in line).strip()
    parts = []
    for block in re.split(r"\n\s*\n", body):
        rows = block.splitlines()
        header = rows[0].strip()
        if len(rows) > 1 and re.fullmatch(r"[A-Z][a-z]+", header) and rows[1].startswith(" "):
            content = textwrap.dedent("\n".join(rows[1:]))
            if header == "Formula":
                parts.append(f"**{header}**\n\n```text\n{content}\n```")
            else:
                items = re.split(r"\n(?=- )", content)
                parts.append(f"**{header}**\n\n" + "\n".join("- " + " ".join(item.removeprefix("- ").split()) for item in items))
        else:
            parts.append(" ".join(block.split()))
    return "\n\n".join(parts)


def tuned_rates(variant_name: str, path: Path = RATES) -> str:
    """The rates the tuning study chose for the variant, by task, or '' without a rates file."""
    if not path.is_file():
        return ""
    found = yaml.safe_load(path.read_text()).get("rates", {})
    chosen = [f"{task} {by_variant[variant_name]['lr']:g}" + (f" (at the {by_variant[variant_name]['at_edge']} edge of its grid)"
                                                               if by_variant[variant_name].get("at_edge") else "")
              for task, by_variant in found.items() if variant_name in by_variant]
    return f"Tuned learning rates ([tuning.md](tuning.md)): {', '.join(chosen)}." if chosen else ""


def notes() -> str:
    """docs/variants.md's per-method notes."""
    sections = []
    for name, variant in variants.REGISTRY.items():
        facts = docstring_facts(variant)
        cited = f"[{facts['authors']}](https://arxiv.org/abs/{facts['arxiv']})" if facts["arxiv"] else facts["authors"]
        rates = tuned_rates(name)
        sections.append(f"### `{name}`: {facts['title']}\n\n{cited}; `variants/{name}.py`.\n\n{docstring_markdown(variant)}"
                        + (f"\n\n{rates}" if rates else ""))
    return "\n\n".join(sections) + "\n"


def replace_between(path: Path, start: str, end: str, content: str) -> bool:
    """Put ``content`` between the ``start`` and ``end`` markers of ``path``; True when it changed."""
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: add the lines {start} and {end} where the generated text goes")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    updated = f"{before}{start}\n{content}{end}{after}"
    path.write_text(updated)
    return updated != text


def between(path: Path, start: str, end: str) -> str:
    return path.read_text().split(start, 1)[1].split(end, 1)[0].lstrip("\n")


def write_readme(path: Path = README) -> bool:
    """Put the current table between the markers; True when README changed."""
    return replace_between(path, START, END, table())


def readme_table(path: Path = README) -> str:
    return between(path, START, END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.docs", description="README's variants table and docs/variants.md's notes")
    parser.add_argument("--write", action="store_true", help=f"update {README.name} in place")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{README}: {'updated' if write_readme() else 'already up to date'}")
        changed = replace_between(VARIANTS_PAGE, NOTES_START, NOTES_END, notes())
        print(f"{VARIANTS_PAGE}: {'updated' if changed else 'already up to date'}")
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
