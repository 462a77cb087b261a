"""The atomic apply engine: all or nothing, journalled, recoverable, sparse-preserving."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade._errors import WorkspaceConflictError, WorkspaceError
from stockade.workspace import txn
from stockade.workspace.txn import (
    ABSENT,
    TXN_PREFIX,
    HostState,
    Op,
    apply_ops,
    host_state,
    recover,
)

BAD_NAME = os.fsdecode(b"caf\xe9\xff.txt")  # not UTF-8: carried with surrogateescape


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under ``root``: kind, permission bits, content or link target."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = os.fsdecode(os.path.relpath(path, root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.fsencode(os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def leftovers(root: Path) -> list[str]:
    return [
        os.path.join(d, n)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith(TXN_PREFIX)
    ]


def opener(path: Path) -> Callable[[], int]:
    return lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "src").mkdir(parents=True)
    (root / "old").mkdir()
    (root / "old" / "a.txt").write_bytes(b"a\n")
    (root / "old" / "b.txt").write_bytes(b"b\n")
    (root / "src" / "app.py").write_bytes(b"print('v1')\n")
    (root / "keep.txt").write_bytes(b"keep\n")
    os.chmod(root / "keep.txt", 0o640)
    return root


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "state" / "apply-journal"


def test_applies_files_symlinks_modes_dirs_and_deletions(proj: Path, journal: Path) -> None:
    ops = [
        Op("src/app.py", "file", data=b"print('v2')\n", mode=0o755),
        Op("new/deep/x.bin", "file", data=b"\0\1\2", mode=0o600),
        Op("new", "dir", mode=0o750),
        Op("link", "symlink", target="src/app.py"),
        Op("old/a.txt", "delete"),
        Op("old/b.txt", "delete"),
        Op("old", "delete"),
        Op("src", "dir", mode=0o700),
        Op(BAD_NAME, "file", data=b"bytes name\n", mode=0o644),
    ]
    applied = apply_ops(proj, journal, ops)
    assert applied == sorted(op.path for op in ops)
    assert (proj / "src" / "app.py").read_bytes() == b"print('v2')\n"
    assert stat.S_IMODE((proj / "src" / "app.py").stat().st_mode) == 0o755
    assert (proj / "new" / "deep" / "x.bin").read_bytes() == b"\0\1\2"
    assert stat.S_IMODE((proj / "new" / "deep" / "x.bin").stat().st_mode) == 0o600
    assert stat.S_IMODE((proj / "new").stat().st_mode) == 0o750
    # An implied parent gets the umask's mode, like git's checkout.
    umask = txn._umask()
    assert stat.S_IMODE((proj / "new" / "deep").stat().st_mode) == 0o777 & ~umask
    assert os.readlink(proj / "link") == "src/app.py"
    assert not (proj / "old").exists()
    assert stat.S_IMODE((proj / "src").stat().st_mode) == 0o700
    with open(os.fsencode(proj) + b"/caf\xe9\xff.txt", "rb") as f:
        assert f.read() == b"bytes name\n"
    assert (proj / "keep.txt").read_bytes() == b"keep\n"
    assert leftovers(proj) == []
    assert [p.name for p in journal.iterdir()] == ["apply.lock"]


def test_replacing_keeps_the_mode_when_none_is_given(proj: Path, journal: Path) -> None:
    apply_ops(proj, journal, [Op("keep.txt", "file", data=b"new\n")])
    assert stat.S_IMODE((proj / "keep.txt").stat().st_mode) == 0o640
    assert (proj / "keep.txt").read_bytes() == b"new\n"


def test_setuid_bits_from_the_sandbox_are_dropped(proj: Path, journal: Path) -> None:
    apply_ops(proj, journal, [Op("suid", "file", data=b"#!/bin/sh\n", mode=0o4755)])
    assert stat.S_IMODE((proj / "suid").stat().st_mode) == 0o755


def test_file_replaces_directory_and_directory_replaces_file(proj: Path, journal: Path) -> None:
    ops = [
        Op("old/a.txt", "delete"),
        Op("old/b.txt", "delete"),
        Op("old", "file", data=b"now a file\n"),
        Op("keep.txt", "delete"),
        Op("keep.txt/inner", "file", data=b"inside\n"),
    ]
    apply_ops(proj, journal, ops)
    assert (proj / "old").read_bytes() == b"now a file\n"
    assert (proj / "keep.txt" / "inner").read_bytes() == b"inside\n"
    assert leftovers(proj) == []


def test_directory_with_host_entries_is_not_removed(proj: Path, journal: Path) -> None:
    before = snapshot(proj)
    with pytest.raises(WorkspaceConflictError, match="does not delete") as info:
        apply_ops(
            proj,
            journal,
            [Op("x", "file", data=b"x"), Op("old/a.txt", "delete"), Op("old", "delete")],
        )
    assert info.value.paths == ["old"]
    assert snapshot(proj) == before


def test_file_in_the_way_of_a_needed_directory_is_refused(proj: Path, journal: Path) -> None:
    before = snapshot(proj)
    with pytest.raises(WorkspaceConflictError, match=r"keep\.txt"):
        apply_ops(proj, journal, [Op("keep.txt/x", "file", data=b"x")])
    assert snapshot(proj) == before


def test_symlinked_parent_on_the_host_is_refused(proj: Path, journal: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (proj / "escape").symlink_to(outside)
    with pytest.raises(WorkspaceError, match="escape"):
        apply_ops(proj, journal, [Op("escape/owned", "file", data=b"x")])
    with pytest.raises(WorkspaceError, match="escape"):
        apply_ops(proj, journal, [Op("escape/owned", "delete")])
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "path", ["/abs", "../up", "a/../../up", "a//b", "./a", "", "a/\0"], ids=repr
)
def test_paths_that_could_leave_the_project_are_refused(
    proj: Path, journal: Path, path: str
) -> None:
    with pytest.raises(WorkspaceError, match="refusing"):
        apply_ops(proj, journal, [Op(path, "file", data=b"x")])


def test_expect_mismatch_aborts_everything(proj: Path, journal: Path) -> None:
    before = snapshot(proj)
    good = host_state(proj, "src/app.py")
    assert good.kind == "file" and good.oid is not None
    ops = [
        Op("a-new-file", "file", data=b"new\n", expect=ABSENT),
        Op("src/app.py", "file", data=b"v2\n", expect=good),
        Op("newdir/f", "file", data=b"f\n"),
        Op("keep.txt", "file", data=b"k2\n", expect=HostState("file", "0" * 40)),
    ]
    with pytest.raises(WorkspaceConflictError, match=r"keep\.txt") as info:
        apply_ops(proj, journal, ops)
    assert info.value.paths == ["keep.txt"]
    assert snapshot(proj) == before
    assert leftovers(proj) == []
    assert [p.name for p in journal.iterdir()] == ["apply.lock"]


def test_expect_is_checked_right_before_commit(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host edit made while the new files are being staged is still caught."""
    real = txn._Transaction._stage

    def stage_then_host_edit(self: txn._Transaction) -> None:
        real(self)
        (proj / "src" / "app.py").write_bytes(b"edited on the host meanwhile\n")

    monkeypatch.setattr(txn._Transaction, "_stage", stage_then_host_edit)
    expect = host_state(proj, "src/app.py")
    with pytest.raises(WorkspaceConflictError, match=r"src/app\.py"):
        apply_ops(
            proj,
            journal,
            [Op("src/app.py", "file", data=b"v2\n", expect=expect), Op("n", "file", data=b"")],
        )
    assert (proj / "src" / "app.py").read_bytes() == b"edited on the host meanwhile\n"
    assert not (proj / "n").exists()
    assert leftovers(proj) == []


