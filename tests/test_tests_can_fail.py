"""Every test can fail: a scan of tests/ for tests that pass whatever the code does.

What it refuses: a test function that checks nothing (no ``assert``, no ``pytest.raises``/``fail``,
no ``raise AssertionError``, no ``check=True`` subprocess, no call of a helper that does one of
those); ``assert`` of a constant; a comparison of a value with itself; an ``except`` clause that
catches everything (or Exception, or AssertionError) and goes on as if nothing happened; a skip whose
condition is always true.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from harness import REPO_ROOT

TESTS = REPO_ROOT / "tests"
PYTEST_CHECKS = {"raises", "fail", "warns", "deprecated_call", "approx"}
BROAD = {"Exception", "BaseException", "AssertionError"}


def _checks_directly(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Raise) and n.exc is not None:
            raised = n.exc.func if isinstance(n.exc, ast.Call) else n.exc
            if isinstance(raised, ast.Name) and raised.id in ("AssertionError", "Failed"):
                return True
        if isinstance(n, ast.Call):
            func = n.func
            if isinstance(func, ast.Attribute) and func.attr in PYTEST_CHECKS:
                return True
            if any(k.arg == "check" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in n.keywords):
                return True
    return False


def _called_names(node: ast.AST) -> set[str]:
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            if isinstance(n.func, ast.Name):
                names.add(n.func.id)
            elif isinstance(n.func, ast.Attribute):
                names.add(n.func.attr)
    return names


def _functions(trees: dict[Path, ast.Module]) -> Iterator[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, n


def _checking_helpers(trees: dict[Path, ast.Module]) -> set[str]:
    """Names of the functions in tests/ that check something, directly or through one another."""
    bodies = {f.name: f for _, f in _functions(trees) if not f.name.startswith("test_")}
    checking = {name for name, f in bodies.items() if _checks_directly(f)}
    while True:
        more = {name for name, f in bodies.items() if name not in checking and _called_names(f) & checking}
        if not more:
            return checking
        checking |= more


def problems(root: Path = TESTS) -> list[str]:
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in sorted(root.rglob("*.py"))
             if "__pycache__" not in p.parts}
    helpers = _checking_helpers(trees)
    found = []
    for path, f in _functions(trees):
        if f.name.startswith("test_") and not _checks_directly(f) and not _called_names(f) & helpers:
            found.append(f"{path.name}:{f.lineno}: {f.name} checks nothing")
    for path, tree in trees.items():
        for n in ast.walk(tree):
            where = f"{path.name}:{getattr(n, 'lineno', 0)}"
            if isinstance(n, ast.Assert) and isinstance(n.test, ast.Constant):
                found.append(f"{where}: assert of a constant")
            if isinstance(n, ast.Compare) and len(n.comparators) == 1 and \
                    ast.dump(n.left) == ast.dump(n.comparators[0]) and not isinstance(n.left, ast.Constant):
                found.append(f"{where}: a value compared with itself")
            if isinstance(n, ast.ExceptHandler) and (n.type is None or (isinstance(n.type, ast.Name)
                                                                        and n.type.id in BROAD)):
                if all(isinstance(s, (ast.Pass, ast.Continue)) for s in n.body):
                    found.append(f"{where}: an except clause that swallows every failure")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("skip", "skipif") \
                    and n.args and isinstance(n.args[0], ast.Constant) and n.args[0].value is True:
                found.append(f"{where}: a skip that always skips")
    return found


def test_every_test_in_the_suite_can_fail() -> None:
    assert problems() == []


def test_the_scan_finds_each_kind_of_test_that_cannot_fail(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def helper(x):\n    assert x\n"
        "def indirect(x):\n    helper(x)\n"
        "def test_via_helper():\n    indirect(1)\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_nothing():\n    int('1')\n"
        "def test_constant():\n    assert True\n"
        "def test_itself():\n    x = 1\n    assert x == x\n"
        "def test_swallows():\n    try:\n        assert 1 == 2\n    except AssertionError:\n        pass\n"
        "@pytest.mark.skipif(True, reason='never runs')\ndef test_skipped():\n    assert 1\n")
    assert sorted(p.split(": ", 1)[1] for p in problems(tmp_path)) == [
        "a skip that always skips", "a value compared with itself", "an except clause that swallows every failure",
        "assert of a constant", "assert of a constant", "test_nothing checks nothing"]
