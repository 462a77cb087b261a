"""What the sandbox changed: classify an overlayfs upper layer against the host project.

Rules (overlayfs, measured on this machine; see notes/lab-containers.md section 8):

- a character device 0/0 in upper is a whiteout: the lower entry is deleted;
- a directory with ``user.overlay.opaque=y`` (or ``trusted.``) hides everything below it in
  lower: lower entries not present again in upper are deleted;
- an entry in upper and in lower is modified only when its type, content (bytes) or
  permission bits differ, so copy-up of an unchanged file and touch-only are no change, and
  chmod-only is a mode change;
- a directory in upper that also exists in lower is a copy-up container, not a change, unless
  its mode differs; a directory only in upper (even empty) is added.

Choices:

- A deleted directory is reported as one ``deleted`` entry for the directory *and* one for
  every file, symlink and subdirectory under it, so a reviewer sees exactly which files go.
- A change of type (file -> dir, dir -> symlink, ...) is a ``deleted`` entry for the old
  entry followed by an ``added`` entry for the new one, at the same path.
- Only the permission bits ``0o777`` are compared and carried; setuid, setgid and sticky bits
  never travel from a sandbox to the host. Owners, times and xattrs are not tracked.
- Sockets, fifos and device nodes written by the sandbox are listed in ``ignored``.
- Hashes are computed during the walk; text patches are built lazily, and files over
  ``TEXT_PATCH_LIMIT`` bytes get a hash-only entry in the patch.
- Layouts this code does not understand (``redirect`` or ``metacopy`` xattrs, produced only
  with mount options stockade never uses) raise WorkspaceError instead of being misread.
"""

from __future__ import annotations

import codecs
import difflib
import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from stockade._errors import WorkspaceError
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

#: Files larger than this (on either side) get a hash-only entry in text patches.
TEXT_PATCH_LIMIT = 1024 * 1024
_SNIFF_BYTES = 8000  # like git: a NUL byte in the first 8000 bytes means binary
_CHUNK = 1024 * 1024
_PERM_MASK = 0o777
_OVERLAY_XATTR_PREFIXES = ("user.overlay.", "trusted.overlay.")
_KIND_ORDER = {"deleted": 0, "modified": 1, "added": 2}
_GIT_TYPE_BITS = {"file": 0o100000, "dir": 0o040000, "symlink": 0o120000}


