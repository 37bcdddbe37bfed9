"""The repository stands alone: what its code and docs cite lies inside it."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("chrpo", "models", "data", "experiments", "tests", "benchmarks", "docs", ".ci")
_DOC = re.compile(r"\bdocs/[\w./-]+?\.md\b")
_OUTSIDE = re.compile(r"\.\./shared|(?<![\w/])(?:CHRPO|DESIGN|TREES)\.md")


def _files():
    out = [ROOT / "README.md", ROOT / "setup.cfg", ROOT / "pyproject.toml"]
    for top in SOURCES:
        out += [p for p in (ROOT / top).rglob("*")
                if p.is_file() and p.suffix in (".py", ".md", ".cfg", ".toml", "")
                and "__pycache__" not in p.parts]
    return [p for p in out if p.exists() and p != pathlib.Path(__file__).resolve()]


def test_nothing_points_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in _files()
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if _OUTSIDE.search(line)]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_every_cited_doc_page_exists():
    missing = sorted({f"{p.relative_to(ROOT)} cites {m}"
                      for p in _files()
                      for m in _DOC.findall(p.read_text(encoding="utf-8", errors="replace"))
                      if not (ROOT / m).is_file() and "figures" not in m})
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("line, outside", [("see ../shared/DESIGN.md", True),
                                           ("(CHRPO.md, stage 3)", True),
                                           ("(docs/method.md, stage 3)", False),
                                           ("docs/chrpo.md", False)])
def test_outside_pattern(line, outside):
    assert bool(_OUTSIDE.search(line)) is outside
