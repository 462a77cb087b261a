"""Every backend hook is declared on the ``Backend`` / ``LaunchedSandbox`` ABCs: nothing
outside ``backends/`` probes a backend with ``getattr``, leftovers are found and removed by
asking each backend, and the ABC's defaults are what a backend without a hook gets."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import stockade
from stockade.backends import registry
from stockade.backends.base import (
    Availability,
    Backend,
    Capabilities,
    LaunchedSandbox,
    LaunchSpec,
    Leftover,
)
from stockade.backends.microvm.driver import VmHandle
from stockade.policy import EffectivePolicy

SRC = Path(stockade.__file__).resolve().parent
#: The guest-side zone: stdlib-only programs that run inside the sandbox, not on the host.
GUEST_ZONE = ("agent/guest.py", "images/guest/")


def _modules(*, outside_backends: bool) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(GUEST_ZONE) or (outside_backends and rel.startswith("backends/")):
            continue
        yield rel, ast.parse(path.read_text(), rel)


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _all_backend_classes() -> None:
    """Import every registered backend and the modules of its launched sandboxes."""
    for entry in registry.BACKENDS:
        registry.get_backend_class(entry.name)


def _declared(abc_: type) -> set[str]:
    names: set[str] = set()
    for klass in abc_.__mro__:
        names |= set(vars(klass)) | set(getattr(klass, "__annotations__", {}))
    return names


#: The hooks issue 11 names, each with the ABC it must be declared on.
HOOKS = {
    Backend: (
        "probe",
        "probe_inputs",
        "variants",
        "probe_variant",
        "check_policy",
        "provides_docker",
        "start_warning",
        "launch",
        "reap",
        "orphans",
    ),
    LaunchedSandbox: (
        "terminate",
        "kill_now",
        "alive",
        "failure_details",
        "resource_events",
        "exit_reason",
        "after_connect",
        "sync_workspace",
    ),
}


@pytest.mark.parametrize("abc_", list(HOOKS), ids=lambda c: c.__name__)
def test_the_abc_declares_every_hook_with_a_docstring(abc_: type) -> None:
    for name in HOOKS[abc_]:
        assert name in vars(abc_), f"{abc_.__name__}.{name} is not declared"
        value = vars(abc_)[name]
        function = getattr(value, "__func__", value)
        if callable(function):
            assert (function.__doc__ or "").strip(), f"{abc_.__name__}.{name} has no docstring"
    assert "kill_now" in LaunchedSandbox.__abstractmethods__  # every unit can be timed out


def test_a_backends_public_names_beyond_its_abc_stay_inside_backends() -> None:
    """Whatever a backend or launched sandbox offers besides its ABC is for its own package:
    a caller outside ``backends/`` that needs it needs a hook on the ABC instead."""
    _all_backend_classes()
    extras: dict[str, str] = {}
    for abc_ in (Backend, LaunchedSandbox):
        declared = _declared(abc_)
        for cls in _subclasses(abc_):
            for klass in cls.__mro__:
                if klass is abc_ or not issubclass(klass, abc_):
                    continue
                for name in vars(klass):
                    if not name.startswith("_") and name not in declared:
                        extras.setdefault(name, f"{cls.__module__}.{cls.__name__}")
    assert "capture_namespace_init" not in extras  # an after_connect now
    used = {
        (node.attr, rel)
        for rel, tree in _modules(outside_backends=True)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in extras
    }
    assert sorted(used) == [], f"used outside backends/, declared only on {extras}"


def _probes(tree: ast.Module) -> Iterator[tuple[ast.Call, str, str | None]]:
    """getattr/hasattr calls: (call, the object's source, the literal attribute or None)."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
        ):
            attr = node.args[1]
            literal = attr.value if isinstance(attr, ast.Constant) else None
            yield node, ast.unparse(node.args[0]), literal if isinstance(literal, str) else None


def test_no_getattr_probing_of_backends_or_launched_sandboxes() -> None:
    """Outside ``backends/``, no getattr/hasattr on anything named like a backend, a
    launched sandbox or a VM; anywhere, none whose attribute is a hook of the ABCs."""
    hooks = {
        name
        for abc_ in (Backend, LaunchedSandbox, VmHandle)
        for name in vars(abc_)
        if not name.startswith("_")
    }
    assert {"reap", "orphans", "kill_now", "provides_docker", "variants", "pid"} <= hooks
    suspicious = re.compile(r"(?i)backend|launched|\bvm\b")
    found = []
    for outside in (True, False):
        for rel, tree in _modules(outside_backends=outside):
            for call, obj, attr in _probes(tree):
                if (outside and suspicious.search(obj)) or attr in hooks:
                    found.append(f"{rel}:{call.lineno}: {ast.unparse(call)}")
    assert found == []


def test_the_probe_scan_finds_a_probe() -> None:
    """The scan above is not blind: it reports the kind of call it forbids."""
    tree = ast.parse("p = getattr(self._launched, 'process', None)\nhasattr(cls, 'reap')\n")
    assert [(obj, attr) for _, obj, attr in _probes(tree)] == [
        ("self._launched", "process"),
        ("cls", "reap"),
    ]


# --- the ABC's defaults ----------------------------------------------------------------------


class PlainBackend(Backend):
    """A backend that declares nothing beyond what the ABC requires."""

    name = "plain"
    capabilities = Capabilities(tier=9, isolation="none")

    @classmethod
    def probe(cls) -> Availability:
        return Availability(True)

    async def launch(self, spec: LaunchSpec) -> LaunchedSandbox:
        raise NotImplementedError


def _policy(tmp_path: Path, **overrides: object) -> EffectivePolicy:
    from stockade.config import load_config
    from stockade.policy import compile_policy

    return compile_policy(load_config(tmp_path, overrides={"backend": "auto", **overrides}))