@dataclass(frozen=True)
class FileChange:
    """One changed path of the workspace. ``path`` is posix and relative to the root."""

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
    # Where to read contents from when a patch is asked for; not part of the change itself.
    lower_root: Path | None = field(default=None, repr=False, compare=False)
    upper_root: Path | None = field(default=None, repr=False, compare=False)

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
            "old_target": self.old_target,
            "new_target": self.new_target,
            "size": self.size,
            "old_size": self.old_size,
            "binary": self.binary,
            "protected": self.protected,
        }
        if include_patch:
            data["patch"] = self.patch()
        return data

    def patch(self) -> str:
        """A git-style unified patch for this change (``a/`` and ``b/`` prefixes)."""
        a_name = "/dev/null" if self.kind == "added" else f"a/{self.path}"
        b_name = "/dev/null" if self.kind == "deleted" else f"b/{self.path}"
        lines = [f"diff --git a/{self.path} b/{self.path}\n"]
        bits = _GIT_TYPE_BITS[self.type]
        if self.kind == "added":
            lines.append(f"new {_noun(self.type)} mode {bits | (self.new_mode or 0):06o}\n")
        elif self.kind == "deleted":
            lines.append(f"deleted {_noun(self.type)} mode {bits | (self.old_mode or 0):06o}\n")
        elif self.mode_changed:
            lines.append(f"old mode {bits | (self.old_mode or 0):06o}\n")
            lines.append(f"new mode {bits | (self.new_mode or 0):06o}\n")
        if self.type == "dir" or (self.kind == "modified" and not self.content_changed):
            return "".join(lines)
        if self.type == "symlink":
            old_text = None if self.old_target is None else self.old_target
            new_text = None if self.new_target is None else self.new_target
            lines.extend(_unified(old_text, new_text, a_name, b_name))
            return "".join(lines)
        too_big = max(self.size, self.old_size) > TEXT_PATCH_LIMIT
        if self.binary or too_big:
            what = "Binary" if self.binary else "Large"
            lines.append(
                f"{what} files {a_name} and {b_name} differ "
                f"(sha256 {self.old_sha256 or '-'} -> {self.new_sha256 or '-'})\n"
            )
            return "".join(lines)
        old_bytes = self._read("lower") if self.kind != "added" else None
        new_bytes = self._read("upper") if self.kind != "deleted" else None
        if _sha(old_bytes) != self.old_sha256 or _sha(new_bytes) != self.new_sha256:
            lines.append(f"Files {a_name} and {b_name} changed again since the diff was taken\n")
            return "".join(lines)
        old_text = None if old_bytes is None else old_bytes.decode("utf-8")
        new_text = None if new_bytes is None else new_bytes.decode("utf-8")
        lines.extend(_unified(old_text, new_text, a_name, b_name))
        return "".join(lines)

    def _read(self, side: Literal["lower", "upper"]) -> bytes | None:
        root = self.lower_root if side == "lower" else self.upper_root
        if root is None:
            return None
        try:
            fd = open_file_beneath(root, tuple(self.path.split("/")), owned=side == "upper")
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read(TEXT_PATCH_LIMIT + 1)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class WorkspaceDiff:
    """Every change of a workspace, sorted by path (a deletion before an addition)."""

    changes: list[FileChange]
    ignored: list[tuple[str, str]] = field(default_factory=list)

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

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[FileChange]:
        return iter(self.changes)

    def patch(self) -> str:
        return "".join(c.patch() for c in self.changes)

    def summary(self) -> str:
        if not self.changes:
            return "no changes"
        return (
            f"{len(self.added)} added, {len(self.modified)} modified, {len(self.deleted)} deleted"
        )

    def to_dict(self, *, include_patch: bool = False) -> dict[str, Any]:
        return {
            "summary": {
                "added": len(self.added),
                "modified": len(self.modified),
                "deleted": len(self.deleted),
            },
            "changes": [c.to_dict(include_patch=include_patch) for c in self.changes],
            "ignored": [{"path": p, "reason": r} for p, r in self.ignored],
        }


@overload
def compute_diff(layers: WorkspaceLayers, /, *, protected: Iterable[str] = ()) -> WorkspaceDiff: ...


@overload
def compute_diff(
    lower: str | os.PathLike[str],
    upper: str | os.PathLike[str],
    /,
    *,
    protected: Iterable[str] = (),
) -> WorkspaceDiff: ...


def compute_diff(
    layers: WorkspaceLayers | str | os.PathLike[str],
    upper: str | os.PathLike[str] | None = None,
    /,
    *,
    protected: Iterable[str] = (),
) -> WorkspaceDiff:
    """Classify the upper layer against the lower one; see the module docstring for rules.

    Call it as ``compute_diff(layers)`` or ``compute_diff(lower, upper)``. ``protected``
    entries mark a change (and everything under it) as protected.
    """
    if isinstance(layers, WorkspaceLayers):
        lower_root, upper_root = layers.lower, layers.upper
    else:
        if upper is None:
            raise TypeError("compute_diff(lower, upper) needs both directories")
        lower_root, upper_root = Path(layers), Path(upper)
    walker = _DiffWalker(lower_root, upper_root, normalize_protected(protected))
    try:
        root_fd = open_dir_beneath(upper_root, ())
    except OSError as exc:
        raise WorkspaceError(
            f"cannot read the upper layer {str(upper_root)!r}: {exc.strerror}"
        ) from exc
    try:
        walker.walk(root_fd, (), lower_root, opaque=False)
    except OSError as exc:
        raise WorkspaceError(f"cannot compute the workspace diff: {exc}") from exc
    finally:
        os.close(root_fd)
    walker.changes.sort(key=lambda c: (c.path.split("/"), _KIND_ORDER[c.kind]))
    walker.ignored.sort()
    return WorkspaceDiff(changes=walker.changes, ignored=walker.ignored)


