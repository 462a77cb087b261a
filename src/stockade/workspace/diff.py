"""What the sandbox changed: the overlayfs upper layer classified against the baseline.

The baseline (``baseline.py``) is a git tree of the project as the sandbox first saw it.
Only entries present in the upper layer (written, copied up, whited out) can be changes;
each is compared with the baseline's entry at its path, never with the live host, so host
edits made meanwhile are not the sandbox's changes (conflicts are apply's business).

Overlayfs rules (measured on this machine; see notes/lab-containers.md section 8):

- a character device 0/0 in upper is a whiteout: the entry below is deleted;
- a directory with ``user.overlay.opaque=y`` (or ``trusted.``) hides everything below it:
  baseline entries not present again in upper are deleted;
- layouts this code does not understand (``redirect`` or ``metacopy`` xattrs, produced only
  with mount options stockade never uses) raise WorkspaceError instead of being misread.

git's model, since the result is a git patch:

- files are compared by blob id and git mode (0o644 / 0o755: only the owner's execute bit
  counts), so copy-up, touch and chmod that git would not see are no change;
- any path component named ``.git`` is never a change (the agent's commits come back as a
  branch, see ``gitrepo.py``); nested repositories of the baseline (gitlinks) are listed in
  ``ignored``;
- paths ignored by the sandbox's view of the ignore rules (``.gitignore`` files of upper
  over lower's, the host's ``info/exclude`` and global excludes as recorded with the
  baseline) are left out unless ``include_ignored``, and counted in ``ignored_paths``; a path
  in the baseline is never ignored (git's tracked files). Ignored paths, which the baseline
  does not hold, are compared with the live host when included.
- directories are not in a git patch: an added or deleted directory is still a change
  (``type="dir"``, so apply can make or remove it; empty new ones are ``empty_dirs``),
  directory permission changes are not tracked.
- sockets, fifos and device nodes written by the sandbox are listed in ``ignored``.

``WorkspaceDiff.patch()`` is produced by git: the changed files are fed to ``git
fast-import`` from our own fd-based reads of the upper layer (git never opens a path in it),
giving a commit of the sandbox's view on top of the baseline commit, and ``git diff-tree -p
--binary -M --full-index`` turns the pair into a patch ``git apply`` accepts.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from stockade._errors import WorkspaceError
from stockade.workspace.baseline import (
    BaselineEntry,
    WorkspaceBaseline,
    git_blob_id,
    git_env,
    read_small_fd,
    read_small_file,
    run_git,
)
from stockade.workspace.gitignore import IgnoreFile, is_ignored, parse_ignore
from stockade.workspace.gitrepo import AgentCommit, describe_commits
from stockade.workspace.layers import (
    ModeRestore,
    WorkspaceLayers,
    open_at,
    open_dir_beneath,
    open_file_beneath,
    restore_modes,
)

__all__ = [
    "TEXT_PATCH_LIMIT",
    "ChangeKind",
    "EntryType",
    "FileChange",
    "WorkspaceDiff",
    "compute_diff",
    "is_protected",
    "normalize_protected",
]

ChangeKind = Literal["added", "modified", "deleted"]
EntryType = Literal["file", "dir", "symlink"]

#: Kept for callers that size text previews; git decides what is binary in the patch.
TEXT_PATCH_LIMIT = 1024 * 1024
_SNIFF_BYTES = 8000  # like git: a NUL byte in the first 8000 bytes means binary
_CHUNK = 1024 * 1024
_PERM_MASK = 0o777
_OVERLAY_XATTR_PREFIXES = ("user.overlay.", "trusted.overlay.")
_KIND_ORDER = {"deleted": 0, "modified": 1, "added": 2}


@dataclass(frozen=True)
class FileChange:
    """One changed path of the workspace. ``path`` is posix and relative to the root.

    Files carry git's modes (0o644 / 0o755); ``old_*`` is the baseline's side, ``new_*``
    the sandbox's. ``old_oid`` / ``new_oid`` are git blob ids (None for dirs or absent).
    """

    path: str
    kind: ChangeKind
    type: EntryType
    old_mode: int | None = None
    new_mode: int | None = None
    old_sha256: str | None = None
    new_sha256: str | None = None
    old_target: str | None = None
    new_target: str | None = None
    size: int = 0
    binary: bool = False
    protected: bool = False
    old_size: int = 0
    old_oid: str | None = None
    new_oid: str | None = None
    ignored: bool = False  # included only because include_ignored=True
    # Where to read contents from when a patch is asked for; not part of the change itself.
    lower_root: Path | None = field(default=None, repr=False, compare=False)
    upper_root: Path | None = field(default=None, repr=False, compare=False)
    _source: _PatchSource | None = field(default=None, repr=False, compare=False)

    @property
    def mode_changed(self) -> bool:
        return self.kind == "modified" and self.old_mode != self.new_mode

    @property
    def content_changed(self) -> bool:
        return self.kind == "modified" and (
            self.old_sha256 != self.new_sha256 or self.old_target != self.new_target
        )

    def same_change(self, other: FileChange) -> bool:
        """Equal as a change, whatever protected list either side was computed with."""
        return _signature(self) == _signature(other)

    def to_dict(self, *, include_patch: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind,
            "type": self.type,
            "old_mode": _fmt_mode(self.old_mode),
            "new_mode": _fmt_mode(self.new_mode),
            "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256,
            "old_oid": self.old_oid,
            "new_oid": self.new_oid,
            "old_target": self.old_target,
            "new_target": self.new_target,
            "size": self.size,
            "old_size": self.old_size,
            "binary": self.binary,
            "protected": self.protected,
            "ignored": self.ignored,
        }
        if include_patch:
            data["patch"] = self.patch()
        return data

    def patch(self) -> str:
        """git's patch for this path alone, without rename pairing ("" for directories)."""
        if self.type == "dir" or self._source is None:
            return ""
        return _decode(self._source.patches_by_path().get(self.path, b""))


