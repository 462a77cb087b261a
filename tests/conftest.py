"""Shared fixtures: isolated state directories and backend gating.

A test of an isolation boundary runs the real backend or skips with the backend's own probe
reason. Backends named in ``STOCKADE_TEST_REQUIRE_BACKENDS`` (CI sets it) must be available: there
a missing one fails the test instead of skipping it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests probe for real and change what probes see (PATH, monkeypatched binaries): no result
# kept on disk between processes may answer for them (tests/unit/test_probe_cache.py turns
# it on where it is the subject).
os.environ["STOCKADE_PROBE_CACHE"] = "0"


def required_backends() -> set[str]:
    return {b.strip() for b in os.environ.get("STOCKADE_TEST_REQUIRE_BACKENDS", "").split(",") if b}


def require_backend(name: str) -> None:
    """Skip (or, when CI requires it, fail) unless backend ``name`` can run here."""
    from stockade.backends.registry import probe

    availability = probe(name)
    if availability.ok:
        return
    message = f"backend {name!r} unavailable: {availability.reason}"
    if availability.fix:
        message += f" (fix: {availability.fix})"
    if name in required_backends():
        pytest.fail(message + " -- required by STOCKADE_TEST_REQUIRE_BACKENDS")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _isolated_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test gets its own state dir and user config dir; no test sees the real ones."""
    base = tmp_path_factory.mktemp("stockade-home")
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(base / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "xdgstate"))
    yield base


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project directory to use as a workspace."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "README.md").write_text("hello\n")
    (root / "src").mkdir()
    (root / "src" / "app.py").write_text("print('app')\n")
    git = root / ".git"
    (git / "hooks").mkdir(parents=True)
    (git / "config").write_text("[core]\n")
    return root


@pytest.fixture
def namespace_backend() -> str:
    require_backend("namespace")
    return "namespace"
