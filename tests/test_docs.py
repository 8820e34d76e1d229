"""The documentation holds together: every page is in the site's navigation, and every relative
link of README.md and docs/*.md reaches a file (and a heading, when it names one). No network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from doc_pages import DOCS, FENCE, HOME, PAGES, README, ROOT, nav

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def links(page: Path) -> list[str]:
    """The targets of a page's markdown links, outside code blocks and code spans."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and the site's toc both make it (for the headings used here)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    pages = {p.name for p in DOCS.glob("*.md")}
    entries = nav()
    assert HOME in entries, "the home page (README.md) is not in mkdocs.yml's nav"
    assert not (DOCS / HOME).exists(), f"docs/{HOME} would shadow README.md as the home page"
    assert sorted(pages - set(entries)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(entries) - pages - {HOME}) == [], "nav entries with no page"
    assert len(entries) == len(set(entries)), "a page is in the nav twice"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_the_readme_links_only_into_docs():
    """README.md is the site's home page too: a link outside docs/ would not exist on the site."""
    outside = [t for t in links(README) if not EXTERNAL.match(t) and not t.startswith("docs/")]
    assert outside == []


def test_the_readme_links_to_every_page():
    linked = {t.partition("#")[0] for t in links(README)}
    assert sorted(f"docs/{p.name}" for p in DOCS.glob("*.md") if f"docs/{p.name}" not in linked) == []


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) `[b](in-code.md)`\n\n```text\n[c](in-block.md)\n```\n# A `b` c\n")
    assert links(page) == ["missing.md"]
    assert anchors(page) == {"a-b-c"}
