"""The guest zone: every program that runs inside a sandbox or microVM rather than on the host.

These files are copied into the guest and run there by its own ``python3 -S -I``, where
stockade is not installed and only the standard library can be counted on. This module is the
one place that says which files they are: the guest agent (``agent/guest.py``) and everything
under ``images/guest/`` (the microVM launcher, ``wsync.py``, the busybox ``init``). Every
Python file of the zone is parsed and may import only the standard library, never stockade,
and only absolutely (a file run as a script has no package).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "stockade"

#: The guest zone: the guest agent, and everything under images/guest/.
GUEST_AGENT = PACKAGE / "agent" / "guest.py"
GUEST_DIR = PACKAGE / "images" / "guest"
#: Files of images/guest/ that are not Python (a new Python file there must end in .py).
NOT_PYTHON = {"init"}  # busybox sh, PID 1 of the initramfs


def guest_zone() -> list[Path]:
    """Every Python file of the guest zone."""
    return [GUEST_AGENT, *sorted(path for path in GUEST_DIR.iterdir() if path.suffix == ".py")]


def _literal_import(node: ast.Call) -> str | None:
    """The module named by ``__import__("x")`` / ``importlib.import_module("x")``, if literal."""
    func = node.func
    named = (isinstance(func, ast.Name) and func.id == "__import__") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )
    if named and node.args and isinstance(node.args[0], ast.Constant):
        value = node.args[0].value
        return value if isinstance(value, str) else None
    return None


def foreign_imports(source: str, filename: str = "<guest>") -> list[str]:
    """What ``source`` imports that the guest cannot have: 'line N: reason' for each."""
    problems: list[str] = []

    def check(line: int, module: str) -> None:
        top = module.partition(".")[0]
        if top == "stockade":
            problems.append(f"line {line}: imports {module!r} (stockade is not in the guest)")
        elif top not in sys.stdlib_module_names:
            problems.append(f"line {line}: imports {module!r}, which is not in the stdlib")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"line {node.lineno}: relative import (run as a script)")
            else:
                check(node.lineno, node.module or "")
        elif isinstance(node, ast.Call):
            module = _literal_import(node)
            if module is not None:
                check(node.lineno, module)
    return problems


@pytest.mark.parametrize("path", guest_zone(), ids=lambda path: path.name)
def test_guest_file_imports_only_the_stdlib(path: Path) -> None:
    problems = foreign_imports(path.read_text(), str(path))
    assert not problems, f"{path.relative_to(PACKAGE)} must stay stdlib-only: {problems}"


def test_the_zone_is_what_the_guest_runs() -> None:
    names = {path.name for path in guest_zone()}
    assert {"guest.py", "launcher.py", "wsync.py"} <= names
    others = {
        path.name
        for path in GUEST_DIR.iterdir()
        if path.suffix != ".py" and path.name != "__pycache__"  # tests that import wsync
    }
    assert others == NOT_PYTHON, f"name new guest files *.py, or add them to NOT_PYTHON: {others}"


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("import stockade", "stockade is not in the guest"),
        ("from stockade.protocol import messages", "stockade is not in the guest"),
        ("def f():\n    import yaml", "not in the stdlib"),
        ("if True:\n    from pydantic import BaseModel", "not in the stdlib"),
        ("from . import sibling", "relative import"),
        ("from .wsync import pack", "relative import"),
        ("__import__('stockade.agent')", "stockade is not in the guest"),
        ("import importlib\nimportlib.import_module('anyio')", "not in the stdlib"),
    ],
)
def test_the_check_finds_foreign_imports(source: str, reason: str) -> None:
    problems = foreign_imports(source)
    assert len(problems) == 1 and reason in problems[0], problems


def test_the_check_accepts_the_stdlib() -> None:
    source = "import os, _socket\nfrom __future__ import annotations\nimport os.path\n"
    source += "def f():\n    import tarfile\n    from collections.abc import Iterator\n"
    assert foreign_imports(source) == []