def test_defaults_of_a_backend_without_hooks(tmp_path: Path) -> None:
    assert PlainBackend.variants == ()
    assert not PlainBackend.probe_variant("x").ok
    assert "no variant 'x'" in PlainBackend.probe_variant("x").reason
    assert PlainBackend.reap("abcdefgh") is None
    assert PlainBackend.orphans() == ()
    assert PlainBackend.start_warning == ""
    assert not PlainBackend().provides_docker(_policy(tmp_path))


def test_provides_docker_defaults_to_the_capability(tmp_path: Path) -> None:
    class DockerBackend(PlainBackend):
        capabilities = Capabilities(tier=9, isolation="vm", docker_inside=True)

    policy = _policy(tmp_path, docker=True)
    assert DockerBackend().provides_docker(policy)
    registry.check_docker_inside(policy, DockerBackend())
    from stockade import PolicyError

    with pytest.raises(PolicyError, match="plain backend cannot provide"):
        registry.check_docker_inside(policy, PlainBackend())


def test_a_backend_with_a_start_warning_is_never_chosen_by_auto() -> None:
    """``registry.start_warning('auto')`` is "" because of this."""
    for entry in registry.BACKENDS:
        if registry.get_backend_class(entry.name).start_warning:
            assert not entry.auto, entry.name
    assert registry.start_warning("host")
    assert registry.start_warning("auto") == ""
    assert registry.start_warning("namespace") == ""


# --- leftovers: found and removed by asking the backends --------------------------------------

OURS, FOREIGN, KNOWN = "aaaaaaaa1111", "bbbbbbbb2222", "cccccccc3333"


class LeftoverBackend(PlainBackend):
    """A backend whose engine keeps containers of three sandboxes."""

    name = "leftover"
    reaped: list[str] = []

    @classmethod
    def orphans(cls) -> tuple[Leftover, ...]:
        return tuple(
            Leftover(sid, f"engine container {sid}", f"engine rm {sid}")
            for sid in (OURS, FOREIGN, KNOWN)
        )

    @classmethod
    def reap(cls, sandbox_id: str) -> None:
        cls.reaped.append(sandbox_id)


@pytest.fixture
def leftover_registry(monkeypatch: pytest.MonkeyPatch) -> type[LeftoverBackend]:
    entry = registry.BackendEntry("leftover", 9, "a test engine", f"{__name__}:LeftoverBackend")
    monkeypatch.setattr(registry, "BACKENDS", (entry,))
    monkeypatch.setattr(LeftoverBackend, "reaped", [])
    return LeftoverBackend


def test_orphans_and_reap_ask_the_backend(
    leftover_registry: type[LeftoverBackend], tmp_path: Path
) -> None:
    from stockade.cli.orphans import find_orphans, reap_backend, remove_orphan
    from stockade.state import SandboxRecord, SandboxStatus, StateStore

    store = StateStore(tmp_path / "state")
    (store.root / "sandboxes" / OURS).mkdir(parents=True)  # a leftover directory of ours
    store.insert(SandboxRecord("known", KNOWN, "leftover", SandboxStatus.STOPPED, 0.0, 0.0))
    found = {o.sandbox: o for o in find_orphans(store) if o.kind == "container"}
    assert set(found) == {OURS, FOREIGN}  # the one with a record is no leftover
    assert found[OURS].removable and found[OURS].backend == "leftover"
    assert not found[FOREIGN].removable and "engine rm bbbbbbbb2222" in found[FOREIGN].why_not
    remove_orphan(store, found[OURS])
    reap_backend("leftover", KNOWN)
    reap_backend("no-such-backend", KNOWN)  # a record of a backend this stockade lacks
    assert leftover_registry.reaped == [OURS, KNOWN]


# --- no backend special-cased by name outside backends/ ----------------------------------------

#: Comparisons of a backend setting with a backend's name that stay outside ``backends/``,
#: by package (a module split inside it moves none out), each with why. Both are the consent
#: rule of the ``unsafe_host`` setting ("the host backend needs unsafe_host = true"), checked
#: where the configuration is validated: config and policy are below the backends and do not
#: import them.
NAMED_BACKEND_ALLOWED = {
    ("config/", "config.backend == 'host'"),
    ("policy/", "self.backend == 'host'"),
}


def _backend_name_comparisons(tree: ast.Module) -> Iterator[str]:
    """``x.backend == "microvm"``-like comparisons: a backend's name against an expression
    that names a backend (``record.backend``, ``row["backend"]``, ``backend``)."""
    names = {entry.name for entry in registry.BACKENDS}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        literals = {
            elt.value
            for side in sides
            for elt in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side])
            if isinstance(elt, ast.Constant) and isinstance(elt.value, str)
        }
        others = [ast.unparse(s) for s in sides if not isinstance(s, ast.Constant)]
        if literals & names and any("backend" in other for other in others):
            yield ast.unparse(node)


def _allowed(rel: str, text: str) -> bool:
    return any(rel.startswith(where) and text == ok for where, ok in NAMED_BACKEND_ALLOWED)


def test_no_backend_is_special_cased_by_name_outside_backends() -> None:
    found = [
        f"{rel}: {text}"
        for rel, tree in _modules(outside_backends=True)
        for text in _backend_name_comparisons(tree)
        if not _allowed(rel, text)
    ]
    assert found == []


def test_the_name_scan_finds_a_special_case() -> None:
    tree = ast.parse(
        "if record.backend == 'microvm': pass\n"
        "if row['backend'] in ('gvisor', 'x'): pass\n"
        "if key == 'host': pass\n"
    )
    assert list(_backend_name_comparisons(tree)) == [
        "record.backend == 'microvm'",
        "row['backend'] in ('gvisor', 'x')",
    ]
