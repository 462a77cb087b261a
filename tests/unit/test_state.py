"""The SQLite state store: CRUD, names, concurrency, permissions, reconcile."""

from __future__ import annotations

import errno
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stockade._errors import ConfigError, SandboxNotFoundError
from stockade.state import (
    SCHEMA_VERSION,
    SandboxRecord,
    SandboxStatus,
    StateStore,
    default_state_dir,
    is_disk_full,
    process_start_time,
    validate_name,
)


def _record(name: str, **fields: object) -> SandboxRecord:
    now = time.time()
    values: dict[str, object] = {
        "name": name,
        "id": StateStore.new_id(),
        "backend": "namespace",
        "status": SandboxStatus.CREATED,
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    return SandboxRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


def test_crud_round_trip(store: StateStore) -> None:
    rec = _record("alpha", policy_hash="abc", policy_json="{}", workspace="/src")
    store.insert(rec)
    assert store.get("alpha") == rec
    updated = store.update("alpha", status=SandboxStatus.RUNNING, supervisor_pid=123)
    assert updated.status is SandboxStatus.RUNNING and updated.supervisor_pid == 123
    assert updated.updated_at >= rec.updated_at
    assert store.update("alpha", status="stopped").status is SandboxStatus.STOPPED
    store.insert(_record("beta"))
    assert [r.name for r in store.list()] == ["alpha", "beta"]
    assert store.delete("alpha").name == "alpha"
    assert [r.name for r in store.list()] == ["beta"]
    with pytest.raises(SandboxNotFoundError):
        store.get("alpha")


def test_duplicate_name_is_refused_with_a_fix(store: StateStore) -> None:
    store.insert(_record("dup"))
    with pytest.raises(
        ConfigError, match=r"already exists; pick another name or `stockade rm dup`"
    ):
        store.insert(_record("dup"))


def test_check_name_free(store: StateStore) -> None:
    store.check_name_free("free")
    store.insert(_record("used"))
    with pytest.raises(ConfigError, match=r"'used' already exists; .*`stockade rm used`"):
        store.check_name_free("used")
    with pytest.raises(ConfigError, match="invalid sandbox name"):
        store.check_name_free("../x")


def test_delete_by_name_and_id_spares_a_namesake(store: StateStore) -> None:
    mine = _record("shared")
    store.insert(mine)
    with pytest.raises(SandboxNotFoundError):
        store.delete("shared", sandbox_id=StateStore.new_id())
    assert store.get("shared") == mine
    assert store.delete("shared", sandbox_id=mine.id) == mine
    with pytest.raises(SandboxNotFoundError):
        store.get("shared")


def test_is_disk_full(tmp_path: Path) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"), tmp_path)
    # An I/O error on a disk with room is an I/O error, not a full disk.
    assert not is_disk_full(sqlite3.OperationalError("disk I/O error"), tmp_path)
    assert not is_disk_full(ValueError("database or disk is full"), tmp_path)


def test_not_found_lists_close_names(store: StateStore) -> None:
    store.insert(_record("web-server"))
    store.insert(_record("worker"))
    with pytest.raises(SandboxNotFoundError, match="did you mean 'web-server'"):
        store.get("web-servr")
    with pytest.raises(SandboxNotFoundError):
        store.update("nope", status="failed")
    with pytest.raises(SandboxNotFoundError):
        store.delete("nope")


def test_update_refuses_unknown_fields_and_statuses(store: StateStore) -> None:
    store.insert(_record("x1"))
    with pytest.raises(ConfigError, match="cannot update"):
        store.update("x1", name="other")
    with pytest.raises(ConfigError, match="invalid sandbox status"):
        store.update("x1", status="exploded")


@pytest.mark.parametrize("name", ["a", "my-box", "box_1.2", "0abc", "a" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "A", "a/b", "../x", "a b", "a" * 64, "ü"])
def test_invalid_names(store: StateStore, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid sandbox name"):
        store.insert(_record(name))


def test_ids_cannot_escape_the_state_dir(store: StateStore) -> None:
    with pytest.raises(ConfigError, match="invalid sandbox id"):
        store.sandbox_dir("../../etc")
    with pytest.raises(ConfigError):
        store.insert(_record("ok", id="../x"))


def test_new_name_is_friendly_and_unused(store: StateStore) -> None:
    names = {store.new_name() for _ in range(50)}
    for name in names:
        validate_name(name)
        adjective, animal, suffix = name.split("-")
        assert adjective.isalpha() and animal.isalpha() and len(suffix) == 4
    store.insert(_record(next(iter(names))))
    assert store.new_name() not in {r.name for r in store.list()}


def test_directories_are_private(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    store = StateStore(root)
    sandbox_dir = store.sandbox_dir("0123456789abcdef")
    assert sandbox_dir == root / "sandboxes" / "0123456789abcdef"
    for path in (root, root / "sandboxes", sandbox_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE((root / "state.db").stat().st_mode) == 0o600


def test_schema_version_and_wal(store: StateStore) -> None:
    conn = sqlite3.connect(store.db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    StateStore(store.root)  # reopening does not migrate again


def test_newer_schema_is_refused(store: StateStore) -> None:
    conn = sqlite3.connect(store.db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match="newer than this stockade"):
        StateStore(store.root)


def test_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "explicit"
    monkeypatch.delenv("STOCKADE_STATE_DIR")
    assert default_state_dir() == tmp_path / "xdg" / "stockade"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "stockade"
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(tmp_path / "explicit"))
    assert StateStore().root == tmp_path / "explicit"


def _hammer(root: str, worker: int, count: int) -> None:
    store = StateStore(Path(root))
    for i in range(count):
        name = f"w{worker}-{i}"
        store.insert(_record(name))
        store.update(name, status=SandboxStatus.RUNNING)
        store.list()
        if i % 3 == 0:
            store.delete(name)


def test_two_processes_use_the_store_at_once(tmp_path: Path) -> None:
    root = tmp_path / "state"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(root), w, 60)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = StateStore(root).list()
    expected = {f"w{w}-{i}" for w in range(2) for i in range(60) if i % 3}
    assert {r.name for r in records} == expected
    assert all(r.status is SandboxStatus.RUNNING for r in records)


def test_process_start_time_of_self_and_of_nothing() -> None:
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(2**22 + 12345) is None


def test_reconcile_keeps_a_live_supervisor(store: StateStore) -> None:
    pid = os.getpid()
    rec = store.insert(
        _record(
            "live",
            status=SandboxStatus.RUNNING,
            supervisor_pid=pid,
            supervisor_start=process_start_time(pid),
        )
    )
    assert store.reconcile(rec) == rec


def test_reconcile_marks_a_dead_supervisor_failed(store: StateStore) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(proc.pid)
    proc.wait()
    rec = store.insert(
        _record(
            "dead", status=SandboxStatus.RUNNING, supervisor_pid=proc.pid, supervisor_start=start
        )
    )
    after = store.reconcile(rec)
    assert after.status is SandboxStatus.FAILED
    assert after.error == f"supervisor process {proc.pid} died"
    assert store.get("dead") == after


def test_reconcile_sees_through_a_reused_pid(store: StateStore) -> None:
    # Our own pid is alive, but with another start time it is not the recorded supervisor.
    pid = os.getpid()
    start = process_start_time(pid)
    assert start is not None
    rec = store.insert(
        _record(
            "reused",
            status=SandboxStatus.STARTING,
            supervisor_pid=pid,
            supervisor_start=start - 1,
        )
    )
    after = store.reconcile(rec)
    assert after.status is SandboxStatus.FAILED
    assert after.error == f"supervisor process {pid} died"


def test_reconcile_leaves_other_states_and_newer_rows_alone(store: StateStore) -> None:
    stopped = store.insert(_record("stopped", status=SandboxStatus.STOPPED, supervisor_pid=1))
    assert store.reconcile(stopped) == stopped
    stale = store.insert(
        _record("moved-on", status=SandboxStatus.RUNNING, supervisor_pid=2**22 + 1)
    )
    current = store.update("moved-on", supervisor_pid=os.getpid())
    after = store.reconcile(stale)  # the stale view must not clobber the new supervisor
    assert after == current and after.status is SandboxStatus.RUNNING