@dataclass(frozen=True)
class WorkspaceDiff:
    """Every change of a workspace, sorted by path (a deletion before an addition).

    ``ignored`` lists entries that cannot be carried (special files, nested repositories)
    with the reason; ``ignored_paths`` the paths left out by the ignore rules (a directory
    counts once); ``commits`` the commits the agent made inside, oldest first.
    """

    changes: list[FileChange]
    ignored: list[tuple[str, str]] = field(default_factory=list)
    ignored_paths: list[str] = field(default_factory=list)
    commits: list[AgentCommit] = field(default_factory=list)
    _source: _PatchSource | None = field(default=None, repr=False, compare=False)

    @property
    def added(self) -> list[FileChange]:
        return [c for c in self.changes if c.kind == "added"]

    @property
    def modified(self) -> list[FileChange]:
        return [c for c in self.changes if c.kind == "modified"]

    @property
    def deleted(self) -> list[FileChange]:
        return [c for c in self.changes if c.kind == "deleted"]

    @property
    def paths(self) -> list[str]:
        return sorted({c.path for c in self.changes})

    @property
    def empty_dirs(self) -> list[str]:
        """New directories with nothing in them: a git patch cannot carry these."""
        added = [c.path for c in self.changes if c.kind == "added"]
        dirs = [c.path for c in self.changes if c.kind == "added" and c.type == "dir"]
        return [d for d in dirs if not any(p.startswith(d + "/") for p in added)]

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[FileChange]:
        return iter(self.changes)

    def patch_bytes(self) -> bytes:
        """The whole diff as a git patch (bytes: file contents need not be UTF-8)."""
        if self._source is None or not any(c.type != "dir" for c in self.changes):
            return b""
        return self._source.patch([c.path for c in self.changes if c.type != "dir"])

    def patch(self) -> str:
        """``patch_bytes()`` as str (undecodable bytes kept as surrogate escapes)."""
        return _decode(self.patch_bytes())

    def summary(self) -> str:
        parts: list[str] = []
        if self.changes:
            parts.append(
                f"{len(self.added)} added, {len(self.modified)} modified, "
                f"{len(self.deleted)} deleted"
            )
        else:
            parts.append("no changes")
        if self.ignored_paths:
            parts.append(f"{len(self.ignored_paths)} ignored path(s) left out")
        if self.commits:
            parts.append(f"{len(self.commits)} commit(s)")
        return "; ".join(parts)

    def to_dict(self, *, include_patch: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "summary": {
                "added": len(self.added),
                "modified": len(self.modified),
                "deleted": len(self.deleted),
                "ignored_paths": len(self.ignored_paths),
                "commits": len(self.commits),
            },
            "changes": [c.to_dict(include_patch=include_patch) for c in self.changes],
            "ignored": [{"path": p, "reason": r} for p, r in self.ignored],
            "ignored_paths": list(self.ignored_paths),
            "empty_dirs": self.empty_dirs,
            "commits": [{"sha": c.sha, "subject": c.subject} for c in self.commits],
        }
        if include_patch:
            data["patch"] = self.patch()
        return data


@overload
def compute_diff(
    layers: WorkspaceLayers,
    /,
    *,
    protected: Iterable[str] = (),
    paths: Iterable[str] | None = None,
    include_ignored: bool = False,
) -> WorkspaceDiff: ...


@overload
def compute_diff(
    lower: str | os.PathLike[str],
    upper: str | os.PathLike[str],
    /,
    *,
    protected: Iterable[str] = (),
    paths: Iterable[str] | None = None,
    include_ignored: bool = False,
) -> WorkspaceDiff: ...


