"""Write a sandbox's workspace changes to the host project, safely.

Everything that can refuse the apply (a path escaping the project, a protected path asked for
by name, a conflict with a host edit) is checked before the first write. Writes go through
directory fds opened with ``O_NOFOLLOW`` from the project root, so a symlink planted on the
host or in the diff cannot redirect them, and each file or symlink lands with a rename from a
temporary name in its own directory, so a reader never sees a half-written file.

Only changes that a fresh diff of the upper layer still shows are applied: a diff passed in
(the one a user reviewed) selects what to apply, it never supplies content.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stockade._errors import WorkspaceConflictError, WorkspaceError
from stockade.workspace.diff import (
    FileChange,
    WorkspaceDiff,
    compute_diff,
    is_protected,
    normalize_protected,
)
from stockade.workspace.layers import (
    ModeRestore,
    WorkspaceLayers,
    open_dir_beneath,
    open_file_beneath,
    restore_modes,
)

__all__ = ["ApplyResult", "apply_diff"]

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_NEW_DIR_MODE = 0o700  # until its children are written; the final mode is set last


@dataclass(frozen=True)
class ApplyResult:
    """Paths written to the host, and paths left alone with the reason why."""

    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.applied)


def apply_diff(
    layers: WorkspaceLayers,
    diff: WorkspaceDiff | None = None,
    *,
    paths: Iterable[str] | None = None,
    protected: Iterable[str] = (),
    force: bool = False,
) -> ApplyResult:
    """Apply the sandbox's changes (all, or those at/under ``paths``) to ``layers.lower``.

    Raises WorkspaceError, before writing anything, for a path that is absolute, contains
    ``..``, or whose parent on the host is a symlink or not a directory, and for a protected
    path named in ``paths``. Raises WorkspaceConflictError, before writing anything, when a
    target changed on the host since the sandbox started, unless ``force``.
    """
    protected_set = normalize_protected(protected)
    fresh = compute_diff(layers, protected=protected_set)
    reviewed = fresh if diff is None else diff
    for change in reviewed.changes:
        _split(change.path)
    flagged = frozenset(c.path for c in reviewed.changes if c.protected)
    selected = _select(reviewed, paths, protected_set | flagged)

    skipped: list[tuple[str, str]] = []
    current: dict[str, list[FileChange]] = {}
    for change in fresh.changes:
        current.setdefault(change.path, []).append(change)
    plan = _Plan(layers, force=force)
    todo: list[FileChange] = []
    for change in selected:
        if change.protected or is_protected(change.path, protected_set):
            skipped.append((change.path, "protected path: never applied to the host"))
        elif any(change.same_change(c) for c in current.get(change.path, [])):
            todo.append(change)
        elif (why := plan.target_conflict(change)) is not None:
            # The diff no longer matches because the host moved: a conflict. Forcing it
            # applies what the sandbox holds now, as a fresh diff describes it.
            plan.conflicts.append((change.path, why))
            if force:
                todo.extend(c for c in current.get(change.path, []) if not c.protected)
        elif change.kind == "deleted" and plan.host_missing(change):
            skipped.append((change.path, "already absent on the host"))
        else:
            skipped.append((change.path, "changed in the sandbox since the diff was computed"))
    todo = _dedupe(_with_new_parents(todo, current, reviewed))

    plan.check(todo)
    result = plan.execute()
    # What apply wrote is the host's now: no longer a difference from the baseline.
    layers.baseline.refresh(result.applied)
    result.skipped[:0] = skipped
    result.skipped.sort()
    return result


def _split(path: str) -> tuple[str, ...]:
    """A diff path as components; refuses anything that could leave the project root."""
    parts = tuple(path.split("/"))
    if not path or path.startswith("/") or "\0" in path:
        raise WorkspaceError(f"refusing to apply {path!r}: not a relative path")
    if any(part in ("", ".", "..") for part in parts):
        raise WorkspaceError(
            f"refusing to apply {path!r}: empty, '.' or '..' components could escape the project"
        )
    return parts


def _select(
    reviewed: WorkspaceDiff, paths: Iterable[str] | None, protected: frozenset[str]
) -> list[FileChange]:
    if paths is None:
        return list(reviewed.changes)
    wanted: list[str] = []
    for raw in paths:
        if raw.startswith("/") or "\0" in raw:
            raise WorkspaceError(f"refusing to apply {raw!r}: paths are relative to the project")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise WorkspaceError(f"refusing to apply {raw!r}: '..' could escape the project")
        name = "/".join(parts)
        if name and is_protected(name, protected):
            raise WorkspaceError(
                f"{raw!r} is a protected path and is never applied to the host; remove it "
                "from the protected list in the policy if that is really intended"
            )
        if not any(_under(c.path, name) for c in reviewed.changes):
            raise WorkspaceError(f"no change at {raw!r} in the workspace diff")
        wanted.append(name)
    return [c for c in reviewed.changes if any(_under(c.path, w) for w in wanted)]


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _with_new_parents(
    todo: list[FileChange], current: dict[str, list[FileChange]], reviewed: WorkspaceDiff
) -> list[FileChange]:
    """Add the new directories a selected change needs (``paths=["new/dir/f.py"]``), if the
    reviewed diff shows them too."""
    out = list(todo)
    for change in todo:
        parts = change.path.split("/")
        for i in range(1, len(parts)):
            group = current.get("/".join(parts[:i]), [])
            if not any(c.kind == "added" and c.type == "dir" for c in group):
                continue
            for extra in group:
                if not extra.protected and any(extra.same_change(r) for r in reviewed.changes):
                    out.append(extra)
    return out


def _dedupe(changes: list[FileChange]) -> list[FileChange]:
    out: list[FileChange] = []
    for change in changes:
        if not any(change.same_change(c) for c in out):
            out.append(change)
    return out


def _order_key(change: FileChange) -> list[str]:
    return change.path.split("/")


class _Plan:
    def __init__(self, layers: WorkspaceLayers, *, force: bool) -> None:
        self.layers = layers
        self.lower = layers.lower
        self.force = force
        self.baseline = layers.baseline_ns
        self.own_writes = layers.load_applied()
        self.conflicts: list[tuple[str, str]] = []
        self.todo: list[FileChange] = []
        self.new_dirs: set[str] = set()
        self.deleting: set[str] = set()
        self.applied: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.touched: set[str] = set()
        self.dir_modes: dict[str, int] = {}
        self.is_root = os.geteuid() == 0

    # -- checks: nothing is written until all of them pass ------------------------------
    def target_conflict(self, change: FileChange) -> str | None:
        """Why the host entry at ``change.path`` is not what the sandbox started from."""
        st = _lstat_or_none(self.lower.joinpath(*_split(change.path)))
        if st is None:
            return "removed on the host" if change.kind == "modified" else None
        if st.st_ctime_ns > self.baseline and self.own_writes.get(change.path) != st.st_ctime_ns:
            return "changed on the host since the sandbox started"
        if change.kind == "added" and change.path not in self.deleting:
            return "already exists on the host"
        return None

    def host_missing(self, change: FileChange) -> bool:
        return _lstat_or_none(self.lower.joinpath(*_split(change.path))) is None

    def check(self, todo: list[FileChange]) -> None:
        self.todo = todo
        self.new_dirs = {c.path for c in todo if c.kind == "added" and c.type == "dir"}
        self.deleting = {c.path for c in todo if c.kind == "deleted"}
        conflicts = list(self.conflicts)
        for change in todo:
            missing_parent = self._check_parents(_split(change.path))
            if missing_parent is not None:
                conflicts.append(
                    (change.path, f"parent directory {missing_parent!r} was removed on the host")
                )
            elif (why := self.target_conflict(change)) is not None:
                conflicts.append((change.path, why))
        if conflicts and not self.force:
            listing = "; ".join(f"{p} ({why})" for p, why in sorted(set(conflicts)))
            raise WorkspaceConflictError(
                f"{len(conflicts)} path(s) changed on the host since the sandbox started: "
                f"{listing}. Review them and apply with force=True to overwrite, or leave "
                "them out with paths=...",
                paths=sorted({p for p, _ in conflicts}),
            )
        for path, why in conflicts:
            logger.warning("applying over a host-side change at %s (%s)", path, why)

    def _check_parents(self, parts: tuple[str, ...]) -> str | None:
        """Refuse symlinked or non-directory parents; return a removed parent, if any."""
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            planned = prefix in self.new_dirs
            st = _lstat_or_none(self.lower.joinpath(*parts[:i]))
            if st is None:
                return None if planned else prefix
            if planned and prefix in self.deleting:
                return None  # replaced by a directory in this apply, through O_NOFOLLOW fds
            if stat.S_ISLNK(st.st_mode):
                raise WorkspaceError(
                    f"refusing to apply {'/'.join(parts)!r}: its parent {prefix!r} is a "
                    "symlink on the host, writing through it could leave the project"
                )
            if not stat.S_ISDIR(st.st_mode):
                raise WorkspaceError(
                    f"refusing to apply {'/'.join(parts)!r}: its parent {prefix!r} is not a "
                    "directory on the host"
                )
        return None

    # -- execution -----------------------------------------------------------------------
    def execute(self) -> ApplyResult:
        deletions = sorted(
            (c for c in self.todo if c.kind == "deleted"), key=_order_key, reverse=True
        )
        writes = sorted((c for c in self.todo if c.kind != "deleted"), key=_order_key)
        current = ""
        try:
            for change in deletions:
                current = change.path
                self._delete(change)
            for change in writes:
                current = change.path
                self._write(change)
            for path in sorted(self.dir_modes, key=lambda p: p.split("/"), reverse=True):
                current = path
                self._set_dir_mode(path, self.dir_modes[path])
            current = ""
            self._sync_dirs()
        except OSError as exc:
            done = ", ".join(self.applied) or "nothing"
            raise WorkspaceError(
                f"apply failed at {current!r}: {exc}; already applied: {done}"
            ) from exc
        finally:
            self._record_own_writes()
        return ApplyResult(applied=sorted(set(self.applied)), skipped=list(self.skipped))

    def _parent_fd(self, change: FileChange) -> int | None:
        parts = _split(change.path)
        try:
            return open_dir_beneath(self.lower, parts[:-1])
        except FileNotFoundError:
            self.skipped.append((change.path, "parent directory is missing on the host"))
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise WorkspaceError(
                    f"refusing to apply {change.path!r}: a parent directory became a symlink "
                    "or a file on the host during the apply"
                ) from exc
            raise

    def _delete(self, change: FileChange) -> None:
        parent_fd = self._parent_fd(change)
        if parent_fd is None:
            return
        name = change.path.rsplit("/", 1)[-1]
        try:
            st = _lstat_at(parent_fd, name)
            if st is None:
                self.skipped.append((change.path, "already absent on the host"))
                return
            if _type_of(st) != change.type:
                self.skipped.append(
                    (change.path, f"the host has a {_type_of(st)} here, not a {change.type}")
                )
                return
            if change.type == "dir":
                try:
                    os.rmdir(name, dir_fd=parent_fd)
                except OSError as exc:
                    if exc.errno != errno.ENOTEMPTY:
                        raise
                    self.skipped.append(
                        (change.path, "directory holds host entries that are not in the diff")
                    )
                    return
            else:
                os.unlink(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        self._done(change.path)

    def _write(self, change: FileChange) -> None:
        parent_fd = self._parent_fd(change)
        if parent_fd is None:
            return
        name = change.path.rsplit("/", 1)[-1]
        try:
            existing = _lstat_at(parent_fd, name)
            if change.type == "dir":
                if change.kind == "added" and existing is None:
                    os.mkdir(name, _NEW_DIR_MODE, dir_fd=parent_fd)
                    owner = self._owner(parent_fd, None)
                    if owner is not None:
                        os.chown(name, *owner, dir_fd=parent_fd, follow_symlinks=False)
                elif existing is None or not stat.S_ISDIR(existing.st_mode):
                    self.skipped.append((change.path, "not a directory on the host"))
                    return
                self.dir_modes[change.path] = change.new_mode or 0
            else:
                if existing is not None and stat.S_ISDIR(existing.st_mode):
                    self.skipped.append((change.path, "a directory is in the way on the host"))
                    return
                owner = self._owner(parent_fd, existing)
                if change.type == "symlink":
                    reason = self._write_symlink(parent_fd, name, change, owner)
                else:
                    reason = self._write_file(parent_fd, name, change, owner)
                if reason is not None:
                    self.skipped.append((change.path, reason))
                    return
        finally:
            os.close(parent_fd)
        self._done(change.path)

    def _write_file(
        self, parent_fd: int, name: str, change: FileChange, owner: tuple[int, int] | None
    ) -> str | None:
        try:
            src = open_file_beneath(self.layers.upper, _split(change.path), owned=True)
        except OSError:
            return "changed in the sandbox while applying"
        tmp = _temp_name()
        try:
            dst = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent_fd,
            )
            try:
                digest = hashlib.sha256()
                while chunk := os.read(src, _CHUNK):
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view) :]
                if owner is not None:
                    os.fchown(dst, *owner)
                os.fchmod(dst, change.new_mode or 0)
                os.fsync(dst)
            finally:
                os.close(dst)
            if digest.hexdigest() != change.new_sha256:
                os.unlink(tmp, dir_fd=parent_fd)
                return "changed in the sandbox while applying"
            os.replace(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent_fd)
            raise
        finally:
            os.close(src)
        return None

    def _write_symlink(
        self, parent_fd: int, name: str, change: FileChange, owner: tuple[int, int] | None
    ) -> str | None:
        parts = _split(change.path)
        try:
            restore: ModeRestore = []
            try:
                upper_fd = open_dir_beneath(self.layers.upper, parts[:-1], restore=restore)
                try:
                    target = os.readlink(parts[-1], dir_fd=upper_fd)
                finally:
                    os.close(upper_fd)
            finally:
                restore_modes(restore)
        except OSError:
            return "changed in the sandbox while applying"
        if target != change.new_target:
            return "changed in the sandbox while applying"
        tmp = _temp_name()
        try:
            os.symlink(target, tmp, dir_fd=parent_fd)
            if owner is not None:
                os.chown(tmp, *owner, dir_fd=parent_fd, follow_symlinks=False)
            os.replace(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent_fd)
            raise
        return None

    def _set_dir_mode(self, path: str, mode: int) -> None:
        fd = open_dir_beneath(self.lower, _split(path))
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def _owner(self, parent_fd: int, existing: os.stat_result | None) -> tuple[int, int] | None:
        """As root, keep a replaced entry's owner, or give a new one its directory's owner,
        so an apply run by root leaves the project owned by its user."""
        if not self.is_root:
            return None
        st = existing if existing is not None else os.fstat(parent_fd)
        return st.st_uid, st.st_gid

    def _done(self, path: str) -> None:
        self.applied.append(path)
        self.touched.add(path)
        parent = path.rpartition("/")[0]
        if parent:
            self.touched.add(parent)

    def _sync_dirs(self) -> None:
        parents = {p.rpartition("/")[0] for p in self.applied}
        for parent in sorted(parents):
            try:
                fd = open_dir_beneath(self.lower, tuple(parent.split("/")) if parent else ())
            except FileNotFoundError:
                continue  # removed by this apply
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _record_own_writes(self) -> None:
        """Remember the ctimes apply gave to host paths, so a later apply does not take
        its own earlier writes for host-side edits."""
        if not self.touched:
            return
        record = self.layers.load_applied()
        for path in self.touched:
            st = _lstat_or_none(self.lower.joinpath(*path.split("/")))
            if st is None:
                record.pop(path, None)
            else:
                record[path] = st.st_ctime_ns
        self.layers.save_applied(record)


def _temp_name() -> str:
    return f".stockade-apply-{secrets.token_hex(8)}.tmp"


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _type_of(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "special file"
