"""The state directory on a full disk: reading commands work, `rm` frees space, and starting a
sandbox fails with an error that says how to free space, never a SQLite traceback.

The state directory is a small tmpfs filled to the last byte (mounting it needs root); the
real CLI runs on the namespace backend.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import stockade

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_state_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 16 MiB tmpfs as the state directory's disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the state directory needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs",
                    str(mount_point)], check=True)  # fmt: skip
    try:
        monkeypatch.setenv("STOCKADE_STATE_DIR", str(mount_point / "state"))
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> None:
    """Write until the disk has not one byte left."""
    with open(disk / "filler", "ab", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    assert os.statvfs(disk).f_bavail == 0


def no_crash(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert "Traceback" not in r.stderr and "sqlite3" not in r.stderr, r.stderr
    return r


def test_store_reads_and_frees_on_a_full_disk(small_state_disk: Path) -> None:
    from stockade import DiskFullError
    from stockade.state import SandboxRecord, SandboxStatus, StateStore

    store = StateStore()
    now = time.time()
    dead = SandboxRecord(name="dead", id=StateStore.new_id(), backend="namespace",
                         status=SandboxStatus.RUNNING, created_at=now, updated_at=now,
                         supervisor_pid=2**22 + 1)  # fmt: skip
    store.insert(dead)
    store.close()  # the last connection checkpoints the WAL and drops its index
    ballast = small_state_disk / "ballast"
    ballast.write_bytes(b"\0" * (2 << 20))
    fill(small_state_disk)

    store = StateStore()
    assert store.read_only
    assert [r.name for r in store.list()] == ["dead"]
    seen = store.reconcile(store.get("dead"))  # reported, not recorded: no write possible
    assert seen.status == SandboxStatus.FAILED and "died" in (seen.error or "")
    with pytest.raises(DiskFullError, match=r"disk is full \(0 bytes free\): free space"):
        store.insert(dataclasses.replace(dead, name="more", id=StateStore.new_id()))
    with pytest.raises(DiskFullError):
        store.check_writable()

    ballast.unlink()  # what `rm` does first: free the space
    assert store.delete("dead").name == "dead"
    assert not store.read_only and store.list() == []


def test_full_state_disk(namespace_backend: str, project: Path, small_state_disk: Path) -> None:
    stockade("run", "--name", "big", "--", "sh", "-c",
             "head -c 4000000 /dev/zero > big.bin; echo x > a.txt", cwd=project)  # fmt: skip
    stockade("create", "--name", "live", "-C", str(project))
    stockade("exec", "live", "--", "sh", "-c", "echo y > b.txt")
    fill(small_state_disk)

    r = no_crash(stockade("ls", "--json"))
    assert {row["name"]: row["status"] for row in json.loads(r.stdout)} == {
        "big": "stopped",
        "live": "running",
    }
    assert "big" in no_crash(stockade("ls", "--all")).stdout
    assert no_crash(stockade("diff", "big", "--stat")).stdout.split("\n")[:2] == [
        "A a.txt",
        "A big.bin",
    ]
    assert "sandbox.created" in no_crash(stockade("audit", "big")).stdout
    assert "chain intact" in no_crash(stockade("audit", "big", "--verify")).stdout
    assert "leftovers of sandboxes" in no_crash(stockade("doctor", "--no-measure")).stdout

    for args in (["run", "--rm", "--", "true"], ["create", "--name", "more"]):
        r = no_crash(stockade(*args, cwd=project, check=False))
        assert r.returncode == 125
        assert f"the state directory {small_state_disk / 'state'}'s disk is full" in r.stderr
        assert "`stockade rm NAME`" in r.stderr

    # rm frees space; the first has little to free, the second a lot.
    no_crash(stockade("rm", "--force", "live"))
    no_crash(stockade("rm", "--force", "big"))
    assert json.loads(stockade("ls", "--json").stdout) == []
    assert os.listdir(small_state_disk / "state" / "sandboxes") == []
    # With the space freed, stockade works again.
    assert "no changes discarded" in no_crash(stockade("run", "--rm", "--", "true",
                                                       cwd=project)).stderr  # fmt: skip