def compute_diff(
    layers: WorkspaceLayers | str | os.PathLike[str],
    upper: str | os.PathLike[str] | None = None,
    /,
    *,
    protected: Iterable[str] = (),
    paths: Iterable[str] | None = None,
    include_ignored: bool = False,
) -> WorkspaceDiff:
    """Classify the upper layer against the baseline; see the module docstring for rules.

    Call it as ``compute_diff(layers)``, or ``compute_diff(lower, upper)`` to diff against
    ``lower`` as it is now (a baseline is recorded on the spot, in a temporary directory).
    ``protected`` entries mark a change (and everything under it) as protected; ``paths``
    keeps only changes at or below those paths.
    """
    keep: tempfile.TemporaryDirectory[str] | None = None
    if isinstance(layers, WorkspaceLayers):
        lower_root, upper_root = layers.lower, layers.upper
        baseline = layers.baseline
    else:
        if upper is None:
            raise TypeError("compute_diff(lower, upper) needs both directories")
        lower_root, upper_root = Path(layers).resolve(), Path(upper)
        keep = tempfile.TemporaryDirectory(prefix="stockade-baseline-")
        baseline = WorkspaceBaseline.record(Path(keep.name), lower_root)
    source = _PatchSource(baseline, lower_root, upper_root, keep)
    selected = None if paths is None else normalize_protected(paths)
    if paths is not None and any(not normalize_protected([p]) for p in paths):
        selected = None  # the project root itself was named
    walker = _DiffWalker(
        lower_root,
        upper_root,
        baseline,
        normalize_protected(protected),
        selected,
        include_ignored=include_ignored,
        source=source,
    )
    try:
        root_fd = open_dir_beneath(upper_root, ())
    except OSError as exc:
        raise WorkspaceError(
            f"cannot read the upper layer {str(upper_root)!r}: {exc.strerror}"
        ) from exc
    try:
        walker.walk(
            root_fd, (), lower_root, opaque=False, stack=walker.root_stack(), inherited=False
        )
        changes = walker.finish()
    except OSError as exc:
        raise WorkspaceError(f"cannot compute the workspace diff: {exc}") from exc
    finally:
        os.close(root_fd)
    changes.sort(key=lambda c: (c.path.split("/"), _KIND_ORDER[c.kind]))
    source.changes = changes
    walker.ignored.sort()
    commits: list[AgentCommit] = []
    if isinstance(layers, WorkspaceLayers):
        try:
            commits = describe_commits(layers)
        except (WorkspaceError, OSError) as exc:
            walker.ignored.append((".git", f"the sandbox's commits could not be read: {exc}"))
    return WorkspaceDiff(
        changes=changes,
        ignored=walker.ignored,
        ignored_paths=sorted(walker.ignored_paths),
        commits=commits,
        _source=source,
    )


def normalize_protected(entries: Iterable[str]) -> frozenset[str]:
    """Entries as workspace-relative posix paths (``./x/`` -> ``x``)."""
    out: set[str] = set()
    for entry in entries:
        parts = [p for p in entry.replace("\\", "/").split("/") if p not in ("", ".")]
        if parts:
            out.add("/".join(parts))
    return frozenset(out)


def is_protected(path: str, protected: frozenset[str]) -> bool:
    """True when ``path`` or any of its parent directories is a protected entry."""
    if not protected:
        return False
    parts = path.split("/")
    return any("/".join(parts[:i]) in protected for i in range(1, len(parts) + 1))


@dataclass(frozen=True)
class _Side:
    type: EntryType
    mode: int | None
    sha256: str | None = None
    target: str | None = None
    size: int = 0
    binary: bool = False
    oid: str | None = None


@dataclass
class _Pending:
    rel: str
    kind: ChangeKind
    type: EntryType
    old: _Side | BaselineEntry | None
    new: _Side | None
    ignored: bool = False


