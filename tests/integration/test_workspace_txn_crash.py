"""The apply engine against real failures: a process killed with SIGKILL in the middle of
3,000 files, and a filesystem that fills up while the new files are staged."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import stockade
from stockade._errors import WorkspaceError
from stockade.workspace.txn import TXN_PREFIX, Op, apply_ops, recover

FILES = 3000
DIRS = 30


def old_content(i: int) -> bytes:
    return (b"old %d\n" % i) * (1 + i % 50)


def new_content(i: int) -> bytes:
    return (b"new content of file %d\n" % i) * (1 + i % 70)


def rel(i: int) -> str:
    return f"d{i % DIRS:02}/f{i:04}.txt"


# Run by the child process: apply 3,000 files (2,000 replaced, 1,000 added) plus deletions.
# Each rename and data write is slowed down a little so that kills land in every phase; the
# apply itself is the library's.
CHILD = r"""
import os, sys, time
from pathlib import Path
from stockade.workspace.txn import Op, apply_ops

project, journal, sources = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
real_rename, real_pwrite = os.rename, os.pwrite

def slow_rename(*a, **k):
    time.sleep(0.0005)
    return real_rename(*a, **k)

def slow_pwrite(*a, **k):
    time.sleep(0.0002)
    return real_pwrite(*a, **k)

os.rename, os.pwrite = slow_rename, slow_pwrite

def opener(path):
    return lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC)

ops = []
for name in sorted(os.listdir(sources)):
    i = int(name)
    path = f"d{i % %(dirs)d:02}/f{i:04}.txt"
    ops.append(Op(path, "file", source=opener(sources / name), mode=0o644))