def normalize_protected(entries: Iterable[str]) -> frozenset[str]:
    """Protected entries as workspace-relative posix paths (``./x/`` -> ``x``)."""
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


class _DiffWalker:
    def __init__(self, lower: Path, upper: Path, protected: frozenset[str]) -> None:
        self.lower = lower
        self.upper = upper
        self.protected = protected
        self.changes: list[FileChange] = []
        self.ignored: list[tuple[str, str]] = []

    def walk(
        self, dir_fd: int, rel: tuple[str, ...], lower_dir: Path | None, *, opaque: bool
    ) -> None:
        """Walk one upper directory. ``lower_dir`` is its lower counterpart (a real directory)
        or None; ``opaque`` means lower entries missing from upper are deleted."""
        seen: set[str] = set()
        for name in sorted(os.listdir(dir_fd)):
            child = (*rel, name)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            lower_path = None if lower_dir is None else lower_dir / name
            lower_st = _lstat(lower_path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                if not opaque and lower_path is not None and lower_st is not None:
                    self.deleted_tree(lower_path, lower_st, child)
                continue  # in an opaque dir the lower entry is reported below
            seen.add(name)
            if stat.S_ISDIR(st.st_mode):
                self.visit_dir(dir_fd, name, child, lower_path, lower_st, opaque=opaque)
            elif stat.S_ISREG(st.st_mode):
                new = self.read_upper_file(dir_fd, name, child)
                self.compare(child, new, lower_path, lower_st)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dir_fd)
                new = _Side("symlink", None, target=target, size=len(os.fsencode(target)))
                self.compare(child, new, lower_path, lower_st)
            else:
                self.ignored.append(("/".join(child), f"unsupported file type {_type_name(st)}"))
                if lower_path is not None and lower_st is not None:
                    self.deleted_tree(lower_path, lower_st, child)
        if opaque and lower_dir is not None:
            for name in sorted(_listdir(lower_dir)):
                if name not in seen:
                    path = lower_dir / name
                    lower_st = _lstat(path)
                    if lower_st is not None:
                        self.deleted_tree(path, lower_st, (*rel, name))

    def visit_dir(
        self,
        parent_fd: int,
        name: str,
        rel: tuple[str, ...],
        lower_path: Path | None,
        lower_st: os.stat_result | None,
        *,
        opaque: bool,
    ) -> None:
        # A directory the sandbox made inaccessible stays readable until its walk is done.
        restore: ModeRestore = []
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = open_at(parent_fd, name, flags, restore)
        try:
            mode = restore[0][1] if restore else stat.S_IMODE(os.fstat(fd).st_mode)
            is_opaque = _overlay_flags(fd, "/".join(rel), is_dir=True)
            new_mode = mode & _PERM_MASK
            if lower_path is not None and lower_st is not None and stat.S_ISDIR(lower_st.st_mode):
                old_mode = stat.S_IMODE(lower_st.st_mode) & _PERM_MASK
                if old_mode != new_mode:
                    self.add(
                        rel,
                        "modified",
                        "dir",
                        old=_Side("dir", old_mode),
                        new=_Side("dir", new_mode),
                    )
                self.walk(fd, rel, lower_path, opaque=opaque or is_opaque)
                return
            if lower_path is not None and lower_st is not None:
                self.deleted_tree(lower_path, lower_st, rel)
            self.add(rel, "added", "dir", new=_Side("dir", new_mode))
            self.walk(fd, rel, None, opaque=True)
        finally:
            os.close(fd)
            restore_modes(restore)

    def compare(
        self,
        rel: tuple[str, ...],
        new: _Side,
        lower_path: Path | None,
        lower_st: os.stat_result | None,
    ) -> None:
        if lower_path is None or lower_st is None:
            self.add(rel, "added", new.type, new=new)
            return
        old = self.lower_side(lower_path, lower_st)
        if old is None:  # a fifo or device on the host: leave it alone
            self.ignored.append(("/".join(rel), "unsupported file type on the host"))
            self.add(rel, "added", new.type, new=new)
        elif old.type != new.type:
            self.deleted_tree(lower_path, lower_st, rel)
            self.add(rel, "added", new.type, new=new)
        elif (old.mode, old.sha256, old.target) != (new.mode, new.sha256, new.target):
            self.add(rel, "modified", new.type, old=old, new=new)

    def deleted_tree(
        self, lower_path: Path, lower_st: os.stat_result, rel: tuple[str, ...]
    ) -> None:
        if stat.S_ISDIR(lower_st.st_mode):
            self.add(
                rel, "deleted", "dir", old=_Side("dir", stat.S_IMODE(lower_st.st_mode) & _PERM_MASK)
            )
            for name in sorted(_listdir(lower_path)):
                child_path = lower_path / name
                child_st = _lstat(child_path)
                if child_st is not None:
                    self.deleted_tree(child_path, child_st, (*rel, name))
            return
        old = self.lower_side(lower_path, lower_st)
        if old is None:
            self.ignored.append(("/".join(rel), f"unsupported file type {_type_name(lower_st)}"))
            return
        self.add(rel, "deleted", old.type, old=old)

    def lower_side(self, path: Path, st: os.stat_result) -> _Side | None:
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            return _Side("symlink", None, target=target, size=len(os.fsencode(target)))
        if stat.S_ISDIR(st.st_mode):
            return _Side("dir", stat.S_IMODE(st.st_mode) & _PERM_MASK)
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return _hash_file(fd)
        finally:
            os.close(fd)

    def read_upper_file(self, dir_fd: int, name: str, rel: tuple[str, ...]) -> _Side:
        restore: ModeRestore = []
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = open_at(dir_fd, name, flags, restore)
        finally:
            restore_modes(restore)  # an open fd keeps reading whatever the mode
        try:
            _overlay_flags(fd, "/".join(rel), is_dir=False)
            return _hash_file(fd)
        finally:
            os.close(fd)

    def add(
        self,
        rel: tuple[str, ...],
        kind: ChangeKind,
        type_: EntryType,
        *,
        old: _Side | None = None,
        new: _Side | None = None,
    ) -> None:
        path = "/".join(rel)
        shown = new if new is not None else old
        self.changes.append(
            FileChange(
                path=path,
                kind=kind,
                type=type_,
                old_mode=None if old is None else old.mode,
                new_mode=None if new is None else new.mode,
                old_sha256=None if old is None else old.sha256,
                new_sha256=None if new is None else new.sha256,
                old_target=None if old is None else old.target,
                new_target=None if new is None else new.target,
                size=0 if shown is None else shown.size,
                old_size=0 if old is None else old.size,
                binary=(old is not None and old.binary) or (new is not None and new.binary),
                protected=is_protected(path, self.protected),
                lower_root=self.lower,
                upper_root=self.upper,
            )
        )