class _DiffWalker:
    def __init__(
        self,
        lower: Path,
        upper: Path,
        baseline: WorkspaceBaseline,
        protected: frozenset[str],
        selected: frozenset[str] | None,
        *,
        include_ignored: bool,
        source: _PatchSource,
    ) -> None:
        self.lower = lower
        self.upper = upper
        self.baseline = baseline
        self.protected = protected
        self.selected = selected
        self.include_ignored = include_ignored
        self.source = source
        self.pending: list[_Pending] = []
        self.ignored: list[tuple[str, str]] = []
        self.ignored_paths: set[str] = set()
        self.gitlinks = baseline.gitlinks

    # -- selection and ignore rules -------------------------------------------------------

    def root_stack(self) -> tuple[IgnoreFile, ...]:
        stack: list[IgnoreFile] = []
        data = read_small_file(self.baseline.git_dir / "info" / "exclude")
        if data:
            stack.append(parse_ignore(data))
        return tuple(stack)

    def wanted(self, path: str, *, is_dir: bool) -> bool:
        """Inside the ``paths`` selection (a directory: or holding part of it)."""
        if self.selected is None:
            return True
        if is_protected(path, self.selected):
            return True
        return is_dir and any(s.startswith(path + "/") for s in self.selected)

    def selected_change(self, path: str) -> bool:
        return self.selected is None or is_protected(path, self.selected)

    def check_ignored(
        self, path: str, is_dir: bool, stack: tuple[IgnoreFile, ...], inherited: bool
    ) -> tuple[bool, bool]:
        """(left out, matched): ``matched`` by the rules (or inside a matched directory,
        which git never enters for untracked files); left out only when also not in the
        baseline (tracked paths are never ignored)."""
        matched = inherited or is_ignored(path, is_dir, stack)
        if not matched:
            return False, False
        tracked = self.baseline.entry(path) is not None or (is_dir and self.baseline.is_dir(path))
        return not tracked, True

    def dir_stack(
        self,
        dir_fd: int,
        rel: tuple[str, ...],
        lower_dir: Path | None,
        opaque: bool,
        stack: tuple[IgnoreFile, ...],
    ) -> tuple[IgnoreFile, ...]:
        """``stack`` plus this directory's .gitignore as the sandbox sees it."""
        data: bytes | None = None
        try:
            st = os.stat(".gitignore", dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISREG(st.st_mode):
                data = _read_at(dir_fd, ".gitignore")
        elif not opaque and lower_dir is not None:
            data = read_small_file(lower_dir / ".gitignore")
        if not data:
            return stack
        return (*stack, parse_ignore(data, "/".join(rel)))

    # -- the walk -------------------------------------------------------------------------

    def walk(
        self,
        dir_fd: int,
        rel: tuple[str, ...],
        lower_dir: Path | None,
        *,
        opaque: bool,
        stack: tuple[IgnoreFile, ...],
        inherited: bool,
    ) -> None:
        """Walk one upper directory. ``lower_dir`` is its lower counterpart (a real directory)
        or None; ``opaque`` means entries below that upper does not hold are deleted;
        ``inherited`` means this directory is ignored (so is everything in it)."""
        stack = self.dir_stack(dir_fd, rel, lower_dir, opaque, stack)
        seen: set[str] = set()
        for name in sorted(os.listdir(dir_fd)):
            child = (*rel, name)
            path = "/".join(child)
            if name == ".git":
                seen.add(name)
                continue
            if _is_dotgit_alias(name):
                seen.add(name)
                if self.wanted(path, is_dir=True):
                    self.ignored.append((path, "a name git takes for .git: never carried"))
                continue
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not self.wanted(path, is_dir=is_dir or stat.S_ISCHR(st.st_mode)):
                seen.add(name)
                continue
            if path in self.gitlinks:
                seen.add(name)
                self.ignored.append((path, "nested git repository (submodule): not diffed"))
                continue
            lower_path = None if lower_dir is None else lower_dir / name
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                if not opaque:
                    self.deleted(path, lower_path, stack, inherited)
                continue  # in an opaque dir the entry below is reported by the sweep
            seen.add(name)
            ignored, matched = self.check_ignored(path, is_dir, stack, inherited)
            if ignored and not self.include_ignored:
                self.ignored_paths.add(path)
                continue
            if is_dir:
                self.visit_dir(dir_fd, name, child, lower_path, opaque, stack, ignored, matched)
            elif stat.S_ISREG(st.st_mode):
                new = self.read_upper_file(dir_fd, name, path)
                self.compare(path, new, lower_path, ignored)
            elif stat.S_ISLNK(st.st_mode) and name.lower() == ".gitmodules":
                self.ignored.append((path, "a symlinked .gitmodules: git refuses to carry it"))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dir_fd)
                raw = os.fsencode(target)
                new = _Side("symlink", None, target=target, size=len(raw), oid=git_blob_id(raw))
                self.compare(path, new, lower_path, ignored)
            else:
                self.ignored.append((path, f"unsupported file type {_type_name(st)}"))
                self.deleted(path, lower_path, stack, inherited)
        if opaque:
            self.sweep_opaque(rel, lower_dir, seen, stack, inherited)

    def sweep_opaque(
        self,
        rel: tuple[str, ...],
        lower_dir: Path | None,
        seen: set[str],
        stack: tuple[IgnoreFile, ...],
        inherited: bool,
    ) -> None:
        """Everything of the baseline (and, for ignored paths, of lower) that an opaque
        directory hides and upper does not hold again is deleted."""
        prefix = "/".join(rel)
        names: set[str] = set()
        cut = len(prefix) + 1 if prefix else 0
        for path in self.baseline.entries_under(prefix):
            names.add(path[cut:].split("/", 1)[0])
        for gitlink in self.gitlinks:
            if not prefix or gitlink.startswith(prefix + "/"):
                names.discard(gitlink[cut:].split("/", 1)[0])
        if self.include_ignored and lower_dir is not None:
            names.update(_listdir(lower_dir))
        for name in sorted(names - seen):
            if name == ".git":
                continue
            path = f"{prefix}/{name}" if prefix else name
            if self.wanted(path, is_dir=True):
                lower_path = None if lower_dir is None else lower_dir / name
                self.deleted(path, lower_path, stack, inherited)

    def visit_dir(
        self,
        parent_fd: int,
        name: str,
        rel: tuple[str, ...],
        lower_path: Path | None,
        opaque: bool,
        stack: tuple[IgnoreFile, ...],
        ignored: bool,
        matched: bool,
    ) -> None:
        path = "/".join(rel)
        # A directory the sandbox made inaccessible stays readable until its walk is done.
        restore: ModeRestore = []
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = open_at(parent_fd, name, flags, restore)
        try:
            mode = restore[0][1] if restore else stat.S_IMODE(os.fstat(fd).st_mode)
            is_opaque = _overlay_flags(fd, path, is_dir=True)
            lower_st = _lstat(lower_path)
            lower_is_dir = lower_st is not None and stat.S_ISDIR(lower_st.st_mode)
            old = self.baseline.entry(path)
            if old is not None:  # a file or symlink of the baseline became a directory
                self.add_pending(path, "deleted", old.kind, old, None)
            elif ignored and lower_st is not None and not lower_is_dir and lower_path:
                self.deleted_lower(path, lower_path, lower_st)
            if self.baseline.is_dir(path) or (old is None and lower_is_dir):
                self.walk(
                    fd,
                    rel,
                    lower_path if lower_is_dir else None,
                    opaque=opaque or is_opaque,
                    stack=stack,
                    inherited=matched,
                )
                return
            if self.selected_change(path):
                self.pending.append(
                    _Pending(path, "added", "dir", None, _Side("dir", mode & _PERM_MASK), ignored)
                )
            self.walk(fd, rel, None, opaque=True, stack=stack, inherited=matched)
        finally:
            os.close(fd)
            restore_modes(restore)

    def compare(self, path: str, new: _Side, lower_path: Path | None, ignored: bool) -> None:
        if ignored:
            self.compare_lower(path, new, lower_path)
            return
        old = self.baseline.entry(path)
        if old is None:
            if self.baseline.is_dir(path):
                self.deleted(path, None, (), False)
            self.add_pending(path, "added", new.type, None, new)
            return
        if old.kind != new.type:
            self.add_pending(path, "deleted", old.kind, old, None)
            self.add_pending(path, "added", new.type, None, new)
        elif (old.mode, old.oid) != (new.mode or 0, new.oid):
            self.add_pending(path, "modified", new.type, old, new)

    def compare_lower(self, path: str, new: _Side, lower_path: Path | None) -> None:
        """An ignored path (not in the baseline), included: compare with the live host."""
        lower_st = _lstat(lower_path)
        if lower_path is None or lower_st is None:
            self.add_pending(path, "added", new.type, None, new, ignored=True)
            return
        old = _lower_side(lower_path, lower_st)
        if old is None or old.type != new.type:
            if stat.S_ISDIR(lower_st.st_mode):
                self.deleted_lower(path, lower_path, lower_st)
            elif old is not None:
                self.add_pending(path, "deleted", old.type, old, None, ignored=True)
            self.add_pending(path, "added", new.type, None, new, ignored=True)
        elif (old.mode, old.oid) != (new.mode, new.oid):
            self.add_pending(path, "modified", new.type, old, new, ignored=True)

    def deleted(
        self,
        path: str,
        lower_path: Path | None,
        stack: tuple[IgnoreFile, ...],
        inherited: bool,
    ) -> None:
        """``path`` is gone from the sandbox's view: delete what the baseline had there."""
        old = self.baseline.entry(path)
        if old is not None:
            self.add_pending(path, "deleted", old.kind, old, None)
        elif self.baseline.is_dir(path):
            lower_st = _lstat(lower_path)
            mode = (
                stat.S_IMODE(lower_st.st_mode) & _PERM_MASK
                if lower_st is not None and stat.S_ISDIR(lower_st.st_mode)
                else None
            )
            self.add_pending(path, "deleted", "dir", None, None, dir_mode=mode)
            for sub in sorted(self._subdirs(path)):
                self.add_pending(sub, "deleted", "dir", None, None, dir_mode=None)
            for sub, entry in self.baseline.entries_under(path).items():
                if not any(sub == g or sub.startswith(g + "/") for g in self.gitlinks):
                    self.add_pending(sub, "deleted", entry.kind, entry, None)
            if self.include_ignored and lower_path is not None:
                self.deleted_lower_extras(path, lower_path)
        elif lower_path is not None:
            lower_st = _lstat(lower_path)
            if lower_st is None:
                return
            is_dir = stat.S_ISDIR(lower_st.st_mode)
            if not (inherited or is_ignored(path, is_dir, stack)):
                return  # created on the host after the baseline: not the sandbox's change
            if self.include_ignored:
                self.deleted_lower(path, lower_path, lower_st)
            else:
                self.ignored_paths.add(path)

    def _subdirs(self, path: str) -> set[str]:
        out: set[str] = set()
        for sub in self.baseline.entries_under(path):
            parts = sub.split("/")
            for i in range(len(path.split("/")) + 1, len(parts)):
                out.add("/".join(parts[:i]))
        return out

    def deleted_lower(self, path: str, lower_path: Path, lower_st: os.stat_result) -> None:
        """An ignored host entry (file or whole tree) the sandbox deleted."""
        if stat.S_ISDIR(lower_st.st_mode):
            mode = stat.S_IMODE(lower_st.st_mode) & _PERM_MASK
            self.add_pending(path, "deleted", "dir", None, None, dir_mode=mode, ignored=True)
            for name in sorted(_listdir(lower_path)):
                child = lower_path / name
                child_st = _lstat(child)
                if child_st is not None and name != ".git":
                    self.deleted_lower(f"{path}/{name}", child, child_st)
            return
        old = _lower_side(lower_path, lower_st)
        if old is None:
            self.ignored.append((path, f"unsupported file type {_type_name(lower_st)}"))
            return
        self.add_pending(path, "deleted", old.type, old, None, ignored=True)

    def deleted_lower_extras(self, path: str, lower_path: Path) -> None:
        """Host entries under a deleted baseline directory that the baseline lacks."""
        lower_st = _lstat(lower_path)
        if lower_st is None or not stat.S_ISDIR(lower_st.st_mode):
            return
        for name in sorted(_listdir(lower_path)):
            sub = f"{path}/{name}"
            if name == ".git":
                continue
            child = lower_path / name
            child_st = _lstat(child)
            if child_st is None:
                continue
            if self.baseline.entry(sub) is not None:
                continue
            if self.baseline.is_dir(sub):
                self.deleted_lower_extras(sub, child)
            else:
                self.deleted_lower(sub, child, child_st)

    def read_upper_file(self, dir_fd: int, name: str, rel: str) -> _Side:
        restore: ModeRestore = []
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = open_at(dir_fd, name, flags, restore)
        finally:
            restore_modes(restore)  # an open fd keeps reading whatever the mode
        try:
            _overlay_flags(fd, rel, is_dir=False)
            return _hash_file(fd)
        finally:
            os.close(fd)

    def add_pending(
        self,
        path: str,
        kind: ChangeKind,
        type_: EntryType,
        old: _Side | BaselineEntry | None,
        new: _Side | None,
        *,
        dir_mode: int | None = None,
        ignored: bool = False,
    ) -> None:
        if not self.selected_change(path):
            return
        if type_ == "dir" and old is None and kind == "deleted":
            old = _Side("dir", dir_mode)
        self.pending.append(_Pending(path, kind, type_, old, new, ignored))

    def finish(self) -> list[FileChange]:
        """Resolve the baseline sides (contents read from git in one batch)."""
        oids = {p.old.oid for p in self.pending if isinstance(p.old, BaselineEntry)}
        sides = _baseline_sides(self.baseline, oids)
        changes: list[FileChange] = []
        seen: set[tuple[str, str]] = set()
        for item in self.pending:
            key = (item.rel, item.kind)
            if key in seen:
                continue
            seen.add(key)
            old: _Side | None
            if isinstance(item.old, BaselineEntry):
                content = sides[item.old.oid]
                if item.old.kind == "symlink":
                    old = _Side(
                        "symlink",
                        None,
                        target=os.fsdecode(content.raw),
                        size=content.size,
                        oid=item.old.oid,
                    )
                else:
                    old = _Side(
                        "file",
                        item.old.mode,
                        sha256=content.sha256,
                        size=content.size,
                        binary=content.binary,
                        oid=item.old.oid,
                    )
            else:
                old = item.old
            changes.append(self.make(item, old))
        return changes

    def make(self, item: _Pending, old: _Side | None) -> FileChange:
        new = item.new
        shown = new if new is not None else old
        return FileChange(
            path=item.rel,
            kind=item.kind,
            type=item.type,
            old_mode=None if old is None else old.mode,
            new_mode=None if new is None else new.mode,
            old_sha256=None if old is None else old.sha256,
            new_sha256=None if new is None else new.sha256,
            old_target=None if old is None else old.target,
            new_target=None if new is None else new.target,
            size=0 if shown is None else shown.size,
            old_size=0 if old is None else old.size,
            binary=(old is not None and old.binary) or (new is not None and new.binary),
            protected=is_protected(item.rel, self.protected),
            old_oid=None if old is None else old.oid,
            new_oid=None if new is None else new.oid,
            ignored=item.ignored,
            lower_root=self.lower,
            upper_root=self.upper,
            _source=self.source,
        )


