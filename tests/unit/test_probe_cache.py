"""The on-disk probe cache: answers only while what the probe depends on is unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from stockade.backends import probe_cache
from stockade.backends.base import Availability, Backend, Capabilities


class FakeBackend(Backend):
    """Counts real probes; its inputs and answer are set per test."""

    name = "fake"
    capabilities = Capabilities(tier=9, isolation="none (test double)")
    calls: ClassVar[int] = 0
    inputs: ClassVar[tuple[str, ...] | None] = ()
    answer: ClassVar[Availability] = Availability(True, "works", details=("a", "b"))

    @classmethod
    def probe(cls) -> Availability:
        cls.calls += 1
        return cls.answer

    @classmethod
    def probe_inputs(cls) -> tuple[str, ...] | None:
        return cls.inputs

    async def launch(self, spec: Any) -> Any:  # pragma: no cover - never launched
        raise NotImplementedError


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeBackend]:
    monkeypatch.setenv("STOCKADE_PROBE_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    monkeypatch.setattr(FakeBackend, "calls", 0)
    monkeypatch.setattr(FakeBackend, "inputs", (str(tool), str(tmp_path / "images")))
    monkeypatch.setattr(FakeBackend, "answer", Availability(True, "works", details=("a", "b")))
    return FakeBackend


def test_second_probe_is_answered_from_disk_with_the_same_result(fake: type[FakeBackend]) -> None:
    first = probe_cache.cached_probe("fake", fake)
    second = probe_cache.cached_probe("fake", fake)
    assert fake.calls == 1
    assert second == first == fake.answer
    assert probe_cache.cache_path().stat().st_mode & 0o777 == 0o600


def test_a_replaced_input_probes_again(fake: type[FakeBackend], tmp_path: Path) -> None:
    probe_cache.cached_probe("fake", fake)
    replacement = tmp_path / "tool.new"
    replacement.write_text("#!/bin/sh\n# upgraded\n")
    os.replace(replacement, tmp_path / "tool")
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 2


def test_an_input_that_appears_probes_again(fake: type[FakeBackend], tmp_path: Path) -> None:
    fake.answer = Availability(False, "image not built", "build it")
    assert not probe_cache.cached_probe("fake", fake).ok
    assert not probe_cache.cached_probe("fake", fake).ok
    assert fake.calls == 1
    (tmp_path / "images").mkdir()
    fake.answer = Availability(True, "works")
    assert probe_cache.cached_probe("fake", fake).ok
    assert fake.calls == 2


def test_path_and_stockade_variables_are_part_of_the_key(
    fake: type[FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    probe_cache.cached_probe("fake", fake)
    monkeypatch.setenv("STOCKADE_MICROVM_PROFILE", "docker")
    probe_cache.cached_probe("fake", fake)
    monkeypatch.setenv("PATH", "/nowhere:" + os.environ["PATH"])
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 3


def test_results_expire(fake: type[FakeBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    probe_cache.cached_probe("fake", fake)
    now = time.time()
    monkeypatch.setattr(probe_cache.time, "time", lambda: now + probe_cache.TTL_OK - 5)
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 1
    monkeypatch.setattr(probe_cache.time, "time", lambda: now + probe_cache.TTL_OK + 5)
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 2
    # A failure is kept for less time than a success.
    assert probe_cache.TTL_FAILED < probe_cache.TTL_OK


def test_fresh_forget_and_disabled_all_probe(
    fake: type[FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    probe_cache.cached_probe("fake", fake)
    probe_cache.cached_probe("fake", fake, fresh=True)
    assert fake.calls == 2
    probe_cache.forget("fake")
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 3
    monkeypatch.setenv("STOCKADE_PROBE_CACHE", "0")
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 4


def test_backends_without_inputs_are_never_cached(
    fake: type[FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeBackend, "inputs", None)
    probe_cache.cached_probe("fake", fake)
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 2
    assert not probe_cache.cache_path().exists()


@pytest.mark.parametrize("garbage", ["", "not json", "[1, 2]", '{"fake": {"fingerprint": 3}}'])
def test_a_damaged_cache_file_is_ignored_and_rewritten(
    fake: type[FakeBackend], garbage: str
) -> None:
    path = probe_cache.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    assert probe_cache.cached_probe("fake", fake) == fake.answer
    assert fake.calls == 1
    assert json.loads(path.read_text())["fake"]["result"]["reason"] == "works"


def test_a_tampered_result_with_the_right_key_but_bad_shape_probes_again(
    fake: type[FakeBackend],
) -> None:
    probe_cache.cached_probe("fake", fake)
    path = probe_cache.cache_path()
    data = json.loads(path.read_text())
    data["fake"]["result"] = {"ok": True}
    path.write_text(json.dumps(data))
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 2
    data = json.loads(path.read_text())
    data["fake"]["time"] = "yesterday"
    path.write_text(json.dumps(data))
    probe_cache.cached_probe("fake", fake)
    assert fake.calls == 3


def test_an_unwritable_cache_only_costs_a_probe(
    fake: type[FakeBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert probe_cache.cached_probe("fake", fake).ok
    assert probe_cache.cached_probe("fake", fake).ok
    assert fake.calls == 2


def test_the_real_backends_name_their_inputs() -> None:
    from stockade.backends.registry import get_backend_class

    for name in ("namespace", "gvisor", "microvm"):
        inputs = get_backend_class(name).probe_inputs()
        assert inputs, name
        assert all(isinstance(p, str) and p for p in inputs)
    # Engines behind a daemon change without any file changing: always probed.
    assert get_backend_class("container").probe_inputs() is None
    assert get_backend_class("host").probe_inputs() is None


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
def test_a_second_process_reuses_the_first_ones_probe(tmp_path: Path) -> None:
    """Across processes (the point of it): the second CLI-like process runs no probe."""
    code = (
        "import stockade.backends.bubblewrap as b, stockade.backends.registry as r\n"
        "calls = []\n"
        "real = b._probe_cached.__wrapped__\n"
        "b._probe_cached = lambda: calls.append(1) or real()\n"
        "print(r.probe('namespace').ok, len(calls))\n"
    )
    env = {**os.environ, "STOCKADE_PROBE_CACHE": "1", "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0][1] == "1"
    assert runs[1] == [runs[0][0], "0"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
def test_a_sandbox_that_fails_to_start_drops_its_backends_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stockade import Sandbox, SandboxStartError
    from stockade.backends.bubblewrap import BubblewrapBackend

    monkeypatch.setenv("STOCKADE_PROBE_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from stockade.backends.registry import probe

    assert probe("namespace").ok
    assert "namespace" in json.loads(probe_cache.cache_path().read_text())

    async def refuse(self: BubblewrapBackend, spec: Any) -> Any:
        raise SandboxStartError("simulated: the launch chain failed")

    monkeypatch.setattr(BubblewrapBackend, "launch", refuse)
    with pytest.raises(SandboxStartError, match="simulated"):
        Sandbox.create(backend="namespace")
    assert "namespace" not in json.loads(probe_cache.cache_path().read_text())
