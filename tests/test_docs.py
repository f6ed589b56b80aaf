"""The repository stands on its own: code and tests cite the pages of docs/, by section name, and they exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("dgnb", "data_tools", "tests", "benchmarks", "notebooks") for p in (ROOT / d).rglob("*.py")]
SOURCES += [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]


def test_cited_doc_sections_exist():
    cited = 0
    for path in SOURCES:
        for page, section in re.findall(r"(docs/\w+\.md)(?:, '([^']+)')?", path.read_text()):
            assert (ROOT / page).is_file(), f"{path.name} cites {page}, which does not exist"
            if section:
                headings = [h.strip() for h in re.findall(r"^#+ (.*)$", (ROOT / page).read_text(), re.M)]
                assert any(h.startswith(section) for h in headings), f"{path.name}: no section '{section}' in {page}"
            cited += 1
    assert cited >= 10


def test_no_pointer_to_documents_outside_the_repository():
    outside = re.compile(r"/work/shared|(?<![\w/])(methods|datasets|DESIGN)\.md")
    for path in (p for p in SOURCES if p.name != "test_docs.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not outside.search(line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
