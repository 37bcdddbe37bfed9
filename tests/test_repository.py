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


HOUSE = ("chrpo", "models", "data", "experiments", "benchmarks")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> set[str]:
    """The house modules ``path`` imports, at any depth (inside functions too)."""
    import ast  # noqa: PLC0415

    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}")
                     else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in HOUSE and _is_module(n)}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for top in HOUSE for p in (ROOT / top).rglob("*.py")
            if "__pycache__" not in p.parts}


def test_import_graph_sees_function_level_imports():
    graph = _graph()
    assert "experiments.extra_cot.pipeline" in graph["experiments.extra_cot.study"]  # in main()
    assert "experiments.extra_cot.sft" in graph["experiments.extra_cot.pipeline"]
    assert sum(map(len, graph.values())) > 200


def test_no_import_circle():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_two_labs_do_not_import_each_other():
    graph = _graph()
    crossing = [f"{m} imports {n}" for m, deps in graph.items() for n in deps
                for a, b in (("experiments.extra_cot", "experiments.trees"),
                             ("experiments.trees", "experiments.extra_cot"))
                if m.startswith(a) and n.startswith(b)]
    assert not crossing, "\n".join(crossing)


_RUN_MODULE = re.compile(r"python3? -m ((?:chrpo|models|data|experiments|benchmarks)(?:\.\w+)+)")
_SOURCE_PATH = re.compile(r"\b((?:chrpo|models|data|experiments|benchmarks|tests)/[\w/]+\.py)\b")


def _runnable(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    path = base / "__main__.py" if (base / "__main__.py").is_file() else base.with_suffix(".py")
    return path.is_file() and "__main__" in path.read_text(encoding="utf-8")


def test_every_cited_module_and_source_file_exists():
    cited = [(p, m) for p in _files()
             for line in p.read_text(encoding="utf-8", errors="replace").splitlines()
             for m in _RUN_MODULE.findall(line) + _SOURCE_PATH.findall(line)]
    missing = sorted({f"{p.relative_to(ROOT)} cites {m}" for p, m in cited
                      if not (_runnable(m) if "/" not in m else (ROOT / m).is_file())})
    assert not missing, "\n".join(missing)
    assert len(cited) > 100