def _hash_file(fd: int) -> _Side:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "changed type while being read")
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")() if st.st_size <= TEXT_PATCH_LIMIT else None
    binary = False
    size = 0
    first = True
    while chunk := os.read(fd, _CHUNK):
        if first and b"\0" in chunk[:_SNIFF_BYTES]:
            binary = True
        first = False
        digest.update(chunk)
        size += len(chunk)
        if decoder is not None and not binary:
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                binary = True
    if decoder is not None and not binary:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            binary = True
    return _Side(
        "file",
        stat.S_IMODE(st.st_mode) & _PERM_MASK,
        sha256=digest.hexdigest(),
        size=size,
        binary=binary,
    )


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


def _lstat(path: Path | None) -> os.stat_result | None:
    if path is None:
        return None
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _listdir(path: Path) -> list[str]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
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


def _noun(type_: EntryType) -> str:
    return "directory" if type_ == "dir" else "file"


def _fmt_mode(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:04o}"


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


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


def _unified(old: str | None, new: str | None, a_name: str, b_name: str) -> list[str]:
    """Unified hunks like git's, including the "no newline at end of file" marker."""
    old_lines = _split_lines(old)
    new_lines = _split_lines(new)
    out: list[str] = []
    for line in difflib.unified_diff(old_lines, new_lines, a_name, b_name, n=3, lineterm="\n"):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return out


def _split_lines(text: str | None) -> list[str]:
    # Only "\n" ends a line, as in git (str.splitlines also splits on \r, \f, U+2028...).
    if not text:
        return []
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines
