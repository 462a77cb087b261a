"""All-or-nothing application of file operations to a host project: the apply engine.

One call to :func:`apply_ops` is a transaction with three phases.

1. **Staging.** A journal listing every operation (state ``staging``) is written to the
   journal directory first. Every new file, symlink and directory is then created next to its
   target under a hidden name holding the transaction id (``.stockade-txn-<id>-<n>.tmp``), or,
   below a directory that is itself new, under its final name inside that staged directory.
   Files are copied hole by hole (``SEEK_DATA``/``SEEK_HOLE``) so sparse files stay sparse,
   and verified against their sha256; one ``syncfs`` per filesystem makes all of it durable.
   Any error here (ENOSPC included) removes what was staged: nothing on the host has been
   touched.
2. **Commit.** Right before the first rename, every ``expect`` and every assumption made while
   staging is checked again (a mismatch rolls back, :class:`WorkspaceConflictError`). The
   journal then says ``committing``: from here on the transaction is rolled *forward*. Entries
   to be deleted or replaced are kept as backups (``.stockade-txn-<id>-<n>.bak``, same
   directory: a hard link for a file replaced by a file, so its path never goes missing, a
   rename otherwise), then staged entries are renamed onto their targets; directories are
   fsynced.
3. **Finishing.** The journal says ``finishing``; backups are removed, directory modes set,
   and the journal is removed last.

Recovery (:func:`recover`, run by the next apply and by ``stockade doctor``) reads a journal
left behind by a crash: ``staging`` means nothing on the host changed yet, so the staged
entries are removed (rolled back); ``committing`` means every new entry is complete and
durable, so the renames are redone (rolled forward); ``finishing`` means only cleanup was
left. Each step checks what is on disk before acting, so recovery can itself be interrupted
and run again.

All writes go through directory fds opened with ``O_NOFOLLOW`` from the project root: a
symlink planted in the project cannot redirect them. Applies of one project hold an exclusive
``flock`` on the project directory and on a lock file in the journal directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stockade._errors import WorkspaceConflictError, WorkspaceError
from stockade.workspace.display import display_path
from stockade.workspace.layers import open_dir_beneath
from stockade.workspace.removal import remove_tree_at

__all__ = [
    "ABSENT",
    "JOURNAL_DIR_NAME",
    "TXN_PREFIX",
    "HostState",
    "Op",
    "apply_ops",
    "host_state",
    "recover",
    "split_path",
]

logger = logging.getLogger(__name__)

#: Hidden names of staged entries and backups start with this.
TXN_PREFIX = ".stockade-txn-"
#: Where a sandbox keeps its apply journal, inside its state directory.
JOURNAL_DIR_NAME = "apply-journal"

_LOCK_NAME = "apply.lock"
_JOURNAL_RE = re.compile(r"txn-([0-9a-f]{12})\.json")
_JOURNAL_VERSION = 1
_CHUNK = 1024 * 1024
_ZEROS = bytes(_CHUNK)
_STAGE_DIR_MODE = 0o700  # until its children are staged; the final mode is set afterwards
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_MODE_MASK = 0o777  # no setuid/setgid/sticky on files coming from a sandbox
_DIR_MODE_MASK = 0o3777  # no setuid on directories

HostKind = Literal["file", "symlink", "dir"]
OpKind = Literal["file", "symlink", "dir", "delete"]
# What committing does for one step: rename a staged entry onto its target ("place"),
# nothing because it was created inside a staged directory ("nested"), rename the target to a
# backup ("delete"), chmod an existing directory ("chmod"), or nothing at all ("none").
_Action = Literal["place", "nested", "delete", "chmod", "none"]


@dataclass(frozen=True)
class HostState:
    """What a path on the host holds: ``kind`` None means nothing is there.

    ``oid`` is the git blob id of a file's content or a symlink's target; None does not
    compare content (only the kind).
    """

    kind: HostKind | None
    oid: str | None = None


#: Nothing at the path.
ABSENT = HostState(None)


@dataclass(frozen=True)
class Op:
    """One change to the host project, applied by :func:`apply_ops`.

    ``kind`` "file" takes its content from ``data`` or from ``source`` (an opener returning a
    read-only fd of a regular file; it may be called twice, once to measure and once to copy,
    and the fd is closed by apply_ops); "symlink" needs ``target``; "dir" makes a directory
    (or sets ``mode`` on an existing one); "delete" removes a file, symlink or directory
    (a directory only when every entry in it is deleted by the same call). ``mode`` None keeps
    a replaced file's mode, otherwise the umask decides. ``expect`` is checked right before
    the first rename: a mismatch aborts the whole call with WorkspaceConflictError.

    A path may carry two ops only as "delete" plus a new entry (a file replacing a directory).
    Missing parent directories are created (umask modes) unless an op of kind "dir" gives one.
    """

    path: str
    kind: OpKind
    mode: int | None = None
    data: bytes | None = None
    source: Callable[[], int] | None = None
    sha256: str | None = None
    target: str | None = None
    expect: HostState | None = None


@dataclass
class _Step:
    """One op (or an implied parent directory) as the journal records it."""

    index: int
    path: str
    kind: OpKind
    action: _Action
    staged: str | None
    backup: str | None
    mode: int | None
    op: Op | None = field(default=None, compare=False)
    seen: HostKind | Literal["other"] | None = None  # host kind at the path while staging
    physical: tuple[str, ...] = ()  # where the entry is staged, relative to the project
    owner: tuple[int, int] | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "action": self.action,
            "staged": self.staged,
            "backup": self.backup,
            "mode": self.mode,
        }

    @classmethod
    def from_json(cls, txid: str, index: int, data: dict[str, Any]) -> _Step:
        """A journal's step, refusing names that are not this transaction's own: a damaged
        journal must not make recovery remove or rename anything else."""
        split_path(str(data["path"]))
        for key, suffix in (("staged", "tmp"), ("backup", "bak")):
            name = data.get(key)
            if name is not None and name != f"{TXN_PREFIX}{txid}-{index}.{suffix}":
                raise ValueError(f"step {index} has an unexpected {key} name {name!r}")
        if data["action"] not in ("place", "nested", "delete", "chmod", "none"):
            raise ValueError(f"step {index} has an unknown action {data['action']!r}")
        return cls(
            index=index,
            path=str(data["path"]),
            kind=data["kind"],
            action=data["action"],
            staged=data.get("staged"),
            backup=data.get("backup"),
            mode=data.get("mode"),
        )


# --- public API ---------------------------------------------------------------------------


def apply_ops(project: Path, journal_dir: Path, ops: Sequence[Op]) -> list[str]:
    """Apply ``ops`` to ``project``, all of them or none; return the paths changed (sorted).

    Finishes or rolls back an earlier interrupted apply first (see :func:`recover`). Raises
    WorkspaceError, with nothing on the host changed, for an invalid op or path, a failure
    while staging (ENOSPC: with the space needed), a copied file whose sha256 does not match;
    WorkspaceConflictError, nothing changed, when the host does not hold what an op expects
    or changed while staging. An error after the commit point (rare: the renames failed)
    leaves the journal for the next apply or ``stockade doctor`` to finish.
    """
    project = Path(os.path.realpath(project))
    journal_dir = Path(journal_dir)
    _make_journal_dir(journal_dir)
    with _locked(project, journal_dir):
        done = _recover_locked(project, journal_dir)
        if done:
            logger.warning("%s", done)
        if not ops:
            return []
        return _Transaction(project, journal_dir, ops).run()


def recover(project: Path, journal_dir: Path) -> str | None:
    """Finish (roll forward) or roll back an apply interrupted by a crash; idempotent.

    Returns one line per transaction saying what was done, or None when nothing was pending.
    A transaction that had not reached its commit point is rolled back (its staged entries
    removed, the host untouched); one past it is rolled forward (its renames redone, backups
    removed). Raises WorkspaceError when a step cannot be done (the journal stays, so running
    again after fixing the cause continues where it stopped).
    """
    project = Path(os.path.realpath(project))
    journal_dir = Path(journal_dir)
    try:
        names = os.listdir(journal_dir)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not any(_JOURNAL_RE.fullmatch(n) or n.startswith(".txn-") for n in names):
        return None  # nothing pending: the project need not even exist any more
    with _locked(project, journal_dir):
        return _recover_locked(project, journal_dir)


def split_path(path: str) -> tuple[str, ...]:
    """A workspace path as components; refuses anything that could leave the project root."""
    if not path or path.startswith("/") or "\0" in path:
        raise WorkspaceError(f"refusing to apply {display_path(path)}: not a relative path")
    parts = tuple(path.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise WorkspaceError(
            f"refusing to apply {display_path(path)}: empty, '.' or '..' components could "
            "escape the project"
        )
    return parts


def host_state(project: Path, path: str) -> HostState:
    """What the host holds at ``path`` (with the blob id of a file or symlink), never
    following a symlink; a path below a symlink or a file counts as absent."""
    parts = split_path(path)
    try:
        parent = open_dir_beneath(project, parts[:-1])
    except (FileNotFoundError, NotADirectoryError):
        return ABSENT
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ABSENT
        raise
    try:
        return _state_at(parent, parts[-1])
    finally:
        os.close(parent)


# --- the transaction ------------------------------------------------------------------------


class _Transaction:
    def __init__(self, project: Path, journal_dir: Path, ops: Sequence[Op]) -> None:
        self.project = project
        self.journal_dir = journal_dir
        self.txid = secrets.token_hex(6)
        self.ops = list(ops)
        self.steps: list[_Step] = []
        self.is_root = os.geteuid() == 0
        self.umask = _umask()
        self.new_dirs: list[_Step] = []  # staged directories, to get their final mode

    def _name(self, index: int, suffix: str) -> str:
        return f"{TXN_PREFIX}{self.txid}-{index}.{suffix}"

    def run(self) -> list[str]:
        self._plan()
        needed, count = self._space_needed()
        self._check_space(needed, count)
        try:
            _write_journal(self.journal_dir, self.txid, self.project, "staging", self.steps)
        except OSError as exc:
            raise self._journal_error(exc) from exc
        committing = False
        try:
            try:
                self._stage()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._no_space(needed, count, exc) from exc
                raise WorkspaceError(
                    f"apply failed while preparing the new files ({exc}); nothing on the "
                    "host was changed"
                ) from exc
            self._verify_before_commit()
            committing = True
            try:
                _write_journal(self.journal_dir, self.txid, self.project, "committing", self.steps)
            except OSError as exc:
                raise self._journal_error(exc) from exc
        except BaseException:
            self._abort(committing)
            raise
        try:
            _commit(self.project, self.steps)
            _write_journal(self.journal_dir, self.txid, self.project, "finishing", self.steps)
            _finish(self.project, self.txid, self.steps)
            _remove_journal(self.journal_dir, self.txid)
        except OSError as exc:
            raise WorkspaceError(
                f"apply failed after it started replacing files ({exc}); the journal "
                f"{str(self.journal_dir)!r} records where it stopped: fix the cause and run "
                "`stockade doctor` or apply again to finish it"
            ) from exc
        return sorted({op.path for op in self.ops})

    def _journal_error(self, exc: OSError) -> WorkspaceError:
        return WorkspaceError(
            f"cannot write the apply journal in {str(self.journal_dir)!r} ({exc.strerror}); "
            "nothing on the host was changed. Free space in the state directory (`stockade "
            "rm` of sandboxes you no longer need) and apply again"
        )

    def _abort(self, committing: bool) -> None:
        """Roll back before the commit point. If the "committing" journal may have landed
        (its write failed late), it is taken back first: a crash during the rollback must
        not lead recovery to roll a half-removed staging forward."""
        if committing:
            try:
                _write_journal(self.journal_dir, self.txid, self.project, "staging", self.steps)
            except OSError:
                _remove_journal(self.journal_dir, self.txid)
        _rollback(self.project, self.steps)
        _remove_journal(self.journal_dir, self.txid)

    # -- planning: every check that needs no write ----------------------------------------
    def _plan(self) -> None:
        deletes: dict[str, Op] = {}
        entries: dict[str, Op] = {}
        for op in self.ops:
            if ".git" in split_path(op.path):
                raise WorkspaceError(
                    f"refusing to apply {display_path(op.path)}: .git is never written as "
                    "files (the sandbox's commits come back as a branch)"
                )
            _check_op(op)
            table = deletes if op.kind == "delete" else entries
            if op.path in table:
                raise WorkspaceError(
                    f"two operations for {display_path(op.path)} in one apply; a path takes "
                    "at most one delete and one new entry"
                )
            table[op.path] = op
        for path in entries:
            names = path.split("/")
            for i in range(1, len(names)):
                prefix = "/".join(names[:i])
                if prefix in entries and entries[prefix].kind != "dir":
                    raise WorkspaceError(
                        f"{display_path(path)} cannot be applied: {display_path(prefix)} is "
                        f"applied as a {entries[prefix].kind} in the same apply"
                    )
        kinds = _HostKinds(self.project)
        # Implied parent directories of new entries, then every op, parents first.
        implied: dict[str, Op] = {}
        for path in entries:
            names = path.split("/")
            for i in range(1, len(names)):
                prefix = "/".join(names[:i])
                if prefix in entries or prefix in implied:
                    continue
                if kinds.kind(prefix) == "dir" and prefix not in deletes:
                    continue
                implied[prefix] = Op(path=prefix, kind="dir")
        all_new = {**entries, **implied}
        ordered = sorted(
            [*((p, op) for p, op in deletes.items()), *all_new.items()],
            key=lambda item: (item[0].split("/"), item[1].kind != "delete"),
        )
        staged_dirs: dict[str, tuple[str, ...]] = {}  # path -> physical location
        for index, (path, op) in enumerate(ordered):
            step = _Step(
                index=index,
                path=path,
                kind=op.kind,
                action="none",
                staged=None,
                backup=None,
                mode=None,
                op=op if path not in implied else None,
            )
            parts = step.parts
            step.seen = kinds.kind(path)
            if op.kind == "delete":
                self._plan_delete(step, kinds, deletes)
            else:
                parent = "/".join(parts[:-1])
                if parent in staged_dirs:
                    step.action = "nested"
                    step.physical = (*staged_dirs[parent], parts[-1])
                    step.owner = self._owner(kinds.owner_of_new(parts))
                elif op.kind == "dir" and step.seen == "dir" and path not in deletes:
                    mode = None if op.mode is None else op.mode & _DIR_MODE_MASK
                    step.action = "chmod" if mode is not None else "none"
                    step.mode = mode
                else:
                    self._plan_place(step, kinds, deletes)
                if op.kind == "dir" and step.action in ("place", "nested"):
                    staged_dirs[path] = step.physical
                    self.new_dirs.append(step)
                    default = 0o777 & ~self.umask
                    step.mode = default if op.mode is None else op.mode & _DIR_MODE_MASK
            self.steps.append(step)

    def _plan_delete(self, step: _Step, kinds: _HostKinds, deletes: dict[str, Op]) -> None:
        kinds.require_real_parents(step.parts)
        if step.seen is None:
            step.action = "none"  # already absent
            return
        if step.seen == "dir":
            kinds.require_emptied(step.path, deletes)
        step.action = "delete"
        step.backup = self._name(step.index, "bak")

    def _plan_place(self, step: _Step, kinds: _HostKinds, deletes: dict[str, Op]) -> None:
        kinds.require_real_parents(step.parts)
        if step.seen == "dir" and step.path not in deletes:
            kinds.require_emptied(step.path, deletes)
        if step.op is None and step.seen is not None and step.path not in deletes:
            raise WorkspaceConflictError(
                f"{display_path(step.path)} is {_what(step.seen)} on the host, but the apply "
                "puts entries below it; delete it in the same apply to replace it with a "
                "directory",
                paths=[step.path],
            )
        step.action = "place"
        step.staged = self._name(step.index, "tmp")
        step.backup = self._name(step.index, "bak")
        step.physical = (*step.parts[:-1], step.staged)
        replaced = step.seen is not None and step.path not in deletes
        step.owner = self._owner(
            kinds.owner_at(step.path) if replaced else kinds.owner_of_new(step.parts)
        )

    def _owner(self, owner: tuple[int, int]) -> tuple[int, int] | None:
        """As root, entries keep the owner of what they replace, or get their directory's,
        so an apply run by root leaves the project owned by its user."""
        return owner if self.is_root else None

    # -- staging ------------------------------------------------------------------------------
    def _space_needed(self) -> tuple[int, int]:
        """Bytes of data (holes not counted) and entries the staging will create."""
        needed = 0
        count = 0
        for step in self.steps:
            if step.action not in ("place", "nested"):
                continue
            count += 1
            op = step.op
            if op is None or op.kind != "file":
                continue
            if op.data is not None:
                needed += len(op.data)
            elif op.source is not None:
                fd = _open_source(op)
                try:
                    st = os.fstat(fd)
                    needed += min(st.st_size, st.st_blocks * 512)
                finally:
                    os.close(fd)
        return needed, count

    def _check_space(self, needed: int, count: int) -> None:
        try:
            vfs = os.statvfs(self.project)
        except OSError:
            return
        available = vfs.f_bavail * vfs.f_frsize
        if needed > available or (vfs.f_files and count > vfs.f_favail):
            raise self._no_space(needed, count, None)

    def _no_space(self, needed: int, count: int, exc: OSError | None) -> WorkspaceError:
        try:
            vfs = os.statvfs(self.project)
            free = f"{_size(vfs.f_bavail * vfs.f_frsize)} and {vfs.f_favail} inodes are free"
        except OSError:
            free = "free space unknown"
        cause = f" ({exc.strerror})" if exc is not None else ""
        return WorkspaceError(
            f"not enough space to apply{cause}: the new files need {_size(needed)} "
            f"({needed} bytes, {count} entries) on the filesystem of {str(self.project)!r}, "
            f"where {free}; nothing on the host was changed. Free some space there and apply "
            "again"
        )

    def _stage(self) -> None:
        devices: dict[int, tuple[str, ...]] = {}  # one directory per filesystem written to
        current: tuple[tuple[str, ...], int] | None = None
        try:
            for step in self.steps:
                if step.action not in ("place", "nested"):
                    continue
                parent_parts = step.physical[:-1]
                if current is None or current[0] != parent_parts:
                    if current is not None:
                        os.close(current[1])
                        current = None
                    current = (parent_parts, self._open_dir(parent_parts, step.path))
                    devices.setdefault(os.fstat(current[1]).st_dev, parent_parts)
                self._stage_one(current[1], step.physical[-1], step)
        finally:
            if current is not None:
                os.close(current[1])
        for step in sorted(self.new_dirs, key=lambda s: s.parts, reverse=True):
            fd = self._open_dir(step.physical, step.path)
            try:
                os.fchmod(fd, step.mode if step.mode is not None else 0o755)
            finally:
                os.close(fd)
        # One syncfs per filesystem makes every staged file, directory entry and mode
        # durable before the commit point, far faster than an fsync per file.
        for parts in devices.values():
            fd = self._open_dir(parts, "/".join(parts))
            try:
                _syncfs(fd)
            finally:
                os.close(fd)

    def _open_dir(self, parts: tuple[str, ...], path: str) -> int:
        try:
            return open_dir_beneath(self.project, parts)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise WorkspaceConflictError(
                    f"the directory of {display_path(path)} was removed or replaced by a "
                    "symlink or file on the host during the apply; nothing on the host was "
                    "changed, apply again",
                    paths=[path],
                ) from exc
            raise

    def _stage_one(self, parent: int, name: str, step: _Step) -> None:
        op = step.op
        if step.kind == "dir":
            os.mkdir(name, _STAGE_DIR_MODE, dir_fd=parent)
            if step.owner is not None:
                os.chown(name, *step.owner, dir_fd=parent, follow_symlinks=False)
            return
        assert op is not None  # only directories are implied
        if op.kind == "symlink":
            assert op.target is not None
            os.symlink(os.fsencode(op.target), name, dir_fd=parent)
            if step.owner is not None:
                os.chown(name, *step.owner, dir_fd=parent, follow_symlinks=False)
            return
        mode = op.mode
        if mode is None:
            mode = self._kept_mode(step) if step.seen == "file" else 0o666 & ~self.umask
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            digest = hashlib.sha256()
            if op.data is not None:
                _write_all(dst, op.data, 0)
                digest.update(op.data)
            else:
                src = _open_source(op)
                try:
                    _copy_sparse(src, dst, digest)
                finally:
                    os.close(src)
            if step.owner is not None:
                os.fchown(dst, *step.owner)
            os.fchmod(dst, mode & _FILE_MODE_MASK)
        finally:
            os.close(dst)
        if op.sha256 is not None and digest.hexdigest() != op.sha256:
            raise WorkspaceError(
                f"{display_path(op.path)} changed in the sandbox while it was being applied "
                f"(sha256 {digest.hexdigest()[:12]}, expected {op.sha256[:12]}); nothing on "
                "the host was changed, review the diff again and apply"
            )

    def _kept_mode(self, step: _Step) -> int:
        parts = step.parts
        fd = open_dir_beneath(self.project, parts[:-1])
        try:
            return stat.S_IMODE(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode)
        finally:
            os.close(fd)

    # -- the last checks before the commit point ----------------------------------------
    def _verify_before_commit(self) -> None:
        conflicts: list[tuple[str, str]] = []
        kinds = _HostKinds(self.project)
        deletes = {s.path for s in self.steps if s.kind == "delete"}
        for step in self.steps:
            now = kinds.kind(step.path)
            if step.action != "nested" and now != step.seen:
                conflicts.append((step.path, f"was {_what(step.seen)}, now {_what(now)}"))
                continue
            op = step.op
            if op is not None and op.expect is not None:
                actual = host_state(self.project, step.path)
                if actual.kind != op.expect.kind or (
                    op.expect.oid is not None and actual.oid != op.expect.oid
                ):
                    conflicts.append(
                        (step.path, f"expected {_state(op.expect)}, found {_state(actual)}")
                    )
                    continue
            if now == "dir" and step.action in ("delete", "place"):
                try:
                    kinds.require_emptied(step.path, deletes)
                except WorkspaceConflictError as exc:
                    conflicts.append((step.path, str(exc)))
        if conflicts:
            listing = "; ".join(f"{display_path(p)} ({why})" for p, why in conflicts[:10])
            more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
            raise WorkspaceConflictError(
                f"{len(conflicts)} path(s) on the host are not what this apply expected: "
                f"{listing}{more}; nothing on the host was changed",
                paths=[p for p, _ in conflicts],
            )


class _HostKinds:
    """Read-only views of the host project, through ``O_NOFOLLOW`` directory fds."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self.cache: dict[str, HostKind | Literal["other"] | None] = {}

    def _lstat(self, parts: tuple[str, ...]) -> os.stat_result | None:
        try:
            fd = open_dir_beneath(self.project, parts[:-1])
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        try:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def kind(self, path: str) -> HostKind | Literal["other"] | None:
        if path not in self.cache:
            st = self._lstat(tuple(path.split("/")))
            self.cache[path] = None if st is None else _kind_of(st)
        return self.cache[path]

    def owner_at(self, path: str) -> tuple[int, int]:
        st = self._lstat(tuple(path.split("/")))
        if st is None:
            return self.owner_of_new(tuple(path.split("/")))
        return st.st_uid, st.st_gid

    def owner_of_new(self, parts: tuple[str, ...]) -> tuple[int, int]:
        """The owner of the deepest existing directory above a new entry."""
        for i in range(len(parts) - 1, 0, -1):
            st = self._lstat(parts[:i])
            if st is not None and stat.S_ISDIR(st.st_mode):
                return st.st_uid, st.st_gid
        st = os.stat(self.project)
        return st.st_uid, st.st_gid

    def require_real_parents(self, parts: tuple[str, ...]) -> None:
        """Every existing ancestor must be a real directory (not a symlink or a file)."""
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            kind = self.kind(prefix)
            if kind is None:
                return
            if kind != "dir":
                raise WorkspaceError(
                    f"refusing to apply {display_path('/'.join(parts))}: its parent "
                    f"{display_path(prefix)} is {_what(kind)} on the host, writing through "
                    "it could leave the project"
                )

    def require_emptied(self, path: str, deletes: set[str] | dict[str, Op]) -> None:
        """A directory may go only when the same apply deletes everything in it."""
        fd = open_dir_beneath(self.project, tuple(path.split("/")))
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        kept = sorted(n for n in names if f"{path}/{n}" not in deletes)
        if kept:
            shown = ", ".join(display_path(f"{path}/{n}") for n in kept[:5])
            raise WorkspaceConflictError(
                f"directory {display_path(path)} holds entries on the host that this apply "
                f"does not delete ({shown}{', ...' if len(kept) > 5 else ''}); "
                "it cannot be removed or replaced",
                paths=[path],
            )


# --- commit, finish, roll back: shared by apply_ops and recover ---------------------------


def _commit(project: Path, steps: Sequence[_Step]) -> None:
    """Deletions (deepest first), then placements. Safe to repeat: a step whose backup
    already exists, or whose staged entry is gone, was done."""
    parents: dict[tuple[str, ...], None] = {}
    moved: dict[str, list[str]] = {}  # path -> backup names it may have been renamed to
    for step in steps:
        if step.backup is not None and step.action in ("delete", "place"):
            moved.setdefault(step.path, []).append(step.backup)
    for step in sorted(
        (s for s in steps if s.action == "delete"), key=lambda s: s.parts, reverse=True
    ):
        assert step.backup is not None
        parts = step.parts
        # Found through the backups of its ancestors: once a directory has been renamed
        # aside, a new entry at its path must never be taken for what this step deletes.
        parent = _open_parent_through_backups(project, parts, moved)
        if parent is None:
            continue
        try:
            if _exists(parent, step.backup) or not _exists(parent, parts[-1]):
                continue
            os.rename(parts[-1], step.backup, src_dir_fd=parent, dst_dir_fd=parent)
            parents[parts[:-1]] = None
        finally:
            os.close(parent)
    for step in (s for s in steps if s.action == "place"):
        assert step.staged is not None and step.backup is not None
        parts = step.parts
        parent = _open_parent(project, parts)
        if parent is None:
            continue
        try:
            staged = _lstat_at(parent, step.staged)
            if staged is None:
                continue
            target = _lstat_at(parent, parts[-1])
            if target is not None and not _exists(parent, step.backup):
                _back_up(parent, parts[-1], step.backup, target, staged)
            os.rename(step.staged, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            parents[parts[:-1]] = None
        finally:
            os.close(parent)
    _fsync_dirs(project, parents)


def _open_parent_through_backups(
    project: Path, parts: tuple[str, ...], moved: dict[str, list[str]]
) -> int | None:
    """The directory holding ``parts[-1]`` as this transaction left it: where an ancestor
    was renamed to its backup, the walk goes through the backup. None when it is gone."""
    fd = os.open(project, _DIR_FLAGS)
    try:
        for i, name in enumerate(parts[:-1]):
            actual = name
            for backup in moved.get("/".join(parts[: i + 1]), ()):
                st = _lstat_at(fd, backup)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    actual = backup
                    break
            child = os.open(actual, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    return fd


def _back_up(
    parent: int, name: str, backup: str, target: os.stat_result, staged: os.stat_result
) -> None:
    """Keep the replaced entry under ``backup``. A file replaced by a file is hard-linked,
    so the path never goes missing (the rename that follows replaces it atomically); a
    directory, or a change of type, is renamed aside."""
    if not stat.S_ISDIR(target.st_mode) and not stat.S_ISDIR(staged.st_mode):
        try:
            os.link(name, backup, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
    os.rename(name, backup, src_dir_fd=parent, dst_dir_fd=parent)


def _finish(project: Path, txid: str, steps: Sequence[_Step]) -> list[str]:
    """Remove backups, set the modes of existing directories. Returns backups that could
    not be removed because something else appeared in them (left in place)."""
    ours = re.compile(re.escape(f"{TXN_PREFIX}{txid}-") + r"\d+\.bak")
    left: list[str] = []
    parents: dict[tuple[str, ...], None] = {}
    for step in sorted((s for s in steps if s.backup is not None), key=lambda s: s.parts):
        assert step.backup is not None
        parts = step.parts
        parent = _open_parent(project, parts)
        if parent is None:
            continue
        try:
            if _exists(parent, step.backup):
                if not _remove_ours(parent, step.backup, ours):
                    left.append("/".join((*parts[:-1], step.backup)))
                parents[parts[:-1]] = None
        finally:
            os.close(parent)
    for step in sorted(
        (s for s in steps if s.action == "chmod"), key=lambda s: s.parts, reverse=True
    ):
        assert step.mode is not None
        fd = _open_parent(project, (*step.parts, ""))
        if fd is None:
            continue
        try:
            os.fchmod(fd, step.mode)
        finally:
            os.close(fd)
        parents[step.parts] = None
    _fsync_dirs(project, parents)
    for path in left:
        logger.warning(
            "kept %s: host entries appeared in a directory the apply removed", display_path(path)
        )
    return left


def _rollback(project: Path, steps: Sequence[_Step]) -> int:
    """Remove the staged entries (nested ones go with their staged directory)."""
    removed = 0
    for step in reversed(steps):
        if step.action != "place" or step.staged is None:
            continue
        parent = _open_parent(project, step.parts)
        if parent is None:
            continue
        try:
            st = _lstat_at(parent, step.staged)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                remove_tree_at(parent, step.staged)
            else:
                os.unlink(step.staged, dir_fd=parent)
            removed += 1
        finally:
            os.close(parent)
    return removed


def _recover_locked(project: Path, journal_dir: Path) -> str | None:
    notes: list[str] = []
    for name in sorted(os.listdir(journal_dir)):
        if name.startswith(".txn-") and name.endswith(".tmp"):
            # A journal update that never landed: the previous version still holds.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal_dir / name)
            continue
        match = _JOURNAL_RE.fullmatch(name)
        if match is None:
            continue
        txid = match.group(1)
        journal = _read_journal(journal_dir / name, txid)
        if journal["project"] != str(project):
            raise WorkspaceError(
                f"apply journal {str(journal_dir / name)!r} belongs to project "
                f"{journal['project']!r}, not {str(project)!r}; recover it with that project"
            )
        steps: list[_Step] = journal["steps"]
        state = journal["state"]
        try:
            if state == "staging":
                removed = _rollback(project, steps)
                notes.append(
                    f"rolled back interrupted apply {txid} of {str(project)!r}: nothing had "
                    f"been replaced, removed {removed} staged entr{'y' if removed == 1 else 'ies'}"
                )
            else:
                if state == "committing":
                    _commit(project, steps)
                    _write_journal(journal_dir, txid, project, "finishing", steps)
                left = _finish(project, txid, steps)
                changed = sum(1 for s in steps if s.action != "none")
                notes.append(
                    f"finished interrupted apply {txid} of {str(project)!r}: {changed} "
                    "path(s) now hold their new content"
                    + (f"; kept {len(left)} backup(s) holding host entries" if left else "")
                )
        except OSError as exc:
            raise WorkspaceError(
                f"could not recover the interrupted apply {txid} of {str(project)!r}: {exc}; "
                f"its journal {str(journal_dir / name)!r} is kept, fix the cause and run "
                "`stockade doctor` again"
            ) from exc
        _remove_journal(journal_dir, txid)
    return "; ".join(notes) if notes else None


# --- journal and lock ------------------------------------------------------------------------


def _make_journal_dir(journal_dir: Path) -> None:
    try:
        journal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(
            f"cannot create the apply journal directory {str(journal_dir)!r}: {exc.strerror}"
        ) from exc
    if journal_dir.is_symlink() or not journal_dir.is_dir():
        raise WorkspaceError(f"apply journal path {str(journal_dir)!r} is not a directory")


@contextlib.contextmanager
def _locked(project: Path, journal_dir: Path) -> Iterator[None]:
    """Exclusive locks on the project directory (two sandboxes applying to one project)
    and on the journal directory's lock file (apply and recover of one sandbox)."""
    try:
        project_fd = os.open(project, _DIR_FLAGS)
    except OSError as exc:
        raise WorkspaceError(
            f"project directory {str(project)!r} is not accessible: {exc.strerror}"
        ) from exc
    try:
        fcntl.flock(project_fd, fcntl.LOCK_EX)
        lock_fd = os.open(
            journal_dir / _LOCK_NAME,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)
    finally:
        os.close(project_fd)


def _write_journal(
    journal_dir: Path, txid: str, project: Path, state: str, steps: Sequence[_Step]
) -> None:
    data = json.dumps(
        {
            "version": _JOURNAL_VERSION,
            "txn": txid,
            "project": str(project),
            "state": state,
            "steps": [s.to_json() for s in steps],
        }
    ).encode("ascii")  # ensure_ascii: surrogate-escaped names survive as \udcXX
    tmp = f".txn-{txid}.json.tmp"
    dir_fd = os.open(journal_dir, _DIR_FLAGS)
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            _write_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, f"txn-{txid}.json", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def _read_journal(path: Path, txid: str) -> dict[str, Any]:
    """The journal with its steps parsed (``data["steps"]`` is a list of _Step)."""
    try:
        data = json.loads(path.read_bytes())
        if (
            not isinstance(data, dict)
            or data.get("version") != _JOURNAL_VERSION
            or data.get("txn") != txid
            or data.get("state") not in ("staging", "committing", "finishing")
            or not isinstance(data.get("steps"), list)
            or not isinstance(data.get("project"), str)
        ):
            raise ValueError("unexpected content")
        data["steps"] = [_Step.from_json(txid, i, s) for i, s in enumerate(data["steps"])]
    except (OSError, ValueError, KeyError, TypeError, WorkspaceError) as exc:
        raise WorkspaceError(
            f"apply journal {str(path)!r} is unreadable ({exc}); check the project by hand "
            f"for entries named {TXN_PREFIX}* before removing it"
        ) from exc
    return data


def _remove_journal(journal_dir: Path, txid: str) -> None:
    dir_fd = os.open(journal_dir, _DIR_FLAGS)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"txn-{txid}.json", dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- small helpers ---------------------------------------------------------------------------


def _check_op(op: Op) -> None:
    problem = None
    if op.kind not in ("file", "symlink", "dir", "delete"):
        problem = f"has an unknown kind {op.kind!r}"
    elif op.kind == "file" and (op.data is None) == (op.source is None):
        problem = "needs exactly one of data or source"
    elif op.kind == "symlink" and not op.target:
        problem = "needs a target"
    elif op.kind == "symlink" and "\0" in (op.target or ""):
        problem = "has a target containing a NUL byte"
    if problem is not None:
        raise WorkspaceError(f"the {op.kind} operation for {display_path(op.path)} {problem}")


def _open_source(op: Op) -> int:
    assert op.source is not None
    try:
        fd = op.source()
    except OSError as exc:
        raise WorkspaceError(
            f"cannot read the new content of {display_path(op.path)}: {exc}; nothing on the "
            "host was changed"
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WorkspaceError(f"new content of {display_path(op.path)} is not a regular file")
    return fd


def _copy_sparse(src: int, dst: int, digest: Any) -> None:
    """Copy the data segments of ``src`` to the same offsets of ``dst``; holes stay holes
    (and are hashed as the zeros they read as)."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to the end
                raise
            data = size
        _hash_zeros(digest, min(data, size) - offset)
        if data >= size:
            break
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        position = data
        while position < hole:
            chunk = os.pread(src, min(_CHUNK, hole - position), position)
            if not chunk:
                break  # truncated meanwhile: the sha256 check will tell
            _write_all(dst, chunk, position)
            digest.update(chunk)
            position += len(chunk)
        offset = hole
    os.ftruncate(dst, size)


def _hash_zeros(digest: Any, count: int) -> None:
    while count > 0:
        step = min(count, _CHUNK)
        digest.update(_ZEROS[:step] if step < _CHUNK else _ZEROS)
        count -= step


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _open_parent(project: Path, parts: tuple[str, ...]) -> int | None:
    try:
        return open_dir_beneath(project, parts[:-1])
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _exists(dir_fd: int, name: str) -> bool:
    return _lstat_at(dir_fd, name) is not None


def _remove_ours(parent: int, name: str, ours: re.Pattern[str]) -> bool:
    """Remove backup ``name``; inside a backed-up directory only this transaction's
    backups are removed. False when something else is in it (it is then kept)."""
    st = _lstat_at(parent, name)
    if st is None:
        return True
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)
        return True
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        clean = True
        for child in os.listdir(fd):
            removed = ours.fullmatch(child) is not None and _remove_ours(fd, child, ours)
            clean = clean and removed
    finally:
        os.close(fd)
    if clean:
        os.rmdir(name, dir_fd=parent)
    return clean


def _syncfs(fd: int) -> None:
    """syncfs(2): flush the whole filesystem holding ``fd`` (errors reported since 5.8)."""
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    if syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _fsync_dirs(project: Path, dirs: dict[tuple[str, ...], None]) -> None:
    for parts in dirs:
        fd = _open_parent(project, (*parts, ""))
        if fd is None:
            continue  # removed or replaced by this apply
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _state_at(parent: int, name: str) -> HostState:
    st = _lstat_at(parent, name)
    if st is None:
        return ABSENT
    if stat.S_ISLNK(st.st_mode):
        return HostState("symlink", _blob_id(os.fsencode(os.readlink(name, dir_fd=parent))))
    if stat.S_ISDIR(st.st_mode):
        return HostState("dir")
    if not stat.S_ISREG(st.st_mode):
        return HostState("file", None)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    try:
        return HostState("file", _blob_id_fd(fd))
    finally:
        os.close(fd)


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _blob_id_fd(fd: int) -> str:
    size = os.fstat(fd).st_size
    digest = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(_CHUNK, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()


def _kind_of(st: os.stat_result) -> HostKind | Literal["other"]:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"


def _what(kind: str | None) -> str:
    return {
        None: "absent",
        "dir": "a directory",
        "file": "a file",
        "symlink": "a symlink",
    }.get(kind, "a special file")


def _state(state: HostState) -> str:
    what = _what(state.kind)
    return f"{what} {state.oid[:12]}" if state.oid else what


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