@dataclass(frozen=True)
class _Content:
    sha256: str
    size: int
    binary: bool
    raw: bytes  # kept only for symlinks (targets are small)


def _baseline_sides(baseline: WorkspaceBaseline, oids: set[str]) -> dict[str, _Content]:
    """sha256, size and binary flag of baseline blobs, read with one ``cat-file --batch``."""
    out: dict[str, _Content] = {}
    if not oids:
        return out
    env = git_env(baseline.git_dir)
    proc = subprocess.Popen(
        ["git", "cat-file", "--batch"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for oid in sorted(oids):
            proc.stdin.write(oid.encode("ascii") + b"\n")
            proc.stdin.flush()
            header = proc.stdout.readline().split()
            if len(header) != 3 or header[1] != b"blob":
                raise WorkspaceError(
                    f"the workspace baseline lacks blob {oid} (its git objects were removed, "
                    "e.g. by a gc of the host repository); reset the workspace to record a "
                    "new baseline"
                )
            size = int(header[2])
            digest = hashlib.sha256()
            remaining = size
            first = b""
            while remaining:
                chunk = proc.stdout.read(min(remaining, _CHUNK))
                if not chunk:
                    raise WorkspaceError("git cat-file ended early")
                if not first:
                    first = chunk[:_SNIFF_BYTES]
                digest.update(chunk)
                remaining -= len(chunk)
            proc.stdout.read(1)  # the LF after the contents
            out[oid] = _Content(digest.hexdigest(), size, _looks_binary(first, size), first[:4096])
    finally:
        proc.stdin.close()
        proc.stdout.close()
        proc.wait()
    return out


class _PatchSource:
    """Builds the sandbox's commit (fast-import, from our own reads) and runs diff-tree."""

    def __init__(
        self,
        baseline: WorkspaceBaseline,
        lower: Path,
        upper: Path,
        keep: tempfile.TemporaryDirectory[str] | None,
    ) -> None:
        self.baseline = baseline
        self.lower = lower
        self.upper = upper
        self.keep = keep  # a temporary baseline lives as long as its diff
        self.changes: list[FileChange] = []
        self._commits: tuple[str, str] | None = None
        self._by_path: dict[str, bytes] | None = None
        self._lock = threading.Lock()

    def patch(self, paths: list[str], *, rename: bool = True) -> bytes:
        base, commit = self.commits()
        args = [
            "diff-tree",
            "-r",
            "-p",
            "--binary",
            "--full-index",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            *(["-M"] if rename else []),
            base,
            commit,
            "--",
            *(f":(literal){p}" for p in paths),
        ]
        env = git_env(self.baseline.git_dir, config={"core.quotePath": "true"})
        return run_git(args, env).stdout

    def patches_by_path(self) -> dict[str, bytes]:
        """Each changed path's own patch, from one diff-tree run (no rename pairing)."""
        with self._lock:
            cached = self._by_path
        if cached is not None:
            return cached
        paths = sorted({c.path for c in self.changes if c.type != "dir"})
        headers = {
            b"diff --git " + _git_quote("a/" + p) + b" " + _git_quote("b/" + p) + b"\n": p
            for p in paths
        }
        out: dict[str, bytes] = {}
        current: str | None = None
        chunks: list[bytes] = []
        data = self.patch(paths, rename=False) if paths else b""
        for line in data.splitlines(keepends=True):
            if line.startswith(b"diff --git ") and line in headers:
                if current is not None:
                    out[current] = out.get(current, b"") + b"".join(chunks)
                current, chunks = headers[line], []
            chunks.append(line)
        if current is not None:
            out[current] = out.get(current, b"") + b"".join(chunks)
        with self._lock:
            self._by_path = out
        return out

    def commits(self) -> tuple[str, str]:
        """(base, sandbox) commit ids: the patch goes from the first to the second."""
        with self._lock:
            if self._commits is None:
                self._commits = self._build()
            return self._commits

    def _build(self) -> tuple[str, str]:
        """The sandbox's view as a commit on top of the baseline commit.

        Every changed file of the whole diff goes in (not only a selection), so one commit
        serves every patch asked of this diff. Ignored paths that were included and existed
        on the host (which the baseline does not hold) first go into a base commit with
        their host version, so the patch applies to the host.
        """
        changes = [c for c in self.changes if c.type != "dir"]
        host_sides = [
            c for c in changes if c.ignored and c.kind != "added" and c.old_oid is not None
        ]
        token = secrets.token_hex(8)
        base_ref = f"refs/stockade/tmp-{token}-base".encode()
        view_ref = f"refs/stockade/tmp-{token}-view".encode()
        env = git_env(self.baseline.git_dir)
        proc = subprocess.Popen(
            ["git", "fast-import", "--quiet", "--force", "--done"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stderr is not None
        stderr_chunks: list[bytes] = []
        reader = threading.Thread(
            target=lambda: stderr_chunks.append(proc.stderr.read() if proc.stderr else b"")
        )
        reader.start()
        ok = False
        stream = proc.stdin
        try:
            mark = 0
            host_marks: dict[str, int] = {}
            for change in host_sides:
                mark += 1
                host_marks[change.path] = mark
                self._feed_host_blob(stream, change, mark)
            marks: dict[str, int] = {}
            for change in changes:
                if change.kind != "deleted":
                    mark += 1
                    marks[change.path] = mark
                    self._feed_blob(stream, change, mark)
            base_from = self.baseline.commit.encode("ascii")
            stream.write(_commit_header(base_ref, b"stockade base", base_from))
            for change in host_sides:
                mode = _git_mode_bytes(change.type, change.old_mode)
                stream.write(
                    b"M %s :%d %s\n" % (mode, host_marks[change.path], _quote(change.path))
                )
            stream.write(b"\n")
            stream.write(_commit_header(view_ref, b"stockade sandbox view", base_ref))
            for change in changes:
                if change.kind == "deleted":
                    stream.write(b"D " + _quote(change.path) + b"\n")
            for change in changes:
                if change.kind != "deleted":
                    mode = _git_mode_bytes(change.type, change.new_mode)
                    stream.write(b"M %s :%d %s\n" % (mode, marks[change.path], _quote(change.path)))
            stream.write(b"\ndone\n")
            ok = True
        except BrokenPipeError:
            pass
        finally:
            try:
                stream.close()
            except BrokenPipeError:
                ok = False
            if not ok:
                proc.kill()
            proc.wait()
            reader.join()
        if proc.returncode != 0 or not ok:
            message_text = b"".join(stderr_chunks).decode("utf-8", "replace").strip()
            raise WorkspaceError(f"git fast-import failed: {message_text or 'aborted'}")
        ids = []
        for ref in (base_ref, view_ref):
            name = ref.decode()
            rev = run_git(["rev-parse", "--verify", name + "^{commit}"], env)
            ids.append(rev.stdout.decode("ascii").strip())
            run_git(["update-ref", "-d", name], env)
        return ids[0], ids[1]

    def _feed_host_blob(self, stream: Any, change: FileChange, mark: int) -> None:
        """The host's version of an ignored path (verified against the diff's id)."""
        if change.type == "symlink":
            data = os.fsencode(change.old_target or "")
        else:
            try:
                fd = open_file_beneath(self.lower, tuple(change.path.split("/")))
            except OSError as exc:
                raise WorkspaceError(
                    f"{change.path!r} changed on the host since the diff was taken "
                    f"({exc.strerror}); take the diff again"
                ) from exc
            try:
                data = _read_all(fd)
            finally:
                os.close(fd)
        if git_blob_id(data) != change.old_oid:
            raise WorkspaceError(
                f"{change.path!r} changed on the host since the diff was taken; take the diff again"
            )
        stream.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)) + data + b"\n")

    def _feed_blob(self, stream: Any, change: FileChange, mark: int) -> None:
        if change.type == "symlink":
            data = os.fsencode(change.new_target or "")
            stream.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)) + data + b"\n")
            return
        try:
            fd = open_file_beneath(self.upper, tuple(change.path.split("/")), owned=True)
        except OSError as exc:
            raise WorkspaceError(
                f"{change.path!r} changed in the sandbox since the diff was taken "
                f"({exc.strerror}); take the diff again"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            stream.write(b"blob\nmark :%d\ndata %d\n" % (mark, size))
            digest = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
            offset = 0
            while offset < size and (chunk := os.pread(fd, min(_CHUNK, size - offset), offset)):
                digest.update(chunk)
                stream.write(chunk)
                offset += len(chunk)
            if offset != size or digest.hexdigest() != change.new_oid:
                raise WorkspaceError(
                    f"{change.path!r} changed in the sandbox since the diff was taken; "
                    "take the diff again"
                )
            stream.write(b"\n")
        finally:
            os.close(fd)


def _commit_header(ref: bytes, message: bytes, parent: bytes) -> bytes:
    """A fast-import commit command (fixed identity and date) up to its file changes."""
    return (
        b"commit %s\ncommitter stockade <stockade@localhost> 0 +0000\n" % ref
        + b"data %d\n%s\nfrom %s\n" % (len(message), message, parent)
    )


def _git_mode_bytes(type_: EntryType, mode: int | None) -> bytes:
    return b"120000" if type_ == "symlink" else b"%o" % (0o100000 | (mode or 0o644))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def _quote(path: str) -> bytes:
    """C-style quoting for fast-import paths (any byte allowed)."""
    return _c_quote(os.fsencode(path), {})


_C_ESCAPES = {7: b"\\a", 8: b"\\b", 9: b"\\t", 10: b"\\n", 11: b"\\v", 12: b"\\f", 13: b"\\r"}


def _git_quote(name: str) -> bytes:
    """A name as git prints it in patch headers with core.quotePath=true."""
    raw = os.fsencode(name)
    if not any(b < 0x20 or b in (0x22, 0x5C) or b >= 0x7F for b in raw):
        return raw
    return _c_quote(raw, _C_ESCAPES)


def _c_quote(raw: bytes, escapes: dict[int, bytes]) -> bytes:
    """``raw`` in double quotes: a byte of ``escapes`` as given there, ``"`` and ``\\``
    backslashed, any other control or non-ASCII byte as a 3-digit octal escape."""
    out = bytearray(b'"')
    for byte in raw:
        if byte in escapes:
            out += escapes[byte]
        elif byte in (0x22, 0x5C):
            out += b"\\" + bytes([byte])
        elif byte < 0x20 or byte >= 0x7F:
            out += b"\\%03o" % byte
        else:
            out.append(byte)
    out += b'"'
    return bytes(out)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _looks_binary(head: bytes, size: int) -> bool:
    if b"\0" in head[:_SNIFF_BYTES]:
        return True
    if size > TEXT_PATCH_LIMIT:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the sniff boundary is not a sign of binary.
        return not (exc.reason == "unexpected end of data" and len(head) >= _SNIFF_BYTES)
    return False


def _is_dotgit_alias(name: str) -> bool:
    """Names git refuses as aliases of ``.git`` (case, NTFS trailing dots/spaces, streams,
    the 8.3 short name): a patch holding one would not apply."""
    lowered = name.lower()
    if lowered.split(":", 1)[0].rstrip(" .") == ".git":
        return True
    return lowered == "git~1"


def _hash_file(fd: int) -> _Side:
    """sha256, git blob id, size and binary flag of a regular file, in one read."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "changed type while being read")
    digest = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % st.st_size, usedforsecurity=False)
    head = b""
    size = 0
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        if not head:
            head = chunk[:_SNIFF_BYTES]
        digest.update(chunk)
        blob.update(chunk)
        size += len(chunk)
        offset += len(chunk)
    if size != st.st_size:
        raise OSError(errno.EAGAIN, "file changed size while being read")
    return _Side(
        "file",
        _git_mode(st.st_mode),
        sha256=digest.hexdigest(),
        size=size,
        binary=_looks_binary(head, size),
        oid=blob.hexdigest(),
    )


def _git_mode(st_mode: int) -> int:
    return 0o755 if st_mode & stat.S_IXUSR else 0o644


def _lower_side(path: Path, st: os.stat_result) -> _Side | None:
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        raw = os.fsencode(target)
        return _Side("symlink", None, target=target, size=len(raw), oid=git_blob_id(raw))
    if stat.S_ISDIR(st.st_mode):
        return _Side("dir", stat.S_IMODE(st.st_mode) & _PERM_MASK)
    if not stat.S_ISREG(st.st_mode):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return _hash_file(fd)
    finally:
        os.close(fd)


def _overlay_flags(fd: int, rel: str, *, is_dir: bool) -> bool:
    """Whether the directory is opaque; refuse overlay features we do not interpret."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    opaque = False
    for xname in names:
        for prefix in _OVERLAY_XATTR_PREFIXES:
            if not xname.startswith(prefix):
                continue
            key = xname[len(prefix) :]
            if key == "opaque" and is_dir:
                opaque = opaque or os.getxattr(fd, xname) == b"y"
            elif key in ("redirect", "metacopy"):
                raise WorkspaceError(
                    f"upper layer entry {rel!r} carries the overlay {key!r} attribute, which "
                    "stockade does not interpret; mount the overlay with redirect_dir=off "
                    "and metacopy=off (the userxattr option implies both)"
                )
    return opaque


def _read_at(dir_fd: int, name: str) -> bytes | None:
    """A small regular file of the upper layer, read through its directory fd."""
    restore: ModeRestore = []
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = open_at(dir_fd, name, flags, restore)
    except OSError:
        return None
    finally:
        restore_modes(restore)
    return read_small_fd(fd)


def _lstat(path: Path | None) -> os.stat_result | None:
    if path is None:
        return None
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _listdir(path: Path) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def _type_name(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return f"mode {mode:o}"


def _fmt_mode(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:04o}"


def _signature(change: FileChange) -> tuple[object, ...]:
    return (
        change.path,
        change.kind,
        change.type,
        change.old_mode,
        change.new_mode,
        change.old_sha256,
        change.new_sha256,
        change.old_target,
        change.new_target,
    )