def test_host_state_matches_git_blob_ids(proj: Path) -> None:
    data = b"print('v1')\n"
    oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert host_state(proj, "src/app.py") == HostState("file", oid)
    (proj / "ln").symlink_to("src")
    target_oid = hashlib.sha1(b"blob 3\0src").hexdigest()
    assert host_state(proj, "ln") == HostState("symlink", target_oid)
    assert host_state(proj, "src") == HostState("dir")
    assert host_state(proj, "nope") == ABSENT
    assert host_state(proj, "ln/app.py") == ABSENT  # never through a symlink


def test_sha256_mismatch_aborts_everything(proj: Path, journal: Path, tmp_path: Path) -> None:
    src = tmp_path / "upper-file"
    src.write_bytes(b"what the sandbox holds now\n")
    before = snapshot(proj)
    with pytest.raises(WorkspaceError, match="changed in the sandbox"):
        apply_ops(
            proj,
            journal,
            [
                Op("keep.txt", "file", data=b"k2\n"),
                Op("z", "file", source=opener(src), sha256=hashlib.sha256(b"reviewed").hexdigest()),
            ],
        )
    assert snapshot(proj) == before
    assert leftovers(proj) == []


def test_error_while_staging_removes_what_was_staged(proj: Path, journal: Path) -> None:
    def broken() -> int:
        raise PermissionError(13, "Permission denied", "upper/x")

    ops = [Op(f"new/f{i}", "file", data=b"x" * 100) for i in range(20)]
    ops += [Op("keep.txt", "file", data=b"new"), Op("zz/last", "file", source=broken)]
    before = snapshot(proj)
    with pytest.raises(WorkspaceError, match="cannot read the new content of zz/last"):
        apply_ops(proj, journal, ops)
    assert snapshot(proj) == before
    assert leftovers(proj) == []


