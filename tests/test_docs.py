"""README's variants table and docs/variants.md's notes are generated from the variant files and must not go stale."""

import variants
from lorabench import docs


def test_readme_table_is_current():
    assert docs.readme_table() == docs.table(), \
        "README's variants table is stale: make test regenerates it (python -m lorabench.docs --write); commit README.md"


def test_the_variants_page_notes_are_current_and_name_every_variant():
    assert docs.between(docs.VARIANTS_PAGE, docs.NOTES_START, docs.NOTES_END) == docs.notes(), \
        "docs/variants.md's notes are stale: make test regenerates them (python -m lorabench.docs --write); commit docs/variants.md"
    for name in variants.REGISTRY:
        assert f"### `{name}`:" in docs.notes() and f"`variants/{name}.py`" in docs.notes()


def test_a_docstring_becomes_markdown_with_its_formula_as_code_and_its_claims_as_a_list():
    class Variant:
        __doc__ = """Title.

        Someone (2024), arXiv:2401.00001.

        Formula
            y = W x
            second line

        Claims
            - first claim,
              continued
            - second claim

        Defaults: r = 8.
        """
    text = docs.docstring_markdown(Variant)
    assert text == ("**Formula**\n\n```text\ny = W x\nsecond line\n```\n\n**Claims**\n\n- first claim, continued\n- second claim"
                    "\n\nDefaults: r = 8.")


def test_every_variant_gives_the_table_a_formula_and_a_paper():
    for name, variant in variants.REGISTRY.items():
        facts = docs.docstring_facts(variant)
        assert facts["formula"].startswith("y"), f"variants/{name}.py: the first line under Formula should be the layer's output, y = ..."
        assert facts["arxiv"] and facts["authors"], f"variants/{name}.py: cite the paper as 'Authors (year), arXiv:id.'"


def test_write_fills_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{docs.START}\nold\n{docs.END}\noutro\n")
    assert docs.write_readme(readme)
    assert docs.readme_table(readme) == docs.table()
    assert not docs.write_readme(readme)
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("outro\n")


def test_every_local_link_of_readme_and_docs_resolves():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(root)}: link {target} leads nowhere"
