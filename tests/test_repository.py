"""The repository stands alone: what its code and docs cite lies inside it."""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

from experiments import rundir

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


def test_committed_json_is_strict(tmp_path):
    """Every JSON / JSONL file in git parses as strict JSON (no NaN / Infinity)."""
    tracked = subprocess.run(["git", "ls-files", "*.json", "*.jsonl"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    assert "docs/figures/study/study.json" in tracked
    for name in tracked:
        assert rundir.check_strict_json(str(ROOT / name)) >= 1, name
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": NaN}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not strict JSON.*NaN"):
        rundir.check_strict_json(str(bad))


def test_write_jsonl_writes_non_finite_floats_as_null(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    rundir.write_jsonl(path, [{"x": float("nan"), "y": [1.0, float("inf")]}])
    assert rundir.check_strict_json(path) == 1
    assert rundir.read_jsonl(path) == [{"x": None, "y": [1.0, None]}]