def test_not_enough_space_is_refused_before_writing(
    proj: Path, journal: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.statvfs

    class Tiny:
        def __init__(self, path: str) -> None:
            self.st = real(path)

        def __getattr__(self, name: str) -> int:
            return int(getattr(self.st, name))

        f_bavail = 10  # blocks

    monkeypatch.setattr(txn.os, "statvfs", Tiny)
    before = snapshot(proj)
    with pytest.raises(WorkspaceError, match=r"need 1\.0 MiB \(1048576 bytes") as info:
        apply_ops(proj, journal, [Op("big", "file", data=b"x" * 1024 * 1024)])
    assert str(proj) in str(info.value)
    assert "nothing on the host was changed" in str(info.value)
    assert snapshot(proj) == before


def test_sparse_file_stays_sparse(proj: Path, journal: Path, tmp_path: Path) -> None:
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.seek(512 * 1024 * 1024)
        f.write(b"middle")
        f.truncate(1024**3)
    if src.stat().st_blocks * 512 > 1024 * 1024:
        pytest.skip(f"{tmp_path} does not keep holes")
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    apply_ops(
        proj, journal, [Op("disk.img", "file", source=opener(src), sha256=digest.hexdigest())]
    )
    out = proj / "disk.img"
    st = out.stat()
    assert st.st_size == 1024**3
    assert st.st_blocks * 512 <= 1024 * 1024
    with open(out, "rb") as f:
        f.seek(512 * 1024 * 1024)
        assert f.read(6) == b"middle"


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is kept only when applying as root")
def test_root_keeps_owners(proj: Path, journal: Path) -> None:
    os.chown(proj, 1234, 1235)
    os.chown(proj / "src", 1234, 1235)
    os.chown(proj / "keep.txt", 4321, 4322)
    apply_ops(
        proj,
        journal,
        [
            Op("keep.txt", "file", data=b"k\n"),
            Op("src/new.py", "file", data=b"n\n"),
            Op("fresh/dir/f", "file", data=b"f\n"),
            Op("ln", "symlink", target="keep.txt"),
        ],
    )
    owner = lambda p: (p.lstat().st_uid, p.lstat().st_gid)  # noqa: E731
    assert owner(proj / "keep.txt") == (4321, 4322)
    assert owner(proj / "src" / "new.py") == (1234, 1235)
    assert owner(proj / "fresh") == (1234, 1235)
    assert owner(proj / "fresh" / "dir" / "f") == (1234, 1235)
    assert owner(proj / "ln") == (1234, 1235)


def test_two_ops_on_one_path_are_refused(proj: Path, journal: Path) -> None:
    with pytest.raises(WorkspaceError, match="two operations"):
        apply_ops(proj, journal, [Op("x", "file", data=b"1"), Op("x", "file", data=b"2")])


# --- crashes: a journal left behind ----------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs (no rollback, no cleanup)."""


@contextlib.contextmanager
def dying_after(
    monkeypatch: pytest.MonkeyPatch, call: str, after: int
) -> Iterator[pytest.MonkeyPatch]:
    """Inside the block, txn's ``os.<call>`` works ``after`` times, then raises Crash; the
    block must end with that Crash."""
    real = getattr(os, call)
    calls = {"n": 0}

    def dying(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > after:
            raise Crash
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(txn.os, call, dying)
        with pytest.raises(Crash):
            yield m


def crash_apply(
    monkeypatch: pytest.MonkeyPatch, proj: Path, journal: Path, ops: list[Op], call: str, after: int
) -> None:
    """Run the apply and kill it at the ``after``-th call of ``os.<call>`` inside txn, as a
    dying process would: no abort (clean-up) runs."""
    with dying_after(monkeypatch, call, after) as m:
        m.setattr(txn._Transaction, "_abort", lambda self, committing: None)
        apply_ops(proj, journal, ops)


def many_ops(proj: Path) -> list[Op]:
    ops = [Op(f"src/f{i:03}.txt", "file", data=b"new %d\n" % i) for i in range(40)]
    ops += [Op(f"tree/sub{i % 3}/g{i}", "file", data=b"g") for i in range(9)]
    ops += [Op("old/a.txt", "delete"), Op("old/b.txt", "delete"), Op("old", "delete")]
    ops += [Op("keep.txt", "symlink", target="src/app.py")]
    for i in range(40):
        (proj / "src" / f"f{i:03}.txt").write_bytes(b"old %d\n" % i)
    return ops


def assert_new_state(proj: Path) -> None:
    for i in range(40):
        assert (proj / "src" / f"f{i:03}.txt").read_bytes() == b"new %d\n" % i
    assert sorted(os.listdir(proj / "tree")) == ["sub0", "sub1", "sub2"]
    assert not (proj / "old").exists()
    assert os.readlink(proj / "keep.txt") == "src/app.py"
    assert leftovers(proj) == []


@pytest.mark.parametrize("after", [0, 3, 25, 48])
def test_crash_while_staging_rolls_back(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    ops = many_ops(proj)
    before = snapshot(proj)
    # The first pwrite writes the journal.
    crash_apply(monkeypatch, proj, journal, ops, "pwrite", after + 1)
    state = json.loads(next(journal.glob("txn-*.json")).read_bytes())["state"]
    assert state == "staging"
    assert leftovers(proj)  # the crash left staged entries behind
    note = recover(proj, journal)
    assert note is not None and "rolled back" in note
    assert snapshot(proj) == before
    assert recover(proj, journal) is None
    apply_ops(proj, journal, ops)
    assert_new_state(proj)


@pytest.mark.parametrize(
    ("call", "after"), [("rename", 0), ("rename", 1), ("rename", 7), ("rename", 44), ("link", 20)]
)
def test_crash_while_committing_rolls_forward(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch, call: str, after: int
) -> None:
    """The commit renames (3 deletions, 40 files, one new tree: 44) and hard-links backups
    (41); the journal is written with os.replace, so only the commit is cut short."""
    ops = many_ops(proj)
    crash_apply(monkeypatch, proj, journal, ops, call, after)
    state = json.loads(next(journal.glob("txn-*.json")).read_bytes())["state"]
    assert state == "committing"
    # Every path holds its old or its new content, never a partial one.
    for i in range(40):
        assert (proj / "src" / f"f{i:03}.txt").read_bytes() in (b"old %d\n" % i, b"new %d\n" % i)
    note = recover(proj, journal)
    assert note is not None and "finished" in note
    assert_new_state(proj)
    assert recover(proj, journal) is None


@pytest.mark.parametrize("after", [0, 1, 2, 20])
def test_crash_while_finishing_completes(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """Every unlink comes after the commit point: the backups (keep.txt, old/a.txt,
    old/b.txt, the 40 files), then the journal."""
    ops = many_ops(proj)
    with dying_after(monkeypatch, "unlink", after):
        apply_ops(proj, journal, ops)
    state = json.loads(next(journal.glob("txn-*.json")).read_bytes())["state"]
    assert state == "finishing"
    assert recover(proj, journal) is not None
    assert_new_state(proj)


def test_recovery_repeated_after_its_own_crash(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = many_ops(proj)
    crash_apply(monkeypatch, proj, journal, ops, "rename", 10)
    with dying_after(monkeypatch, "rename", 5):
        recover(proj, journal)
    with dying_after(monkeypatch, "unlink", 3):
        recover(proj, journal)
    assert recover(proj, journal) is not None
    assert_new_state(proj)


def test_next_apply_recovers_first(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = many_ops(proj)
    crash_apply(monkeypatch, proj, journal, ops, "rename", 4)
    apply_ops(proj, journal, [Op("after", "file", data=b"after\n")])
    assert_new_state(proj)
    assert (proj / "after").read_bytes() == b"after\n"


def test_journal_of_another_project_is_not_replayed_here(
    proj: Path, journal: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_apply(monkeypatch, proj, journal, [Op("x", "file", data=b"x")], "rename", 0)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(WorkspaceError, match="belongs to project"):
        recover(other, journal)
    assert recover(proj, journal) is not None
    assert (proj / "x").read_bytes() == b"x"


def test_recover_without_a_journal_dir_does_nothing(proj: Path, tmp_path: Path) -> None:
    assert recover(proj, tmp_path / "never-made") is None
    assert not (tmp_path / "never-made").exists()


def test_doctor_recovers_every_sandbox(
    proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from stockade.cli.doctor import recover_interrupted_applies
    from stockade.state import SandboxRecord, SandboxStatus, StateStore

    store = StateStore()

    def insert_stopped(name: str, workspace: str | None) -> Path:
        """Record a stopped sandbox; return its state directory."""
        sandbox_id = store.new_id()
        state_dir = store.sandbox_dir(sandbox_id)
        now = time.time()
        store.insert(
            SandboxRecord(
                name=name,
                id=sandbox_id,
                backend="namespace",
                status=SandboxStatus.STOPPED,
                created_at=now,
                updated_at=now,
                workspace=workspace,
                dir=str(state_dir),
            )
        )
        return state_dir

    state_dir = insert_stopped("crashed", str(proj))
    insert_stopped("no-workspace", None)
    journal = state_dir / txn.JOURNAL_DIR_NAME
    ops = many_ops(proj)
    crash_apply(monkeypatch, proj, journal, ops, "rename", 9)
    rows = recover_interrupted_applies()
    assert len(rows) == 1 and rows[0]["sandbox"] == "crashed"
    assert "finished interrupted apply" in rows[0]["recovered"]
    assert_new_state(proj)
    assert recover_interrupted_applies() == []


def test_applies_of_one_project_never_interleave(
    proj: Path, journal: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one apply runs, the project directory's lock is held: another apply (from any
    sandbox, whatever its journal directory) waits for it."""
    import fcntl

    held: list[bool] = []
    real = txn._Transaction._stage

    def stage_and_probe(self: txn._Transaction) -> None:
        fd = os.open(proj, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real(self)

    monkeypatch.setattr(txn._Transaction, "_stage", stage_and_probe)
    apply_ops(proj, journal, [Op("x", "file", data=b"x")])
    assert held == [True]
    fd = os.open(proj, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    finally:
        os.close(fd)


def test_symlink_target_with_invalid_utf8(proj: Path, journal: Path) -> None:
    target = os.fsdecode(b"../\xff\xfe-target")
    apply_ops(proj, journal, [Op("odd-link", "symlink", target=target)])
    assert os.readlink(os.fsencode(proj / "odd-link")) == b"../\xff\xfe-target"


def test_git_directory_is_never_written(proj: Path, journal: Path) -> None:
    for path in (".git/refs/heads/main", "sub/.git/HEAD", ".git"):
        with pytest.raises(WorkspaceError, match="never written as files"):
            apply_ops(proj, journal, [Op(path, "file", data=b"x")])
    assert not (proj / ".git").exists()


def test_full_state_disk_at_the_commit_point_changes_nothing(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = txn._write_journal

    def full_at_commit(*args: object) -> None:
        if args[3] == "committing":
            raise OSError(28, "No space left on device")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(txn, "_write_journal", full_at_commit)
    before = snapshot(proj)
    with pytest.raises(WorkspaceError, match="cannot write the apply journal"):
        apply_ops(proj, journal, many_ops(proj))
    after = snapshot(proj)
    assert {k: v for k, v in after.items() if not k.startswith("src/f")} == before
    assert all(v[2].startswith(b"old") for k, v in after.items() if k.startswith("src/f"))
    assert leftovers(proj) == []
    assert [p.name for p in journal.iterdir()] == ["apply.lock"]


def test_damaged_journal_is_not_followed(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_apply(monkeypatch, proj, journal, [Op("keep.txt", "file", data=b"x")], "rename", 0)
    path = next(journal.glob("txn-*.json"))
    data = json.loads(path.read_bytes())
    data["steps"][0]["backup"] = "src"  # would rename the project's src away
    path.write_text(json.dumps(data))
    with pytest.raises(WorkspaceError, match="unreadable"):
        recover(proj, journal)
    assert (proj / "src" / "app.py").exists()
    assert (proj / "keep.txt").read_bytes() == b"keep\n"


def test_recover_with_nothing_pending_needs_no_project(
    proj: Path, journal: Path, tmp_path: Path
) -> None:
    apply_ops(proj, journal, [Op("x", "file", data=b"x")])
    assert recover(tmp_path / "project-removed-since", journal) is None


def test_replayed_commit_never_deletes_the_new_tree(
    proj: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """old/ is replaced by a new old/ holding a new a.txt: after every rename was done, a
    replay of the commit must find the deleted old/a.txt in old/'s backup, not take the new
    old/a.txt for it."""
    real = txn._write_journal

    def crash_before_finishing(*args: object) -> None:
        if args[3] == "finishing":
            raise Crash
        real(*args)  # type: ignore[arg-type]

    ops = [
        Op("old/a.txt", "delete"),
        Op("old/b.txt", "delete"),
        Op("old", "delete"),
        Op("old", "dir", mode=0o755),
        Op("old/a.txt", "file", data=b"the new a\n"),
    ]
    with monkeypatch.context() as m:
        m.setattr(txn, "_write_journal", crash_before_finishing)
        with pytest.raises(Crash):
            apply_ops(proj, journal, ops)
    assert (proj / "old" / "a.txt").read_bytes() == b"the new a\n"
    assert recover(proj, journal) is not None
    assert (proj / "old" / "a.txt").read_bytes() == b"the new a\n"
    assert sorted(os.listdir(proj / "old")) == ["a.txt"]
    assert leftovers(proj) == []
