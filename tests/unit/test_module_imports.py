"""The import structure the layout promises, read from the source (no module is imported).

- The configuration and the policy vocabulary import nothing from ``egress``: the proxy
  enforces a policy, it does not define one.
- No two modules of one package import each other, directly or through others. Imports
  inside functions and ``if TYPE_CHECKING:`` blocks count: deferring an import hides a
  circle, it does not remove it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import stockade

SRC = Path(stockade.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The stockade modules an import statement loads (a submodule when one is named)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in MODULES:
                yield alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module not in MODULES:
            return
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            yield sub if sub in MODULES else node.module


def _imports(module: str) -> set[str]:
    """Every stockade module ``module`` imports, at load time, in a function or for typing."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    return {
        target
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for target in _targets(node)
    }


def _package(module: str) -> str:
    if MODULES[module].name == "__init__.py":
        return module
    return module.rpartition(".")[0]


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("package", ["stockade.config", "stockade.policy"])
def test_configuration_and_policy_import_nothing_from_egress(package: str) -> None:
    offenders = {
        module: sorted(t for t in _imports(module) if _in(t, "stockade.egress"))
        for module in MODULES
        if _in(module, package)
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_scan_sees_the_imports_it_judges() -> None:
    # A scan that resolved nothing would pass every check above.
    assert "stockade.policy.rules" in _imports("stockade.policy.decide")
    assert "stockade.config.models" in _imports("stockade.config.load")


#: Imports a circle may not be blamed on, each with its reason. ``AsyncSandbox.connect()``
#: returns its remote implementation (SWE-ReX's RemoteRuntime pattern), a subclass that
#: ``stockade.sandbox.remote`` defines: the base class (``stockade.sandbox.core``) names its
#: subclass only inside that factory.
ALLOWED_EDGES = {("stockade.sandbox.core", "stockade.sandbox.remote")}


def test_every_allowed_edge_still_exists() -> None:
    for importer, imported in ALLOWED_EDGES:
        assert imported in _imports(importer), (importer, imported)


def _cycles() -> list[list[str]]:
    graph = {
        module: sorted(
            t
            for t in _imports(module)
            if t != module and _package(t) == _package(module) and (module, t) not in ALLOWED_EDGES
        )
        for module in MODULES
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycle_inside_a_package() -> None:
    assert _cycles() == []


def test_front_ends_import_no_private_module() -> None:
    """The CLI and the supervisor are clients of the public SDK: no ``_private`` module."""
    front = [m for m in MODULES if _in(m, "stockade.cli") or m == "stockade.supervisor"]
    assert "stockade.cli.main" in front
    offenders = {
        module: sorted(
            t for t in _imports(module) if any(p.startswith("_") for p in t.split(".")[1:])
        )
        for module in front
    }
    assert {m: t for m, t in offenders.items() if t} == {}
