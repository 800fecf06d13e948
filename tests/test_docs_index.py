"""docs/index.md links every document (and only files that exist); README links the index."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def links(path: Path) -> set[Path]:
    return {(path.parent / target).resolve() for target in LINK.findall(path.read_text(encoding="utf-8"))
            if "://" not in target}


def test_the_index_links_every_document_and_nothing_missing():
    index = REPO / "docs" / "index.md"
    linked = links(index)
    missing = sorted(p.relative_to(REPO).as_posix() for p in linked if not p.exists())
    assert missing == []
    documents = {p.resolve() for p in (REPO / "docs").glob("*.md") if p.name != "index.md"}
    documents |= {(REPO / "README.md").resolve(), (REPO / "SECURITY.md").resolve()}
    documents |= {p.resolve() for p in (REPO / "examples").glob("*/README.md")}
    unlisted = sorted(p.relative_to(REPO).as_posix() for p in documents - linked)
    assert unlisted == [], f"add a line for each to docs/index.md: {unlisted}"


def test_the_readme_links_the_index():
    assert (REPO / "docs" / "index.md").resolve() in links(REPO / "README.md")
