"""Static check of every Python file: pyflakes finds no undefined name, unused variable or similar slip.

CPU CI never runs the CUDA-only paths (the scheduler's GPU copies, the flash backend), so a slip there would
otherwise first show on a GPU: a dropped helper did exactly that once (a NameError in every CUDA launch)."""
from __future__ import annotations

import ast
import pathlib

from pyflakes import checker, messages

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("server", "client", "bench", "scripts", "tests", "csrc", "deploy")
# Imports made only to probe that a module loads (the compiled extension, an optional backend).
ALLOWED = (messages.UnusedImport,)


def python_files():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield from sorted(ROOT.glob("*.py"))


def test_pyflakes_finds_nothing():
    files = list(python_files())
    assert any(f.name == "scheduler.py" for f in files)  # the walk sees the package
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for m in checker.Checker(tree, filename=str(path)).messages:
            if not isinstance(m, ALLOWED):
                found.append(str(m))
    assert not found, "\n".join(found)


def test_the_check_catches_an_undefined_name():
    tree = ast.parse("def f(stream):\n    _wait(stream)\n")
    assert any(isinstance(m, messages.UndefinedName) for m in checker.Checker(tree, "x.py").messages)