ops += [Op("gone/x", "delete"), Op("gone", "delete")]
apply_ops(project, journal, ops)
print("done", flush=True)
""".replace("%(dirs)d", str(DIRS))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upper")
    for i in range(FILES):
        (root / str(i)).write_bytes(new_content(i))
    return root


def make_project(root: Path) -> None:
    for d in range(DIRS):
        (root / f"d{d:02}").mkdir(parents=True)
    for i in range(FILES * 2 // 3):  # the other third are new files
        (root / rel(i)).write_bytes(old_content(i))
    (root / "gone").mkdir()
    (root / "gone" / "x").write_bytes(b"x")


def start_apply(project: Path, journal: Path, sources: Path) -> subprocess.Popen[bytes]:
    """Make the project and start the child (CHILD) that applies ``sources`` to it."""
    make_project(project)
    env = {**os.environ, "PYTHONPATH": str(Path(stockade.__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(project), str(journal), str(sources)],
        env=env,
        stdout=subprocess.PIPE,
    )


def check_no_partial_file(root: Path) -> None:
    """Every visible file holds its complete old or complete new content."""
    for i in range(FILES):
        path = root / rel(i)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            assert i >= FILES * 2 // 3, f"{rel(i)} existed before the apply and went missing"
            continue
        assert data in (old_content(i), new_content(i)), f"{rel(i)} is partial"


def check_all_new(root: Path) -> None:
    for i in range(FILES):
        assert (root / rel(i)).read_bytes() == new_content(i)
    assert not (root / "gone").exists()
    strays = [os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs if TXN_PREFIX in n]
    assert strays == []


def journal_state(journal: Path) -> str | None:
    for path in journal.glob("txn-*.json"):
        try:
            return str(json.loads(path.read_bytes())["state"])
        except (OSError, ValueError):
            return None  # replaced while reading
    return None


def wait_for(predicate: object, proc: subprocess.Popen[bytes]) -> bool:
    assert callable(predicate)
    while proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.001)
    return False


# When to kill: as soon as staging began, at a random point of staging, as soon as the
# journal says committing, at a random point after that.
MOMENTS = [("staging", 0.0), ("staging", None), ("committing", 0.0), ("committing", None)]


@pytest.mark.parametrize(
    ("phase", "delay"), MOMENTS, ids=["stage0", "stage-rnd", "commit0", "commit-rnd"]
)
def test_sigkill_mid_apply_leaves_every_file_old_or_new(
    tmp_path: Path, sources: Path, phase: str, delay: float | None
) -> None:
    project = tmp_path / "project"
    journal = tmp_path / "journal"
    proc = start_apply(project, journal, sources)
    try:
        reached = wait_for(lambda: journal_state(journal) == phase, proc)
        if reached:
            time.sleep(delay if delay is not None else random.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert reached and proc.returncode == -signal.SIGKILL, "the apply ended before the kill"
    check_no_partial_file(project)
    state = journal_state(journal)
    if state == "staging":
        # Before the commit point: recovery rolls back, the project is as it was.
        note = recover(project, journal)
        assert note is not None and "rolled back" in note
        for i in range(FILES):
            path = project / rel(i)
            if i < FILES * 2 // 3:
                assert path.read_bytes() == old_content(i)
            else:
                assert not path.exists()
        assert (project / "gone" / "x").exists()
    else:
        assert state in ("committing", "finishing")
    # The next apply recovers whatever is pending, then applies (again: idempotent).
    ops = [Op(rel(i), "file", data=new_content(i)) for i in range(FILES)]
    ops += [Op("gone/x", "delete"), Op("gone", "delete")]
    apply_ops(project, journal, ops)
    check_all_new(project)
    assert [p.name for p in journal.iterdir()] == ["apply.lock"]


def test_sigkill_during_commit_is_rolled_forward(tmp_path: Path, sources: Path) -> None:
    """A kill after the commit point: recovery finishes the apply, it does not undo it."""
    project = tmp_path / "project"
    journal = tmp_path / "journal"
    proc = start_apply(project, journal, sources)
    try:
        # A few renames in: the commit has replaced some files, not all.
        reached = wait_for(lambda: journal_state(journal) == "committing", proc)
        assert reached, "the apply ended before its commit phase was seen"
        wait_for(lambda: (project / rel(5)).read_bytes() == new_content(5), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert journal_state(journal) == "committing"
    check_no_partial_file(project)
    note = recover(project, journal)
    assert note is not None and "finished" in note
    check_all_new(project)
    assert recover(project, journal) is None


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (mounted as root, unmounted after)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the full-disk test needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for d, ds, fs in os.walk(root):
        for n in fs:
            p = Path(d, n)
            out[str(p.relative_to(root))] = p.read_bytes()
        for n in ds:
            out[str(Path(d, n).relative_to(root)) + "/"] = b""
    return out


def test_apply_bigger_than_the_disk_changes_nothing(small_fs: Path, tmp_path: Path) -> None:
    project = small_fs / "project"
    (project / "src").mkdir(parents=True)
    (project / "a.txt").write_bytes(b"original a\n")
    (project / "src" / "b.txt").write_bytes(b"original b\n" * 1000)
    before = tree(project)
    ops = [
        Op("a.txt", "file", data=b"A" * 100_000),
        Op("src/b.txt", "file", data=b"B" * 1_000_000),
        Op("src/big.bin", "file", data=b"\1" * 3_000_000),
    ]
    with pytest.raises(WorkspaceError, match="not enough space") as info:
        apply_ops(project, tmp_path / "journal", ops)
    message = str(info.value)
    assert "4100000 bytes" in message and str(project) in message
    assert "nothing on the host was changed" in message
    assert tree(project) == before


def test_disk_filling_up_while_staging_changes_nothing(small_fs: Path, tmp_path: Path) -> None:
    """The space check passes, then another writer takes the space: ENOSPC in the middle of
    staging removes every staged file and replaces nothing."""
    project = small_fs / "project"
    (project / "src").mkdir(parents=True)
    (project / "a.txt").write_bytes(b"original a\n")
    (project / "src" / "b.txt").write_bytes(b"original b\n")
    big = tmp_path / "big-upper-file"
    big.write_bytes(b"\2" * 800_000)
    filler = small_fs / "filler"
    calls = {"n": 0}

    def open_big() -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the copy, after the space check measured it
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            filler.write_bytes(b"\0" * (free - 300_000))
        return os.open(big, os.O_RDONLY | os.O_CLOEXEC)

    ops = [
        Op("a.txt", "file", data=b"A" * 200_000),
        Op("src/b.txt", "file", data=b"B" * 50_000),
        Op("src/c.bin", "file", source=open_big),
    ]
    before = tree(project)
    with pytest.raises(WorkspaceError, match="No space left on device") as info:
        apply_ops(project, tmp_path / "journal", ops)
    assert "1050000 bytes" in str(info.value)
    assert calls["n"] == 2
    assert tree(project) == before
    filler.unlink()
    apply_ops(project, tmp_path / "journal", ops)
    assert (project / "src" / "c.bin").read_bytes() == big.read_bytes()
