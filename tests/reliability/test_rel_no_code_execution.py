"""No code execution on outside input: a static scan of the package sources (issue 10).

Walks the AST of every module under chrpo/, data/, models/ and experiments/
and fails naming file:line for: the builtins ``eval``/``exec``/``compile``;
imports of pickle-family modules (pickle, cPickle, dill, joblib, marshal,
shelve); ``np.load``/``numpy.load`` without ``allow_pickle=False``;
``torch.load``; ``yaml.load``/``yaml.unsafe_load``; ``sympify``,
``parse_expr`` and ``literal_eval``; ``subprocess`` calls with
``shell=True``. Config files are Python modules loaded by experiments/cli.py
(``exec_module``): they are the user's own code, not input, and are allowed.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("chrpo", "data", "models", "experiments")
BANNED_BUILTINS = {"eval", "exec", "compile"}
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve",
                  "cloudpickle"}
BANNED_CALLS = {"sympify", "parse_expr", "literal_eval", "unsafe_load"}


def _sources():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def violations(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every banned construct in one module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            for n in names:
                if n.split(".")[0] in BANNED_MODULES:
                    found.append((node.lineno, f"import {n}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in BANNED_BUILTINS or last in BANNED_CALLS:
            found.append((node.lineno, f"call {name}"))
        if name in ("np.load", "numpy.load", "jnp.load"):
            flag = _keyword(node, "allow_pickle")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append((node.lineno, f"{name} without allow_pickle=False"))
        if name in ("torch.load", "yaml.load"):
            found.append((node.lineno, f"call {name}"))
        if name.startswith("subprocess.") or name in ("os.system", "os.popen"):
            shell = _keyword(node, "shell")
            if name in ("os.system", "os.popen") or (
                    isinstance(shell, ast.Constant) and shell.value is True):
                found.append((node.lineno, f"{name} with a shell"))
    return found


@pytest.mark.parametrize("snippet, expected", [
    ("eval(text)", "call eval"),
    ("import pickle", "import pickle"),
    ("from joblib import load", "import joblib"),
    ("np.load(path)", "np.load without allow_pickle=False"),
    ("np.load(path, allow_pickle=True)", "np.load without allow_pickle=False"),
    ("sympy.sympify(answer)", "call sympy.sympify"),
    ("ast.literal_eval(s)", "call ast.literal_eval"),
    ("subprocess.run(cmd, shell=True)", "subprocess.run with a shell"),
])
def test_the_scanner_sees_each_banned_construct(snippet, expected):
    assert [w for _, w in violations(ast.parse(snippet))] == [expected]
    assert violations(ast.parse("np.load(path, allow_pickle=False)")) == []


def test_package_sources_execute_no_outside_input():
    sources = _sources()
    assert len(sources) > 40     # the walk found the packages
    bad = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in sources
           for line, what in violations(ast.parse(p.read_text(encoding="utf-8")))]
    assert not bad, "\n".join(bad)
