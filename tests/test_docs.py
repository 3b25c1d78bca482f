"""Docs that cannot rot: the config reference matches the dataclasses, and every relative link resolves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpo_exp import config_doc

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- configuration reference ---------------------------------------------------------------------


def test_configuration_page_is_the_generated_reference():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config_doc.splice(page, config_doc.reference()) == page, (
        "docs/configuration.md differs from the dataclasses: run python -m gpo_exp.config_doc --write docs/configuration.md")


def test_every_config_field_has_a_comment():
    missing = [k for _, prefix, cls in config_doc.sections() for k, _, _, c in config_doc.rows(cls, prefix) if not c]
    assert missing == []


def test_reference_check_fails_when_a_field_changes():
    """A field renamed in the page (or in the code) no longer matches the generated block."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    broken = page.replace("`trainer.rounds`", "`trainer.round`", 1)
    assert broken != page
    assert config_doc.splice(broken, config_doc.reference()) != broken


def test_field_comment_reads_the_declaration():
    from gpo_exp.config import TrainerConfig

    assert config_doc.field_comment(TrainerConfig, "rounds").startswith("GPO rounds")
    assert ("trainer.rounds", "int", "`5`") == config_doc.rows(TrainerConfig, "trainer")[0][:3]


# --- relative links ------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*?)\s*$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    """Relative links of a markdown page whose file or #anchor does not exist."""
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    assert [p.name for p in PAGES[1:] if p.name != "index.md" and f"]({p.name})" not in index] == []


def test_link_check_fails_on_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some `code` section (x)\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md) [ok](a.md#some-code-section-x) [web](https://example.org) [self](#b)\n# B\n"
                    "[gone](missing.md) [bad anchor](a.md#nope)\n```\n[in a fence](ignored.md)\n```\n")
    assert broken_links(page) == ["b.md: missing.md (no such file)", "b.md: a.md#nope (no such heading)"]
